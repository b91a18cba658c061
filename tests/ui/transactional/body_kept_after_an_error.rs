// The attribute's mistake does not hide the body's: both are reported, and
// `emit!` in the body is still checked against `OutboxEvent`.
use outbox_core::{emit, transactional};
use sea_orm::DatabaseConnection;

struct NotAnEvent;

#[transactional(connection = db)]
async fn place_order(db: &DatabaseConnection) -> Result<(), outbox_core::Error> {
    let count: u32 = "three";
    emit!(NotAnEvent);
    Ok(())
}

fn main() {}
