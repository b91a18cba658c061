use outbox_core::transactional;
use sea_orm::DatabaseConnection;

#[transactional]
struct PlaceOrder {
    db: DatabaseConnection,
}

fn main() {}
