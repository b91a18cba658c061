//! The relay's dead letters (`outbox_dead_letters`): events it gave up
//! publishing.
//!
//! A replayed event goes back to the outbox with its original id and its
//! attempts reset. Its id keeps it where it was in its key's order: the
//! relay delivers a key's pending events by id, so it goes out before every
//! event of its key committed after the replay (and before any of its key
//! still pending from before). And JetStream, which deduplicates by that id,
//! drops it if it had stored the event after all.

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use uuid::Uuid;

use super::{DeadLetterError, Selection};
use crate::entity::{dead_letter, outbox_message};

/// Rows per statement, well under every backend's bound on parameters.
const CHUNK: usize = 500;

/// The dead letter `id`, in full.
pub async fn show(
    db: &DatabaseConnection,
    id: Uuid,
) -> Result<dead_letter::Model, DeadLetterError> {
    (dead_letter::Entity::find_by_id(id).one(db).await?).ok_or(DeadLetterError::NotFound(id))
}

/// The selected dead letters, newest first, at most `limit`.
pub async fn list(
    db: &DatabaseConnection,
    selection: &Selection,
    limit: u64,
) -> Result<Vec<dead_letter::Model>, DeadLetterError> {
    use sea_orm::QuerySelect;
    let rows = dead_letter::Entity::find()
        .filter(condition(selection))
        .order_by_desc(dead_letter::Column::FailedAt)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows)
}

/// Moves the selected dead letters back to the outbox, attempts reset, in
/// one transaction; returns their ids in id order.
pub async fn replay(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let letters = selected(&txn, selection).await?;
    let now = Utc::now();
    for chunk in letters.chunks(CHUNK) {
        let rows = chunk.iter().map(|letter| outbox_message::ActiveModel {
            id: Set(letter.id),
            event_type: Set(letter.event_type.clone()),
            event_version: Set(letter.event_version),
            exchange: Set(letter.exchange.clone()),
            subject: Set(letter.subject.clone()),
            partition_key: Set(letter.partition_key.clone()),
            payload: Set(letter.payload.clone()),
            headers: Set(letter.headers.clone()),
            content_type: Set(letter.content_type.clone()),
            created_at: Set(letter.created_at),
            attempts: Set(0),
            next_attempt_at: Set(now),
            last_error: Set(None),
            delivered_at: Set(None),
        });
        outbox_message::Entity::insert_many(rows).exec(&txn).await?;
    }
    let ids = delete(&txn, &letters).await?;
    txn.commit().await?;
    Ok(ids)
}

/// Deletes the selected dead letters in one transaction; returns their ids.
pub async fn discard(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let letters = selected(&txn, selection).await?;
    let ids = delete(&txn, &letters).await?;
    txn.commit().await?;
    Ok(ids)
}

fn condition(selection: &Selection) -> sea_orm::Condition {
    use dead_letter::Column;
    selection.condition(Column::Id, Column::EventType, Column::FailedAt, None)
}

async fn selected(
    txn: &sea_orm::DatabaseTransaction,
    selection: &Selection,
) -> Result<Vec<dead_letter::Model>, DeadLetterError> {
    let letters = dead_letter::Entity::find()
        .filter(condition(selection))
        .order_by_asc(dead_letter::Column::Id)
        .all(txn)
        .await?;
    match selection.by_id() {
        Some(id) if letters.is_empty() => Err(DeadLetterError::NotFound(id)),
        _ => Ok(letters),
    }
}

async fn delete(
    txn: &sea_orm::DatabaseTransaction,
    letters: &[dead_letter::Model],
) -> Result<Vec<Uuid>, DeadLetterError> {
    let ids: Vec<Uuid> = letters.iter().map(|letter| letter.id).collect();
    for chunk in ids.chunks(CHUNK) {
        dead_letter::Entity::delete_many()
            .filter(dead_letter::Column::Id.is_in(chunk.iter().copied()))
            .exec(txn)
            .await?;
    }
    Ok(ids)
}
