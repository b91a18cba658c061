use outbox_core::transactional;
use sea_orm::DatabaseConnection;

#[transactional]
async fn place_order(db: &DatabaseConnection) {}

fn main() {}
