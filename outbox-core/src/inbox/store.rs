//! Statements on the inbox tables.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

use crate::Error;
use crate::entity::{inbox_dead_letter, inbox_message};

/// Records that `consumer` handles event `event_id`, in the caller's
/// transaction: `true` the first time, `false` if the row is already there
/// (a redelivery). A concurrent delivery of the same event waits for the
/// first transaction, then finds its row.
pub async fn record(
    conn: &impl ConnectionTrait,
    consumer: &str,
    event_id: Uuid,
) -> Result<bool, Error> {
    let row = inbox_message::ActiveModel {
        consumer: Set(consumer.to_owned()),
        event_id: Set(event_id),
        processed_at: Set(Utc::now()),
    };
    let inserted = inbox_message::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                inbox_message::Column::Consumer,
                inbox_message::Column::EventId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(conn)
        .await?;
    Ok(inserted == 1)
}

/// Deletes `consumer`'s inbox rows processed before `before`; returns how many.
///
/// Keep rows longer than a message can still be redelivered (the stream's
/// retention, or the consumer's redelivery horizon), or a late redelivery runs again.
pub async fn purge(
    conn: &impl ConnectionTrait,
    consumer: &str,
    before: DateTime<Utc>,
) -> Result<u64, Error> {
    let deleted = inbox_message::Entity::delete_many()
        .filter(inbox_message::Column::Consumer.eq(consumer))
        .filter(inbox_message::Column::ProcessedAt.lt(before))
        .exec(conn)
        .await?;
    Ok(deleted.rows_affected)
}

/// Stores a dead letter; a second one for the same consumer and stream
/// sequence (a redelivery) is ignored. Returns whether a row was added.
pub async fn dead_letter(
    conn: &impl ConnectionTrait,
    letter: inbox_dead_letter::Model,
) -> Result<bool, Error> {
    let inserted = inbox_dead_letter::Entity::insert(inbox_dead_letter::ActiveModel::from(letter))
        .on_conflict(
            OnConflict::columns([
                inbox_dead_letter::Column::Consumer,
                inbox_dead_letter::Column::Stream,
                inbox_dead_letter::Column::StreamSequence,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(conn)
        .await?;
    Ok(inserted == 1)
}
