//! The messages a consumer holds, reading an outbox event's metadata off
//! them, and the dead letter a message becomes.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::transport::{Message, Pulled};
use crate::entity::inbox_dead_letter;
use crate::headers;
use crate::inbox::{DeadLetterReason, Metadata};

/// Where a message sits in its stream and how often it was delivered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    pub(super) stream_sequence: u64,
    pub(super) delivered: u64,
}

/// One copy of a message, held from receipt until it is acknowledged,
/// dead-lettered or handed back.
#[derive(Debug)]
pub(super) struct Held<M> {
    pub(super) origin: Origin<M>,
    pub(super) position: Position,
    /// The partition key (`Outbox-Partition-Key`), which orders the message among its key's.
    pub(super) key: Option<String>,
    /// Failed attempts in this process; the broker does not see local retries.
    pub(super) failures: u64,
    /// When its ack deadline was last extended (or it was received).
    pub(super) extended_at: tokio::time::Instant,
}

/// Where a held copy came from.
#[derive(Debug)]
pub(super) enum Origin<M> {
    /// Delivered by the broker: settled through the transport.
    Delivered(M),
    /// Read from the stream at recovery, for a delivery this process never
    /// saw: it cannot be settled; the broker's own copy, redelivered later,
    /// finds the inbox row and is acknowledged then.
    Recovered(M),
    /// A dead letter an operator asked to replay (`crate::dead_letters::inbox`):
    /// nothing to settle; its row is deleted once it is handled.
    Replayed { message: Stored, dead_letter: Uuid },
}

/// A message as a dead letter kept it.
#[derive(Debug)]
pub(super) struct Stored {
    subject: String,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

impl Message for Stored {
    fn subject(&self) -> &str {
        &self.subject
    }

    fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, value)| value.as_str())
    }

    fn for_each_header(&self, each: &mut dyn FnMut(&str, &str)) {
        for (name, value) in &self.headers {
            each(name, value);
        }
    }

    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl<M: Message> Held<M> {
    /// A copy the broker delivered, and its consumer sequence.
    pub(super) fn delivered(pulled: Pulled<M>) -> (Self, u64) {
        let position = Position {
            stream_sequence: pulled.stream_sequence,
            delivered: pulled.delivered.max(1),
        };
        let held = Self::new(Origin::Delivered(pulled.message), position);
        (held, pulled.consumer_sequence)
    }

    /// A copy read from the stream at `stream_sequence`.
    pub(super) fn recovered(message: M, stream_sequence: u64) -> Self {
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
        let headers = (headers.into_iter())
            .filter_map(|(name, value)| Some((name, value.as_str()?.to_owned())))
            .collect();
        let message = Stored {
            subject: letter.subject,
            headers,
            payload: letter.payload,
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

    fn new(origin: Origin<M>, position: Position) -> Self {
        let key = origin.message().header(headers::PARTITION_KEY);
        Self {
            key: key.map(str::to_owned),
            origin,
            position,
            failures: 0,
            extended_at: tokio::time::Instant::now(),
        }
    }

    pub(super) fn message(&self) -> &dyn Message {
        self.origin.message()
    }

    /// The event type (`Outbox-Event-Type`), if the message names one.
    pub(super) fn event_type(&self) -> Option<&str> {
        self.message().header(headers::EVENT_TYPE)
    }

    /// The event id (`Nats-Msg-Id`), if the message has a valid one.
    pub(super) fn event_id(&self) -> Option<Uuid> {
        Uuid::parse_str(self.message().header(headers::MSG_ID)?).ok()
    }
}

impl<M> Held<M> {
    /// Deliveries so far, this one included: the broker's count plus local retries.
    pub(super) fn delivery_count(&self) -> u64 {
        self.position.delivered + self.failures
    }

    /// The broker's copy, if there is one to settle: a recovered or
    /// replayed copy has nothing to settle.
    pub(super) fn delivery(&self) -> Option<&M> {
        match &self.origin {
            Origin::Delivered(message) => Some(message),
            Origin::Recovered(_) | Origin::Replayed { .. } => None,
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

impl<M: Message> Origin<M> {
    fn message(&self) -> &dyn Message {
        match self {
            Self::Delivered(message) | Self::Recovered(message) => message,
            Self::Replayed { message, .. } => message,
        }
    }
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
pub(super) fn metadata<M: Message>(
    held: &Held<M>,
    namespace: Option<&str>,
) -> Result<Metadata, Malformed> {
    let message = held.message();
    let required = |name: &'static str| message.header(name).ok_or(Malformed::Missing(name));
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
    let subject = message.subject();
    let subject = namespace
        .and_then(|ns| subject.strip_prefix(ns)?.strip_prefix('.'))
        .unwrap_or(subject);
    let mut meta = Metadata::new(id, required(headers::EVENT_TYPE)?, version, subject);
    meta.key = held.key.clone();
    meta.delivery_count = held.delivery_count();
    meta.occurred_at = (message.header(headers::OCCURRED_AT))
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc));
    meta.stream_sequence = held.position.stream_sequence;
    meta.headers = own_headers(message);
    Ok(meta)
}

/// The event's own headers: all but the framework's, each with its first value.
fn own_headers(message: &dyn Message) -> BTreeMap<String, String> {
    let mut own = BTreeMap::new();
    message.for_each_header(&mut |name, value| {
        if !headers::is_reserved(name) {
            own.entry(name.to_owned())
                .or_insert_with(|| value.to_owned());
        }
    });
    own
}

/// The dead-letter row of `held`, with every header kept as JSON.
pub(super) fn dead_letter<M: Message>(
    consumer: &str,
    stream: &str,
    held: &Held<M>,
    reason: DeadLetterReason,
    error: String,
) -> inbox_dead_letter::Model {
    let message = held.message();
    let mut headers = serde_json::Map::new();
    message.for_each_header(&mut |name, value| {
        headers.entry(name).or_insert_with(|| value.into());
    });
    inbox_dead_letter::Model {
        id: Uuid::now_v7(),
        consumer: consumer.to_owned(),
        stream: stream.to_owned(),
        stream_sequence: i64::try_from(held.position.stream_sequence).unwrap_or(i64::MAX),
        subject: message.subject().to_owned(),
        event_id: held.event_id(),
        event_type: message.header(headers::EVENT_TYPE).map(str::to_owned),
        event_version: (message.header(headers::EVENT_VERSION)).and_then(|v| v.parse().ok()),
        partition_key: held.key.clone(),
        payload: message.payload().to_vec(),
        headers: serde_json::Value::Object(headers).to_string(),
        reason: reason.as_str().to_owned(),
        error,
        deliveries: i32::try_from(held.delivery_count()).unwrap_or(i32::MAX),
        failed_at: Utc::now(),
        replay_requested_at: None,
    }
}
