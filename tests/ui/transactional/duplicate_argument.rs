use outbox_core::transactional;
use sea_orm::DatabaseConnection;

#[transactional(conn = db, conn = db)]
async fn place_order(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    Ok(())
}

fn main() {}
