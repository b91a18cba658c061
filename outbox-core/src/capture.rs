//! Events as logical messages, the write side of the logical relay
//! (`relay::logical`): while a logical relay's capture is on, an event is
//! not a row of `outbox_messages` but part of a transactional logical
//! message (`pg_logical_emit_message`), which commits or rolls back with
//! its transaction and reaches the relay's slot in commit order. No row:
//! nothing to claim, settle or vacuum.
//!
//! Two ways in, one format:
//! - **The capture trigger** on `outbox_messages` turns each inserted row
//!   into a message and keeps the row out. Whatever inserts into the outbox
//!   (`emit!` in any process, scheduled events coming due, dead letters
//!   replayed) is captured, with nothing for writers to know. It is what
//!   switches the capture on and off.
//! - **Direct writes** ([`write_as_messages`]): a process that knows its
//!   outbox is read by a logical relay writes each transaction's events as
//!   one message, checking in the same statement that the trigger is there
//!   (else it inserts rows as usual). It skips the trigger's work per row,
//!   which cost PostgreSQL about as much as inserting the row.
//!
//! A message holds one or more events, each as two length-prefixed parts
//! (4-byte big-endian lengths): a JSON array of the event's columns but the
//! payload, then the payload's bytes as they are.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use uuid::Uuid;

use crate::entity::outbox_message::Model;

/// Whether this process writes events as messages where the capture is on.
static AS_MESSAGES: AtomicBool = AtomicBool::new(false);

/// Writes each transaction's events as one logical message where a logical
/// relay's capture is on (PostgreSQL), instead of a row per event that the
/// capture trigger turns into a message: less work for PostgreSQL per
/// event. Where the capture is off, events are rows as usual, at the cost
/// of one more statement per transaction; so turn it on only in services
/// whose outbox the logical relay reads. Off by default.
pub fn write_as_messages(enabled: bool) {
    AS_MESSAGES.store(enabled, Ordering::Relaxed);
}

/// Writes `events` as one message if this process writes messages, the
/// connection is PostgreSQL and the capture is on; returns whether it did
/// (if not, they are to be inserted as rows).
///
/// The check and the write are one statement in the transaction: a relay
/// retiring the slot removes the trigger, then waits for every transaction
/// that may have seen it before it reads the slot a last time (`slot`).
pub(crate) async fn write<C: ConnectionTrait>(conn: &C, events: &[Model]) -> Result<bool, DbErr> {
    if events.is_empty()
        || !AS_MESSAGES.load(Ordering::Relaxed)
        || conn.get_database_backend() != DbBackend::Postgres
    {
        return Ok(false);
    }
    let mut content = Vec::with_capacity(events.iter().map(|e| e.payload.len() + 200).sum());
    for event in events {
        encode(event, &mut content);
    }
    let written = conn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_logical_emit_message(true, 'outbox:' || n.nspname, $1)
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                  JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = 'outbox_capture' AND t.tgrelid = 'outbox_messages'::regclass",
            [content.into()],
        ))
        .await?;
    Ok(!written.is_empty())
}

/// The prefix of an event's message: `outbox:<schema>`, so that relays of
/// outboxes in several schemas of one database each read only their own.
pub(crate) fn event_prefix(schema: &str) -> String {
    format!("outbox:{schema}")
}

/// Installs the capture trigger on the connection's `outbox_messages`
/// (idempotent). Only once the slot exists: a message written while no
/// slot does is lost.
pub(crate) async fn install(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    // Relays standing by come here every second: only the first one writes.
    if installed(conn).await? {
        return Ok(());
    }
    let created = conn
        .execute_unprepared(
            "CREATE OR REPLACE FUNCTION outbox_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE
             columns bytea := convert_to(json_build_array(NEW.id, NEW.event_type,
                 NEW.event_version, NEW.exchange, NEW.subject, NEW.partition_key,
                 NEW.headers, NEW.content_type, NEW.created_at)::text, 'UTF8');
         BEGIN
             PERFORM pg_logical_emit_message(true, 'outbox:' || TG_TABLE_SCHEMA,
                 int4send(octet_length(columns)) || columns
                 || int4send(octet_length(NEW.payload)) || NEW.payload);
             RETURN NULL;
         END $$;
         CREATE OR REPLACE TRIGGER outbox_capture BEFORE INSERT ON outbox_messages
             FOR EACH ROW EXECUTE FUNCTION outbox_capture();",
        )
        .await;
    match created {
        // Another relay created it at the same moment ("tuple concurrently updated").
        Err(_) if installed(conn).await? => Ok(()),
        other => other.map(drop),
    }
}

/// Whether the capture trigger is on the connection's `outbox_messages`.
async fn installed(conn: &impl ConnectionTrait) -> Result<bool, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT EXISTS (SELECT 1 FROM pg_trigger \
             WHERE tgname = 'outbox_capture' AND tgrelid = 'outbox_messages'::regclass)",
        ))
        .await?;
    row.map_or(Ok(false), |row| row.try_get_by_index(0))
}

/// Removes the capture trigger: events are rows in the table again, for
/// the polling relay.
pub(crate) async fn remove(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    conn.execute_unprepared(
        "DROP TRIGGER IF EXISTS outbox_capture ON outbox_messages;
         DROP FUNCTION IF EXISTS outbox_capture();",
    )
    .await?;
    Ok(())
}

/// A message under the outbox's prefix that does not hold events.
#[derive(Debug, thiserror::Error)]
#[error("a logical message under the outbox's prefix is not events: {0}")]
pub struct Malformed(String);

/// The columns before the payload, in the trigger's order.
type Columns = (
    Uuid,
    String,
    i32,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    DateTime<Utc>,
);

/// Appends `event` to a message's content.
fn encode(event: &Model, content: &mut Vec<u8>) {
    let columns = (
        event.id,
        &event.event_type,
        event.event_version,
        &event.exchange,
        &event.subject,
        &event.partition_key,
        &event.headers,
        &event.content_type,
        // As PostgreSQL would have stored it.
        event.created_at.trunc_subsecs(6),
    );
    let at = content.len();
    content.extend_from_slice(&[0; 4]);
    // A tuple of strings, numbers and a time: serializing it cannot fail.
    let _ = serde_json::to_writer(&mut *content, &columns);
    let length = u32::try_from(content.len() - at - 4).unwrap_or(u32::MAX);
    content[at..at + 4].copy_from_slice(&length.to_be_bytes());
    let length = u32::try_from(event.payload.len()).unwrap_or(u32::MAX);
    content.extend_from_slice(&length.to_be_bytes());
    content.extend_from_slice(&event.payload);
}

/// The events a message holds, each as the polling relay would have read
/// it from its row.
pub(crate) fn decode(mut content: &[u8]) -> Result<Vec<Model>, Malformed> {
    let mut events = Vec::with_capacity(1);
    while !content.is_empty() {
        let columns = part(&mut content)?;
        let payload = part(&mut content)?;
        let (
            id,
            event_type,
            event_version,
            exchange,
            subject,
            partition_key,
            headers,
            content_type,
            created_at,
        ): Columns = serde_json::from_slice(columns).map_err(|e| Malformed(e.to_string()))?;
        events.push(Model {
            id,
            event_type,
            event_version,
            exchange,
            subject,
            partition_key,
            payload: payload.to_vec(),
            headers,
            content_type,
            created_at,
            attempts: 0,
            next_attempt_at: created_at,
            last_error: None,
            delivered_at: None,
        });
    }
    Ok(events)
}

/// The next length-prefixed part of a message.
fn part<'a>(content: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    let truncated = || Malformed("truncated".into());
    let (length, rest) = content.split_first_chunk::<4>().ok_or_else(truncated)?;
    let length = u32::from_be_bytes(*length) as usize;
    let part = rest.get(..length).ok_or_else(truncated)?;
    *content = &rest[length..];
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::{decode, encode};
    use crate::relay::fixture::event;

    #[test]
    fn events_come_back_as_they_were_written() {
        let mut first = event(1, Some("o-1"));
        first.payload = b"{\"a\":\n1}".to_vec();
        first.headers = Some("{\"x\":\"y\"}".into());
        let second = event(2, None);
        let mut content = Vec::new();
        encode(&first, &mut content);
        encode(&second, &mut content);
        let events = decode(&content).expect("decodes");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id, first.id);
        assert_eq!(events[0].partition_key.as_deref(), Some("o-1"));
        assert_eq!(events[0].payload, first.payload);
        assert_eq!(events[0].headers, first.headers);
        assert_eq!(
            events[0].created_at.timestamp_micros(),
            first.created_at.timestamp_micros()
        );
        assert_eq!(events[1].id, second.id);
    }

    #[test]
    fn a_foreign_or_cut_message_is_an_error() {
        assert!(decode(b"no lengths").is_err());
        let mut content = Vec::new();
        encode(&event(1, None), &mut content);
        assert!(decode(&content[..content.len() - 1]).is_err());
    }
}
