//! The inbox: each consumed event takes effect once per consumer.
//!
//! A broker delivers at least once. The inbox turns that into an effect that
//! happens once: a message is handled in one database transaction that first
//! records `(consumer, event id)` in `outbox_inbox`. A redelivery finds the
//! row and skips the handler; otherwise the handler runs in that transaction
//! (a `#[transactional]` handler joins it through a savepoint, so the events
//! it emits commit with its effect and the inbox row), and the transport
//! acknowledges only after the commit.
//!
//! This module is transport-neutral: [`Handlers`] decodes through the
//! [registry](crate::registry()) and runs the handler of an event type and
//! version; `outbox-nats`' `Consumer` feeds it from a JetStream durable
//! consumer and acknowledges, retries or dead-letters by its [`Processed`]
//! answer.

mod dispatch;
mod guard;
mod handler;
mod store;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use dispatch::{
    DuplicateHandler, Fence, HandlerFailure, Handlers, Incoming, Processed, Unavailable, Unhandled,
};
pub use guard::{CONNECTIONS_NEEDED, ConsumerGuard, Taken, pool_is_large_enough};
pub use handler::{BoxError, Handler, HandlerFn};
pub use store::{dead_letter, purge, record, recorded};

/// What a handler learns about a message besides the event itself.
///
/// Made by a transport with [`Metadata::new`] and its fields set after
/// (`#[non_exhaustive]`: a field added later is not a breaking change).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metadata {
    /// The event id, assigned at `emit!` (`Nats-Msg-Id`); the inbox key.
    pub id: Uuid,
    /// The event type (`Outbox-Event-Type`).
    pub event_type: String,
    /// The schema version (`Outbox-Event-Version`).
    pub version: u16,
    /// The subject, as the event's `subject()` gave it (without a namespace prefix).
    pub subject: String,
    /// The partition key (`Outbox-Partition-Key`), if the event has one.
    pub key: Option<String>,
    /// Deliveries of this message so far, this one included: 1 on the first.
    pub delivery_count: u64,
    /// When `emit!` recorded the event (`Outbox-Occurred-At`), if the message says.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The message's position in its stream.
    pub stream_sequence: u64,
    /// The event's own headers, as given to `emit!(event, headers = ...)`:
    /// every header of the message but the framework's
    /// ([`headers::is_reserved`](crate::headers::is_reserved)).
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// The metadata of event `id` of `event_type` at `version` on `subject`,
    /// on its first delivery: no key, no emit time, stream sequence 0, no
    /// headers. A transport sets the rest.
    pub fn new(
        id: Uuid,
        event_type: impl Into<String>,
        version: u16,
        subject: impl Into<String>,
    ) -> Self {
        Self {
            id,
            event_type: event_type.into(),
            version,
            subject: subject.into(),
            key: None,
            delivery_count: 1,
            occurred_at: None,
            stream_sequence: 0,
            headers: BTreeMap::new(),
        }
    }
}

#[cfg(feature = "testing")]
impl Metadata {
    /// What a consumer would hand a handler with `event` on its first
    /// delivery, for calling a handler directly in a test: a new event id,
    /// the event's type, version, subject and key, delivery 1, stream
    /// sequence 1, emitted now, no headers. Change any field after.
    ///
    /// ```
    /// # #[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
    /// # #[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
    /// # struct OrderCreated { order_id: i64 }
    /// use outbox_core::inbox::Metadata;
    ///
    /// let mut meta = Metadata::for_event(&OrderCreated { order_id: 7 })?;
    /// meta.headers.insert("Tenant-Id".into(), "acme".into());
    /// assert_eq!(meta.subject, "orders.order.7.created");
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    ///
    /// Fails as `emit!` would: an invalid subject or partition key.
    pub fn for_event<E: crate::OutboxEvent>(event: &E) -> Result<Self, crate::Error> {
        let mut meta = Self::new(
            Uuid::now_v7(),
            event.event_type(),
            E::VERSION,
            event.subject()?,
        );
        meta.key = event.partition_key();
        meta.occurred_at = Some(Utc::now());
        meta.stream_sequence = 1;
        Ok(meta)
    }
}

/// Why a message was dead-lettered by a consumer (`outbox_inbox_dead_letters.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler failed on every delivery up to the consumer's bound.
    HandlerFailed,
    /// No handler of this consumer takes the event type.
    UnknownType,
    /// A handler takes the event type, but not in this version.
    UnsupportedVersion,
    /// The payload did not decode into the registered type.
    Undecodable,
    /// The message lacks a valid event id, type or version header.
    Malformed,
}

impl DeadLetterReason {
    /// The name stored in the `reason` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HandlerFailed => "handler_failed",
            Self::UnknownType => "unknown_type",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Undecodable => "undecodable",
            Self::Malformed => "malformed",
        }
    }

    /// Whether the message names an event this consumer has no handler for,
    /// which a consumer may be configured to skip rather than dead-letter.
    pub fn is_unhandled_type(self) -> bool {
        matches!(self, Self::UnknownType | Self::UnsupportedVersion)
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
