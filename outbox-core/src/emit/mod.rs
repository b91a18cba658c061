//! `emit!` and the per-transaction buffer of emitted events.

mod options;

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use uuid::Uuid;

use crate::entity::{outbox_message, outbox_scheduled};
use crate::{Error, OutboxEvent};
pub use options::EmitOptions;
use options::Resolved;

/// Records an event in the enclosing `#[transactional]` function's transaction.
///
/// The event gets its id (a UUIDv7, returned) now, and is written to the
/// outbox in the same transaction as the function's other writes when it
/// returns `Ok`. If it returns `Err`, panics or is cancelled, the event never
/// existed. If the event cannot be serialized, or a routing-key placeholder
/// yields an invalid subject token, the function returns that error and
/// nothing commits.
///
/// `emit!` is only meaningful inside a `#[transactional]` function, whose
/// macro gives it the transaction; anywhere else it does not compile.
///
/// ```
/// use outbox_core::{emit, transactional, OutboxEvent};
/// use sea_orm::DatabaseConnection;
///
/// #[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
/// #[outbox(exchange = "orders", routing_key = "order.created")]
/// struct OrderCreated { order_id: u64 }
///
/// #[transactional]
/// async fn place_order(db: &DatabaseConnection, order_id: u64) -> Result<(), outbox_core::Error> {
///     emit!(OrderCreated { order_id });
///     Ok(())
/// }
/// ```
///
/// # Scheduled events
///
/// `emit!(event, at = time)` (a `chrono::DateTime<Utc>`) and
/// `emit!(event, after = delay)` (a `std::time::Duration`) commit the event
/// with the transaction, like any other, and the relay delivers it no earlier
/// than that time. Until then it waits in `outbox_scheduled`, outside the
/// relay's claim, and [`cancel`](crate::cancel()) can take it back. A time
/// already past delivers at once.
///
/// A scheduled keyed event joins its key's order when it comes due: it goes
/// after the events of its key already delivered and before those still
/// waiting, and it holds nothing back before then.
///
/// ```
/// # use outbox_core::{emit, transactional, OutboxEvent};
/// # use sea_orm::DatabaseConnection;
/// # #[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
/// # #[outbox(exchange = "orders", routing_key = "order.reminder")]
/// # struct PaymentReminder { order_id: u64 }
/// use std::time::Duration;
///
/// #[transactional]
/// async fn remind_later(db: &DatabaseConnection, order_id: u64) -> Result<uuid::Uuid, outbox_core::Error> {
///     // Delivered in a day, unless cancelled with `outbox_core::cancel(db, id)` before.
///     let id = emit!(PaymentReminder { order_id }, after = Duration::from_secs(24 * 3600));
///     Ok(id)
/// }
/// ```
///
/// # Headers
///
/// `emit!(event, headers = [("Tenant-Id", tenant)])` sends the pairs (any
/// `IntoIterator` of `(name, value)` with both `Into<String>`) as headers of
/// the event's message, and the consumer hands them to the handler in
/// [`Metadata::headers`](crate::inbox::Metadata::headers). They are checked
/// at `emit!`: a name that NATS cannot carry, one of the framework's own
/// (`Nats-*`, `Outbox-*`, `Content-Type`), a name given twice or a value
/// with a line break makes the function return [`Error::Header`] (which
/// never shows the value), and nothing commits. `headers` combines with
/// `at` or `after`.
///
/// ```compile_fail
/// # use outbox_core::{emit, OutboxEvent};
/// # #[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
/// # #[outbox(exchange = "orders", routing_key = "order.created")]
/// # struct OrderCreated { order_id: u64 }
/// fn not_transactional() {
///     emit!(OrderCreated { order_id: 1 }); // error: only inside a #[transactional] fn
/// }
/// ```
#[macro_export]
macro_rules! emit {
    // The forms `#[transactional]` leaves, its options' names checked
    // (`outbox-macros`' `emit_call`); each option is a method of `EmitOptions`.
    (@transactional $emitter:ident, $event:expr) => {
        $crate::__private::Emitter::emit($emitter, $event)
    };
    (@transactional $emitter:ident, $event:expr $(, $option:ident = $value:expr)+) => {
        $crate::__private::Emitter::emit_with(
            $emitter,
            $event,
            $crate::__private::EmitOptions::default() $(.$option($value))+,
        )
    };
    // A call `#[transactional]` reported a compile error for.
    (@rejected) => {
        $crate::__private::Uuid::nil()
    };
    ($($tokens:tt)*) => {
        ::core::compile_error! {
            "`emit!` can only be used in the body of a `#[transactional]` async fn, \
             whose transaction it writes the event in; \
             add `#[transactional]` to the enclosing function, or, if `emit!` sits in \
             another macro's arguments (`tokio::join!`, say), move it out: \
             `#[transactional]` does not rewrite other macros' arguments"
        }
    };
}

/// The events recorded by one `#[transactional]` call, in emit order.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Emitter {
    state: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    rows: Rows,
    /// The first event that could not be recorded; it fails the whole call.
    error: Option<Error>,
}

/// The rows one `#[transactional]` call writes: events to deliver now, and
/// events for later.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub(crate) events: Vec<outbox_message::Model>,
    pub(crate) scheduled: Vec<outbox_scheduled::ActiveModel>,
}

impl Emitter {
    /// Serializes and records `event`, returning its id.
    pub fn emit<E: OutboxEvent>(&self, event: E) -> Uuid {
        self.emit_with(event, EmitOptions::default())
    }

    /// Serializes and records `event` with `options`, returning its id.
    pub fn emit_with<E: OutboxEvent>(&self, event: E, options: EmitOptions) -> Uuid {
        let id = Uuid::now_v7();
        let now = Utc::now();
        let row = options
            .resolve(event.event_type(), now)
            .and_then(|resolved| {
                let Resolved {
                    deliver_at,
                    headers,
                } = resolved;
                Ok((Columns::of(id, now, &event, headers)?, deliver_at))
            });
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match row {
            Ok((columns, Some(at))) => state.rows.scheduled.push(columns.scheduled(at)),
            Ok((columns, None)) => state.rows.events.push(columns.message()),
            Err(error) => {
                state.error.get_or_insert(error);
            }
        }
        id
    }

    /// The recorded rows, or the first error that makes the call fail.
    pub(crate) fn into_rows(self) -> Result<Rows, Error> {
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match state.error {
            Some(error) => Err(error),
            None => Ok(state.rows),
        }
    }
}

/// What `emit!` stores of an event, wherever it goes.
struct Columns {
    id: Uuid,
    event_type: String,
    event_version: i32,
    exchange: String,
    subject: String,
    partition_key: Option<String>,
    payload: Vec<u8>,
    headers: Option<String>,
    content_type: String,
    created_at: DateTime<Utc>,
}

impl Columns {
    fn of<E: OutboxEvent>(
        id: Uuid,
        now: DateTime<Utc>,
        event: &E,
        headers: Option<String>,
    ) -> Result<Self, Error> {
        Ok(Self {
            id,
            event_type: event.event_type().to_owned(),
            event_version: i32::from(E::VERSION),
            exchange: E::EXCHANGE.to_owned(),
            subject: event.subject()?,
            partition_key: partition_key(event)?,
            payload: event.to_payload()?,
            headers,
            content_type: E::CONTENT_TYPE.to_owned(),
            created_at: now,
        })
    }

    /// An outbox row, due now.
    fn message(self) -> outbox_message::Model {
        outbox_message::Model {
            id: self.id,
            event_type: self.event_type,
            event_version: self.event_version,
            exchange: self.exchange,
            subject: self.subject,
            partition_key: self.partition_key,
            payload: self.payload,
            headers: self.headers,
            content_type: self.content_type,
            created_at: self.created_at,
            attempts: 0,
            next_attempt_at: self.created_at,
            last_error: None,
            delivered_at: None,
        }
    }

    fn scheduled(self, deliver_at: DateTime<Utc>) -> outbox_scheduled::ActiveModel {
        outbox_scheduled::ActiveModel {
            id: Set(self.id),
            event_type: Set(self.event_type),
            event_version: Set(self.event_version),
            exchange: Set(self.exchange),
            subject: Set(self.subject),
            partition_key: Set(self.partition_key),
            payload: Set(self.payload),
            headers: Set(self.headers),
            content_type: Set(self.content_type),
            created_at: Set(self.created_at),
            deliver_at: Set(deliver_at),
        }
    }
}

/// The event's key, refused at emit (and so with the caller's transaction)
/// when the relay could not send it as a header.
fn partition_key<E: OutboxEvent>(event: &E) -> Result<Option<String>, Error> {
    match event.partition_key() {
        Some(key) if key.contains(['\r', '\n']) => Err(Error::PartitionKey {
            event_type: event.event_type(),
            value: key,
        }),
        key => Ok(key),
    }
}
