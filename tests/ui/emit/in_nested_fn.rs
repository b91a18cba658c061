use outbox_core::{emit, transactional, OutboxEvent};
use sea_orm::DatabaseConnection;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created")]
struct OrderCreated {
    id: u64,
}

#[transactional]
async fn place_order(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    fn helper() {
        emit!(OrderCreated { id: 1 });
    }
    helper();
    Ok(())
}

fn main() {}
