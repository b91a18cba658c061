//! Statements on the inbox tables.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, Insert,
    QueryFilter, QuerySelect,
};
use uuid::Uuid;

use crate::Error;
use crate::dialect::Dialect;
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
    let key = [
        inbox_message::Column::Consumer,
        inbox_message::Column::EventId,
    ];
    insert_once(conn, inbox_message::Entity::insert(row), key).await
}

/// Records that `consumer` handles each of `event_ids` (distinct), in the
/// caller's transaction; returns those recorded now, leaving out those whose
/// row was already there (redeliveries). One statement on PostgreSQL and
/// SQLite (`ON CONFLICT DO NOTHING RETURNING`); one per event on MySQL,
/// whose `INSERT IGNORE` returns nothing.
pub(super) async fn record_all(
    conn: &impl ConnectionTrait,
    consumer: &str,
    event_ids: &[Uuid],
) -> Result<HashSet<Uuid>, Error> {
    if !Dialect::of(conn).returns_inserted() || event_ids.len() == 1 {
        let mut fresh = HashSet::with_capacity(event_ids.len());
        for &id in event_ids {
            if record(conn, consumer, id).await? {
                fresh.insert(id);
            }
        }
        return Ok(fresh);
    }
    let now = Utc::now();
    let mut fresh = HashSet::with_capacity(event_ids.len());
    // Three values a row, well under every database's cap per statement.
    for chunk in event_ids.chunks(5_000) {
        let mut insert = Query::insert();
        insert
            .into_table(inbox_message::Entity)
            .columns([
                inbox_message::Column::Consumer,
                inbox_message::Column::EventId,
                inbox_message::Column::ProcessedAt,
            ])
            .on_conflict(
                OnConflict::columns([
                    inbox_message::Column::Consumer,
                    inbox_message::Column::EventId,
                ])
                .do_nothing()
                .to_owned(),
            )
            .returning_col(inbox_message::Column::EventId);
        for &id in chunk {
            insert.values_panic([consumer.into(), id.into(), now.into()]);
        }
        for row in conn.query_all(&insert).await? {
            fresh.insert(row.try_get_by_index::<Uuid>(0)?);
        }
    }
    Ok(fresh)
}

/// Removes `consumer`'s inbox rows of `event_ids`, in the caller's
/// transaction: for events recorded with [`record_all`] whose handler then failed.
pub(super) async fn forget(
    conn: &impl ConnectionTrait,
    consumer: &str,
    event_ids: Vec<Uuid>,
) -> Result<(), Error> {
    inbox_message::Entity::delete_many()
        .filter(inbox_message::Column::Consumer.eq(consumer))
        .filter(inbox_message::Column::EventId.is_in(event_ids))
        .exec(conn)
        .await?;
    Ok(())
}

/// Which of `event_ids` `consumer` has recorded already: the events it
/// handled (or dead-lettered). Asked in chunks, one statement per 1,000 ids.
pub async fn recorded(
    conn: &impl ConnectionTrait,
    consumer: &str,
    event_ids: &[Uuid],
) -> Result<HashSet<Uuid>, Error> {
    let mut found = HashSet::new();
    for chunk in event_ids.chunks(1_000) {
        let rows = inbox_message::Entity::find()
            .select_only()
            .column(inbox_message::Column::EventId)
            .filter(inbox_message::Column::Consumer.eq(consumer))
            .filter(inbox_message::Column::EventId.is_in(chunk.iter().copied()))
            .into_tuple::<Uuid>()
            .all(conn)
            .await?;
        found.extend(rows);
    }
    Ok(found)
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
    let key = [
        inbox_dead_letter::Column::Consumer,
        inbox_dead_letter::Column::Stream,
        inbox_dead_letter::Column::StreamSequence,
    ];
    let insert = inbox_dead_letter::Entity::insert(inbox_dead_letter::ActiveModel::from(letter));
    insert_once(conn, insert, key).await
}

/// Inserts one row unless one with the same `key` exists; returns whether it did.
async fn insert_once<A, const N: usize>(
    conn: &impl ConnectionTrait,
    insert: Insert<A>,
    key: [<A::Entity as EntityTrait>::Column; N],
) -> Result<bool, Error>
where
    A: ActiveModelTrait,
{
    let statement = Dialect::of(conn).insert_once(insert, key);
    Ok(conn.execute_raw(statement).await?.rows_affected() == 1)
}
