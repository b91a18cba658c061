//! The two dead-letter tables behind one trait, and the actions that are
//! the same for both: show, list, discard.

use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::{DeadLetterError, Selection};
use crate::entity::{inbox_dead_letter, outbox_dead_letter};

/// Rows per statement, well under every backend's bound on parameters.
pub(super) const CHUNK: usize = 500;

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::entity::outbox_dead_letter::Entity {}
    impl Sealed for crate::entity::inbox_dead_letter::Entity {}
}

/// A dead-letter table: the relay's (`entity::outbox_dead_letter::Entity`) or the
/// consumers' (`entity::inbox_dead_letter::Entity`).
pub trait Table: EntityTrait + sealed::Sealed {
    #[doc(hidden)]
    const ID: Self::Column;
    #[doc(hidden)]
    const FAILED_AT: Self::Column;

    #[doc(hidden)]
    fn condition(selection: &Selection) -> Condition;

    #[doc(hidden)]
    fn id(model: &Self::Model) -> Uuid;
}

impl Table for outbox_dead_letter::Entity {
    const ID: Self::Column = outbox_dead_letter::Column::Id;
    const FAILED_AT: Self::Column = outbox_dead_letter::Column::FailedAt;

    fn condition(selection: &Selection) -> Condition {
        let event_type = outbox_dead_letter::Column::EventType;
        selection.condition(Self::ID, None, event_type, Self::FAILED_AT, None)
    }

    fn id(model: &outbox_dead_letter::Model) -> Uuid {
        model.id
    }
}

impl Table for inbox_dead_letter::Entity {
    const ID: Self::Column = inbox_dead_letter::Column::Id;
    const FAILED_AT: Self::Column = inbox_dead_letter::Column::FailedAt;

    fn condition(selection: &Selection) -> Condition {
        use inbox_dead_letter::Column;
        let consumer = Some(Column::Consumer);
        let event_id = Some(Column::EventId);
        selection.condition(
            Self::ID,
            event_id,
            Column::EventType,
            Self::FAILED_AT,
            consumer,
        )
    }

    fn id(model: &inbox_dead_letter::Model) -> Uuid {
        model.id
    }
}

/// The dead letter `id` of table `T`, in full: `id` is the dead letter's
/// own or its event's (see [`Selection::id`]); of several consumers' dead
/// letters of one event, the latest.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection, id: uuid::Uuid) -> Result<(), outbox_core::dead_letters::DeadLetterError> {
/// use outbox_core::entity::inbox_dead_letter;
///
/// let letter = outbox_core::dead_letters::show::<inbox_dead_letter::Entity>(&db, id).await?;
/// println!("{}: {}", letter.reason, letter.error);
/// # Ok(()) }
/// ```
pub async fn show<T: Table>(
    db: &DatabaseConnection,
    id: Uuid,
) -> Result<T::Model, DeadLetterError> {
    let row = (T::find())
        .filter(T::condition(&Selection::id(id)))
        .order_by_desc(T::FAILED_AT)
        .one(db)
        .await?;
    row.ok_or(DeadLetterError::NotFound(id))
}

/// The selected dead letters of table `T`, newest first, at most `limit`.
pub async fn list<T: Table>(
    db: &DatabaseConnection,
    selection: &Selection,
    limit: u64,
) -> Result<Vec<T::Model>, DeadLetterError> {
    let rows = T::find()
        .filter(T::condition(selection))
        .order_by_desc(T::FAILED_AT)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows)
}

/// The selected dead letters in id order; none is an error when one id was asked for.
pub(super) async fn selected<T: Table>(
    conn: &impl ConnectionTrait,
    selection: &Selection,
) -> Result<Vec<T::Model>, DeadLetterError> {
    let rows = T::find()
        .filter(T::condition(selection))
        .order_by_asc(T::ID)
        .all(conn)
        .await?;
    match selection.by_id() {
        Some(id) if rows.is_empty() => Err(DeadLetterError::NotFound(id)),
        _ => Ok(rows),
    }
}

/// Deletes the selected dead letters of table `T` in one transaction;
/// returns their ids. A consumer's inbox rows stay, so that a redelivery of
/// a discarded message is still skipped.
pub async fn discard<T: Table>(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let letters = selected::<T>(&txn, selection).await?;
    let ids: Vec<Uuid> = letters.iter().map(|letter| T::id(letter)).collect();
    delete::<T>(&txn, &ids).await?;
    txn.commit().await?;
    Ok(ids)
}

/// Deletes the dead letters `ids`.
pub(super) async fn delete<T: Table>(
    conn: &impl ConnectionTrait,
    ids: &[Uuid],
) -> Result<(), DeadLetterError> {
    for chunk in ids.chunks(CHUNK) {
        T::delete_many()
            .filter(T::ID.is_in(chunk.iter().copied()))
            .exec(conn)
            .await?;
    }
    Ok(())
}
