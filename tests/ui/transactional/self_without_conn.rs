use outbox_core::transactional;
use sea_orm::DatabaseConnection;

struct Service {
    db: DatabaseConnection,
}

impl Service {
    #[transactional]
    async fn place_order(&self) -> Result<(), outbox_core::Error> {
        Ok(())
    }
}

fn main() {}
