//! Reading an outbox event's metadata off a JetStream message, and the dead
//! letter a message becomes.

use async_nats::jetstream::Message;
use chrono::{DateTime, Utc};
use outbox_core::entity::inbox_dead_letter;
use outbox_core::inbox::{DeadLetterReason, Metadata};
use uuid::Uuid;

/// Where a message sits in its stream and how often it was delivered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    pub(super) stream_sequence: u64,
    pub(super) delivered: u64,
}

pub(super) fn position(message: &Message) -> Option<Position> {
    let info = message.info().ok()?;
    Some(Position {
        stream_sequence: info.stream_sequence,
        delivered: u64::try_from(info.delivered).unwrap_or(1).max(1),
    })
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    Some(message.headers.as_ref()?.get(name)?.as_str())
}

/// The partition key, which orders the message among its key's.
pub(super) fn partition_key(message: &Message) -> Option<&str> {
    header(message, "Outbox-Partition-Key")
}

/// The event's metadata, or why the message is not an outbox event.
pub(super) fn metadata(
    message: &Message,
    position: Position,
    namespace: Option<&str>,
) -> Result<Metadata, String> {
    let required = |name: &str| header(message, name).ok_or_else(|| format!("no `{name}` header"));
    let id = required("Nats-Msg-Id")?;
    let id = Uuid::parse_str(id).map_err(|e| format!("`Nats-Msg-Id` {id:?} is not a UUID: {e}"))?;
    let version = required("Outbox-Event-Version")?;
    let version = (version.parse::<u16>())
        .map_err(|e| format!("`Outbox-Event-Version` {version:?} is not a version: {e}"))?;
    let subject = message.subject.as_str();
    let subject = namespace
        .and_then(|ns| subject.strip_prefix(ns)?.strip_prefix('.'))
        .unwrap_or(subject);
    Ok(Metadata {
        id,
        event_type: required("Outbox-Event-Type")?.to_owned(),
        version,
        subject: subject.to_owned(),
        key: partition_key(message).map(str::to_owned),
        delivery_count: position.delivered,
        occurred_at: header(message, "Outbox-Occurred-At")
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.with_timezone(&Utc)),
        stream_sequence: position.stream_sequence,
    })
}

/// The dead-letter row of `message`, with every header kept as JSON.
pub(super) fn dead_letter(
    consumer: &str,
    stream: &str,
    message: &Message,
    position: Position,
    reason: DeadLetterReason,
    error: String,
) -> inbox_dead_letter::Model {
    let headers: serde_json::Map<String, serde_json::Value> = (message.headers.iter())
        .flat_map(|map| map.iter())
        .filter_map(|(name, values)| {
            let value = values.first()?.as_str();
            Some((name.to_string(), value.into()))
        })
        .collect();
    inbox_dead_letter::Model {
        id: Uuid::now_v7(),
        consumer: consumer.to_owned(),
        stream: stream.to_owned(),
        stream_sequence: i64::try_from(position.stream_sequence).unwrap_or(i64::MAX),
        subject: message.subject.to_string(),
        event_id: header(message, "Nats-Msg-Id").and_then(|id| Uuid::parse_str(id).ok()),
        event_type: header(message, "Outbox-Event-Type").map(str::to_owned),
        event_version: header(message, "Outbox-Event-Version").and_then(|v| v.parse().ok()),
        partition_key: partition_key(message).map(str::to_owned),
        payload: message.payload.to_vec(),
        headers: serde_json::Value::Object(headers).to_string(),
        reason: reason.as_str().to_owned(),
        error,
        deliveries: i32::try_from(position.delivered).unwrap_or(i32::MAX),
        failed_at: Utc::now(),
    }
}
