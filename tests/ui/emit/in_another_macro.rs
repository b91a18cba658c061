use outbox_core::{OutboxEvent, emit, transactional};
use sea_orm::DatabaseConnection;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "created")]
struct OrderCreated {
    id: i64,
}

#[transactional]
async fn place_order(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    tokio::join!(async {
        emit!(OrderCreated { id: 1 });
    });
    Ok(())
}

fn main() {}
