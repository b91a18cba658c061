//! The write side of the logical relay: a trigger that turns each row
//! inserted into `outbox_messages` into a transactional logical message
//! (`pg_logical_emit_message`) and keeps the row out of the table, and the
//! decoding of those messages back into events.
//!
//! A trigger rather than a change to `emit!`: whatever inserts into the
//! outbox (`emit!` in any process, scheduled events coming due, dead
//! letters replayed) is captured, with no setting to agree on between
//! writers and relay. The message commits or rolls back with its
//! transaction and reaches the slot in commit order; no row, so nothing to
//! claim, settle or vacuum.
//!
//! A message is one line of JSON (the event's columns but the payload),
//! `\n`, then the payload's bytes as they are.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr};
use uuid::Uuid;

use crate::entity::outbox_message::Model;

/// The prefix of an event's message: `outbox:<schema>`, so that relays of
/// outboxes in several schemas of one database each read only their own.
pub(super) fn event_prefix(schema: &str) -> String {
    format!("outbox:{schema}")
}

/// The prefix of the relay's heartbeats (see `reader`).
pub(super) fn heartbeat_prefix(schema: &str) -> String {
    format!("outbox-heartbeat:{schema}")
}

/// Installs the capture trigger on the connection's `outbox_messages`
/// (idempotent). Only once the slot exists: a message written while no
/// slot does is lost.
pub(super) async fn install(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    conn.execute_unprepared(
        "CREATE OR REPLACE FUNCTION outbox_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_logical_emit_message(true, 'outbox:' || TG_TABLE_SCHEMA,
                 convert_to(json_build_array(NEW.id, NEW.event_type, NEW.event_version,
                     NEW.exchange, NEW.subject, NEW.partition_key, NEW.headers,
                     NEW.content_type, NEW.created_at)::text, 'UTF8')
                 || '\\x0a'::bytea || NEW.payload);
             RETURN NULL;
         END $$;
         CREATE OR REPLACE TRIGGER outbox_capture BEFORE INSERT ON outbox_messages
             FOR EACH ROW EXECUTE FUNCTION outbox_capture();",
    )
    .await?;
    Ok(())
}

/// Removes the capture trigger: events are rows in the table again, for
/// the polling relay.
pub(super) async fn remove(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    conn.execute_unprepared(
        "DROP TRIGGER IF EXISTS outbox_capture ON outbox_messages;
         DROP FUNCTION IF EXISTS outbox_capture();",
    )
    .await?;
    Ok(())
}

/// A captured message that is not one the trigger writes.
#[derive(Debug, thiserror::Error)]
#[error("a logical message under the outbox's prefix is not an event: {0}")]
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

/// The event a captured message holds, as the polling relay would have
/// read it from its row.
pub(super) fn decode(content: &[u8]) -> Result<Model, Malformed> {
    let split = (content.iter().position(|&b| b == b'\n'))
        .ok_or_else(|| Malformed("no line break after the columns".into()))?;
    let (columns, payload) = (&content[..split], &content[split + 1..]);
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
    Ok(Model {
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
    })
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn a_message_decodes_to_the_row_it_replaced() {
        let mut content = br#"["0193a0e4-7b3c-7000-8000-000000000001","OrderCreated",2,"orders","orders.order.created","o-1",null,"application/json","2026-12-06T23:27:26.123456+00:00"]"#.to_vec();
        content.push(b'\n');
        content.extend_from_slice(b"{\"a\":\n1}");
        let event = decode(&content).expect("decodes");
        assert_eq!(event.event_type, "OrderCreated");
        assert_eq!(event.event_version, 2);
        assert_eq!(event.partition_key.as_deref(), Some("o-1"));
        assert_eq!(
            event.payload, b"{\"a\":\n1}",
            "the payload is taken whole, line breaks and all"
        );
        assert_eq!(event.created_at.timestamp_subsec_micros(), 123_456);
    }

    #[test]
    fn a_foreign_message_is_an_error() {
        assert!(decode(b"no columns").is_err());
        assert!(decode(b"[1,2]\npayload").is_err());
    }
}
