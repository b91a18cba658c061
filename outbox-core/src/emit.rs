//! `emit!` and the per-transaction buffer of emitted events.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use uuid::Uuid;

use crate::entity::outbox_message;
use crate::{Error, OutboxEvent};

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
    (@transactional $emitter:ident, $($event:tt)+) => {
        $crate::__private::Emitter::emit($emitter, $($event)+)
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
    events: Vec<outbox_message::ActiveModel>,
    /// The first event that could not be recorded; it fails the whole call.
    error: Option<Error>,
}

impl Emitter {
    /// Serializes and records `event`, returning its id.
    pub fn emit<E: OutboxEvent>(&self, event: E) -> Uuid {
        let id = Uuid::now_v7();
        let row = to_row(id, Utc::now(), &event);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match row {
            Ok(row) => state.events.push(row),
            Err(error) => {
                state.error.get_or_insert(error);
            }
        }
        id
    }

    /// The recorded rows, or the first error that makes the call fail.
    pub(crate) fn into_rows(self) -> Result<Vec<outbox_message::ActiveModel>, Error> {
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match state.error {
            Some(error) => Err(error),
            None => Ok(state.events),
        }
    }
}

fn to_row<E: OutboxEvent>(
    id: Uuid,
    now: DateTime<Utc>,
    event: &E,
) -> Result<outbox_message::ActiveModel, Error> {
    Ok(outbox_message::ActiveModel {
        id: Set(id),
        event_type: Set(event.event_type().to_owned()),
        event_version: Set(i32::from(E::VERSION)),
        exchange: Set(E::EXCHANGE.to_owned()),
        subject: Set(event.subject()?),
        partition_key: Set(partition_key(event)?),
        payload: Set(event.to_payload()?),
        headers: Set(None),
        content_type: Set(E::CONTENT_TYPE.to_owned()),
        created_at: Set(now),
        next_attempt_at: Set(now),
        ..Default::default()
    })
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
