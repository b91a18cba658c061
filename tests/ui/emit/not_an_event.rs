use outbox_core::{emit, transactional};
use sea_orm::DatabaseConnection;

struct OrderCreated {
    id: u64,
}

#[transactional]
async fn place_order(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    emit!(OrderCreated { id: 1 });
    Ok(())
}

fn main() {}
