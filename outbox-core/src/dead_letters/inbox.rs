//! The consumers' dead letters (`outbox_inbox_dead_letters`): messages a
//! consumer gave up handling.
//!
//! Replaying one hands it back to its consumer: in one transaction its inbox
//! row is deleted (the row that made redeliveries skip it) and the dead
//! letter is marked as requested. The running consumer picks requested
//! replays up within a second, queues each behind the messages of its key
//! it holds at that moment, and runs the handler through the inbox as for a
//! delivery: once, however often the replay is requested or the consumer
//! restarts. Handled, the dead letter is deleted; failed again after the
//! consumer's retries, it is a dead letter again, with the new error.

use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::{DeadLetterError, Selection};
use crate::entity::{inbox_dead_letter, inbox_message};

/// The dead letter `id`, in full.
pub async fn show(
    db: &DatabaseConnection,
    id: Uuid,
) -> Result<inbox_dead_letter::Model, DeadLetterError> {
    (inbox_dead_letter::Entity::find_by_id(id).one(db).await?).ok_or(DeadLetterError::NotFound(id))
}

/// The selected dead letters, newest first, at most `limit`.
pub async fn list(
    db: &DatabaseConnection,
    selection: &Selection,
    limit: u64,
) -> Result<Vec<inbox_dead_letter::Model>, DeadLetterError> {
    let rows = inbox_dead_letter::Entity::find()
        .filter(condition(selection))
        .order_by_desc(inbox_dead_letter::Column::FailedAt)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows)
}

/// Hands the selected dead letters back to their consumers, in one
/// transaction; returns their ids.
pub async fn replay(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let ids = selected(&txn, selection).await?;
    for (_, consumer, event_id) in &ids {
        if let Some(event_id) = event_id {
            inbox_message::Entity::delete_many()
                .filter(inbox_message::Column::Consumer.eq(consumer))
                .filter(inbox_message::Column::EventId.eq(*event_id))
                .exec(&txn)
                .await?;
        }
    }
    let ids: Vec<Uuid> = ids.into_iter().map(|(id, _, _)| id).collect();
    for chunk in ids.chunks(500) {
        inbox_dead_letter::Entity::update_many()
            .col_expr(
                inbox_dead_letter::Column::ReplayRequestedAt,
                Expr::value(Utc::now()),
            )
            .filter(inbox_dead_letter::Column::Id.is_in(chunk.iter().copied()))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(ids)
}

/// Deletes the selected dead letters in one transaction; returns their ids.
/// Their inbox rows stay, so that a redelivery is still skipped.
pub async fn discard(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let ids: Vec<Uuid> = (selected(&txn, selection).await?.into_iter())
        .map(|(id, _, _)| id)
        .collect();
    for chunk in ids.chunks(500) {
        inbox_dead_letter::Entity::delete_many()
            .filter(inbox_dead_letter::Column::Id.is_in(chunk.iter().copied()))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(ids)
}

/// For a consumer: up to `limit` of its dead letters whose replay was
/// requested, oldest request first, leaving out those it is handling (`busy`).
pub async fn requested(
    conn: &impl ConnectionTrait,
    consumer: &str,
    busy: &[Uuid],
    limit: u64,
) -> Result<Vec<inbox_dead_letter::Model>, DeadLetterError> {
    let rows = inbox_dead_letter::Entity::find()
        .filter(inbox_dead_letter::Column::Consumer.eq(consumer))
        .filter(inbox_dead_letter::Column::ReplayRequestedAt.is_not_null())
        .filter(inbox_dead_letter::Column::Id.is_not_in(busy.iter().copied()))
        .order_by_asc(inbox_dead_letter::Column::ReplayRequestedAt)
        .limit(limit)
        .all(conn)
        .await?;
    Ok(rows)
}

/// For a consumer: deletes the dead letter `id`, whose replay has run (or
/// become a dead letter again, which the caller stores in the same transaction).
pub async fn replayed(conn: &impl ConnectionTrait, id: Uuid) -> Result<(), DeadLetterError> {
    inbox_dead_letter::Entity::delete_by_id(id)
        .exec(conn)
        .await?;
    Ok(())
}

fn condition(selection: &Selection) -> sea_orm::Condition {
    use inbox_dead_letter::Column;
    let consumer = Some(Column::Consumer);
    selection.condition(Column::Id, Column::EventType, Column::FailedAt, consumer)
}

/// The selected letters' ids, consumers and event ids.
async fn selected(
    txn: &sea_orm::DatabaseTransaction,
    selection: &Selection,
) -> Result<Vec<(Uuid, String, Option<Uuid>)>, DeadLetterError> {
    use inbox_dead_letter::Column;
    let rows: Vec<(Uuid, String, Option<Uuid>)> = inbox_dead_letter::Entity::find()
        .select_only()
        .columns([Column::Id, Column::Consumer, Column::EventId])
        .filter(condition(selection))
        .order_by_asc(Column::Id)
        .into_tuple()
        .all(txn)
        .await?;
    match selection.by_id() {
        Some(id) if rows.is_empty() => Err(DeadLetterError::NotFound(id)),
        _ => Ok(rows),
    }
}
