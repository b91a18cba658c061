//! The messages a consumer holds, reading an outbox event's metadata off
//! them, and the dead letter a message becomes.

use std::collections::BTreeMap;

use async_nats::Message;
use async_nats::jetstream::{self, message::AckKind};
use chrono::{DateTime, Utc};
use outbox_core::entity::inbox_dead_letter;
use outbox_core::headers;
use outbox_core::inbox::{DeadLetterReason, Metadata};
use uuid::Uuid;

/// Where a message sits in its stream and how often it was delivered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    pub(super) stream_sequence: u64,
    pub(super) delivered: u64,
}

/// One copy of a message, held from receipt until it is acknowledged,
/// dead-lettered or handed back.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) origin: Origin,
    pub(super) position: Position,
    /// The partition key (`Outbox-Partition-Key`), which orders the message among its key's.
    pub(super) key: Option<String>,
    /// Failed attempts in this process; JetStream does not see local retries.
    pub(super) failures: u64,
    /// When its ack deadline was last extended (or it was received).
    pub(super) extended_at: tokio::time::Instant,
}

/// Where a held copy came from.
#[derive(Debug)]
pub(super) enum Origin {
    /// Delivered by the durable consumer: acknowledged through it.
    Delivered(Box<jetstream::Message>),
    /// Read from the stream at recovery, for a delivery this process never
    /// saw: it cannot be acknowledged; the durable's own copy, redelivered
    /// later, finds the inbox row and is acknowledged then.
    Recovered(Message),
    /// A dead letter an operator asked to replay (`outbox_core::dead_letters::inbox`):
    /// nothing to acknowledge; its row is deleted once it is handled.
    Replayed { message: Message, dead_letter: Uuid },
}

impl Held {
    /// A copy the durable consumer delivered, and its consumer sequence.
    pub(super) fn delivered(message: jetstream::Message) -> Option<(Self, u64)> {
        let info = message.info().ok()?;
        let position = Position {
            stream_sequence: info.stream_sequence,
            delivered: u64::try_from(info.delivered).unwrap_or(1).max(1),
        };
        let consumer_sequence = info.consumer_sequence;
        Some((
            Self::new(Origin::Delivered(Box::new(message)), position),
            consumer_sequence,
        ))
    }

    /// A copy read from the stream at `stream_sequence`.
    pub(super) fn recovered(message: Message, stream_sequence: u64) -> Self {
        let position = Position {
            stream_sequence,
            delivered: 1,
        };
        Self::new(Origin::Recovered(message), position)
    }

    /// The message a dead letter kept, to be handled again.
    pub(super) fn replayed(letter: inbox_dead_letter::Model) -> Self {
        let headers: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&letter.headers).unwrap_or_default();
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in &headers {
            if let Some(value) = value.as_str() {
                map.insert(name.as_str(), value);
            }
        }
        let message = Message {
            subject: letter.subject.into(),
            reply: None,
            length: letter.payload.len(),
            payload: letter.payload.into(),
            headers: Some(map),
            status: None,
            description: None,
        };
        let position = Position {
            stream_sequence: u64::try_from(letter.stream_sequence).unwrap_or(0),
            delivered: 1,
        };
        let origin = Origin::Replayed {
            message,
            dead_letter: letter.id,
        };
        Self::new(origin, position)
    }

    fn new(origin: Origin, position: Position) -> Self {
        let key = header(origin.message(), headers::PARTITION_KEY).map(str::to_owned);
        Self {
            origin,
            position,
            key,
            failures: 0,
            extended_at: tokio::time::Instant::now(),
        }
    }

    pub(super) fn message(&self) -> &Message {
        self.origin.message()
    }

    /// The event type (`Outbox-Event-Type`), if the message names one.
    pub(super) fn event_type(&self) -> Option<&str> {
        header(self.message(), headers::EVENT_TYPE)
    }

    /// The event id (`Nats-Msg-Id`), if the message has a valid one.
    pub(super) fn event_id(&self) -> Option<Uuid> {
        Uuid::parse_str(header(self.message(), headers::MSG_ID)?).ok()
    }

    /// Deliveries so far, this one included: JetStream's count plus local retries.
    pub(super) fn delivery_count(&self) -> u64 {
        self.position.delivered + self.failures
    }

    /// Acknowledges (or naks, terms, extends) a delivered copy; a recovered
    /// or replayed copy has nothing to acknowledge. An error means JetStream
    /// redelivers.
    pub(super) async fn ack(&self, kind: AckKind) -> Result<(), async_nats::Error> {
        match &self.origin {
            Origin::Delivered(message) => message.ack_with(kind).await,
            Origin::Recovered(_) | Origin::Replayed { .. } => Ok(()),
        }
    }

    /// The dead letter this copy replays, if it does.
    pub(super) fn replays(&self) -> Option<Uuid> {
        match &self.origin {
            Origin::Replayed { dead_letter, .. } => Some(*dead_letter),
            Origin::Delivered(_) | Origin::Recovered(_) => None,
        }
    }
}

impl Origin {
    fn message(&self) -> &Message {
        match self {
            Self::Delivered(message) => message,
            Self::Recovered(message) | Self::Replayed { message, .. } => message,
        }
    }
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    Some(message.headers.as_ref()?.get(name)?.as_str())
}

/// Why a message is not an outbox event: its dead letter's reason is `malformed`.
#[derive(Debug, thiserror::Error)]
pub(super) enum Malformed {
    #[error("no `{0}` header")]
    Missing(&'static str),
    #[error("`Nats-Msg-Id` {value:?} is not a UUID")]
    EventId {
        value: String,
        #[source]
        source: uuid::Error,
    },
    #[error("`Outbox-Event-Version` {value:?} is not a version")]
    Version {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// The event's metadata, or why the message is not an outbox event.
pub(super) fn metadata(held: &Held, namespace: Option<&str>) -> Result<Metadata, Malformed> {
    let message = held.message();
    let required = |name: &'static str| header(message, name).ok_or(Malformed::Missing(name));
    let id = required(headers::MSG_ID)?;
    let id = Uuid::parse_str(id).map_err(|source| Malformed::EventId {
        value: id.to_owned(),
        source,
    })?;
    let version = required(headers::EVENT_VERSION)?;
    let version = version
        .parse::<u16>()
        .map_err(|source| Malformed::Version {
            value: version.to_owned(),
            source,
        })?;
    let subject = message.subject.as_str();
    let subject = namespace
        .and_then(|ns| subject.strip_prefix(ns)?.strip_prefix('.'))
        .unwrap_or(subject);
    let mut meta = Metadata::new(id, required(headers::EVENT_TYPE)?, version, subject);
    meta.key = held.key.clone();
    meta.delivery_count = held.delivery_count();
    meta.occurred_at = header(message, headers::OCCURRED_AT)
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc));
    meta.stream_sequence = held.position.stream_sequence;
    meta.headers = own_headers(message);
    Ok(meta)
}

/// The event's own headers: all but the framework's, each with its first value.
fn own_headers(message: &Message) -> BTreeMap<String, String> {
    (message.headers.iter())
        .flat_map(|map| map.iter())
        .filter(|(name, _)| !outbox_core::headers::is_reserved(name.as_ref()))
        .filter_map(|(name, values)| Some((name.to_string(), values.first()?.to_string())))
        .collect()
}

/// The dead-letter row of `message`, with every header kept as JSON.
pub(super) fn dead_letter(
    consumer: &str,
    stream: &str,
    held: &Held,
    reason: DeadLetterReason,
    error: String,
) -> inbox_dead_letter::Model {
    let message = held.message();
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
        stream_sequence: i64::try_from(held.position.stream_sequence).unwrap_or(i64::MAX),
        subject: message.subject.to_string(),
        event_id: held.event_id(),
        event_type: header(message, headers::EVENT_TYPE).map(str::to_owned),
        event_version: header(message, headers::EVENT_VERSION).and_then(|v| v.parse().ok()),
        partition_key: held.key.clone(),
        payload: message.payload.to_vec(),
        headers: serde_json::Value::Object(headers).to_string(),
        reason: reason.as_str().to_owned(),
        error,
        deliveries: i32::try_from(held.delivery_count()).unwrap_or(i32::MAX),
        failed_at: Utc::now(),
        replay_requested_at: None,
    }
}
