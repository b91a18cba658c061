use outbox_core::transactional;
use sea_orm::DatabaseConnection;

#[derive(Debug)]
struct AppError;

#[transactional]
async fn place_order(db: &DatabaseConnection) -> Result<(), AppError> {
    Ok(())
}

fn main() {}
