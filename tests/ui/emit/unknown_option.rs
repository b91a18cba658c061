use outbox_core::{emit, transactional, OutboxEvent};
use sea_orm::DatabaseConnection;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.reminder")]
struct Reminder {
    id: u64,
}

#[transactional]
async fn remind(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    emit!(Reminder { id: 1 }, delay = std::time::Duration::from_secs(60));
    Ok(())
}

fn main() {}
