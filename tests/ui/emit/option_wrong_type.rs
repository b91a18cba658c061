use outbox_core::{emit, transactional, OutboxEvent};
use sea_orm::DatabaseConnection;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.reminder")]
struct Reminder {
    id: u64,
}

#[transactional]
async fn remind(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    emit!(Reminder { id: 1 }, at = "tomorrow");
    emit!(Reminder { id: 2 }, after = 60);
    emit!(Reminder { id: 3 }, headers = "tenant=acme");
    Ok(())
}

fn main() {}
