use outbox_core::transactional;
use sea_orm::DatabaseConnection;

#[transactional]
async fn copy_order(from: &DatabaseConnection, to: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    Ok(())
}

fn main() {}
