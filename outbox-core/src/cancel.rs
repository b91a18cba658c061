//! Taking back an event emitted for later (`emit!(event, at = ...)` or
//! `after = ...`) before it comes due.

use sea_orm::{ConnectionTrait, EntityTrait};
use uuid::Uuid;

use crate::Error;
use crate::entity::outbox_scheduled;

/// Removes the scheduled event `event_id` (the id `emit!` returned) if it
/// has not come due yet; returns whether it did. Once `true` is returned,
/// the event is never published.
///
/// `false` means there was nothing to cancel: the event came due and a
/// relay moved it into the outbox (it is delivered, or about to be), it was
/// cancelled before, it was not scheduled, or the id is unknown. A relay
/// moving the event at the same moment holds its row until it is moved, so
/// the answer is never `true` for an event that then goes out.
///
/// `db` may be a transaction (a `#[transactional]` function's connection):
/// the cancellation then commits or rolls back with it.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection, reminder: uuid::Uuid) -> Result<(), outbox_core::Error> {
/// if outbox_core::cancel(&db, reminder).await? {
///     println!("the reminder will not be sent");
/// }
/// # Ok(()) }
/// ```
pub async fn cancel<C: ConnectionTrait>(db: &C, event_id: Uuid) -> Result<bool, Error> {
    let deleted = outbox_scheduled::Entity::delete_by_id(event_id)
        .exec(db)
        .await?;
    Ok(deleted.rows_affected > 0)
}
