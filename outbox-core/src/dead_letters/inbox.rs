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

use super::table::{self, CHUNK};
use super::{DeadLetterError, Selection};
use crate::entity::{inbox_dead_letter, inbox_message};

/// Hands the selected dead letters back to their consumers, in one
/// transaction; returns their ids.
pub async fn replay(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let letters = table::selected::<inbox_dead_letter::Entity>(&txn, selection).await?;
    for letter in &letters {
        if let Some(event_id) = letter.event_id {
            inbox_message::Entity::delete_many()
                .filter(inbox_message::Column::Consumer.eq(&letter.consumer))
                .filter(inbox_message::Column::EventId.eq(event_id))
                .exec(&txn)
                .await?;
        }
    }
    let ids: Vec<Uuid> = letters.iter().map(|letter| letter.id).collect();
    for chunk in ids.chunks(CHUNK) {
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
