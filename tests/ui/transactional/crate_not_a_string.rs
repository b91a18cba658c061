use outbox_core::transactional;
use sea_orm::DatabaseConnection;

#[transactional(crate = outbox_core)]
async fn place_order(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    Ok(())
}

fn main() {}
