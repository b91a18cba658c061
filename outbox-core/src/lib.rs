//! The transactional outbox for SeaORM services that publish to NATS JetStream.
//!
//! Write events in the same database transaction as the data they describe;
//! a relay then delivers them to the broker at least once, and the broker
//! drops duplicates by event id.
//!
//! ```
//! use outbox_core::{emit, transactional, OutboxEvent};
//! use sea_orm::{ConnectionTrait, DatabaseConnection};
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
//! #[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
//! pub struct OrderCreated {
//!     pub order_id: i64,
//!     pub total_cents: i64,
//! }
//!
//! #[transactional]
//! pub async fn place_order(db: &DatabaseConnection, order_id: i64) -> Result<(), outbox_core::Error> {
//!     // Here `db` is the transaction: every statement joins it.
//!     db.execute_unprepared("UPDATE stock SET reserved = reserved + 1").await?;
//!     emit!(OrderCreated { order_id, total_cents: 1250 });
//!     Ok(()) // Ok: the update and the event commit together. Err or panic: neither.
//! }
//! ```
//!
//! - [`OutboxEvent`] (derive it) describes an event's routing and payload.
//! - [`transactional`] runs a function body in one transaction; [`emit!`] records events in it,
//!   to deliver now or at a later time ([`cancel`] takes one of those back).
//! - [`migrate`] creates the outbox tables; [`migrations`] hands them to your own migrator.
//! - [`registry()`] lists every event type linked into the program.
//! - [`inbox`] makes each consumed event take effect once per consumer;
//!   [`consumer`] runs a consumer's loop over a broker's
//!   [`consumer::Transport`] (`outbox-nats` provides the JetStream one).
//! - [`relay::Relay`] delivers committed events through a [`relay::Publisher`]
//!   (`outbox-nats` provides the JetStream one). A `#[transactional]` commit wakes
//!   the relays of its database in its process; [`wake_relays`] wakes them all,
//!   after a commit of your own.
#![deny(missing_docs)]

mod background;
mod backoff;
mod cancel;
pub mod capture;
pub mod consumer;
pub mod dead_letters;
mod dialect;
mod emit;
pub mod entity;
mod error;
mod event;
pub mod headers;
pub mod inbox;
mod insert;
mod migration;
pub mod registry;
pub mod relay;
mod scope;
mod signal;
mod status;
mod subject;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "opentelemetry")]
pub mod trace;

pub use backoff::Backoff;
pub use cancel::cancel;
pub use error::{BoxError, Error, ErrorReport, Result};
pub use event::OutboxEvent;
pub use migration::{check_schema, migrate, migrations};
pub use registry::{EventDescriptor, registry};
pub use signal::{CommitSignal, wake_relays};
pub use status::{ConsumerStatus, GroupStatus, PartitionStatus, Status, status};

/// The `uuid` crate (with `v7`) of the ids `emit!` returns and the inbox
/// keys on: `outbox_core::uuid::Uuid`, without a dependency of your own.
pub use uuid;

/// Derives [`OutboxEvent`] for a struct or an enum.
///
/// ```
/// # use outbox_core::OutboxEvent;
/// #[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
/// #[outbox(exchange = "orders", key = order_id)]
/// enum OrderEvent {
///     #[outbox(routing_key = "order.{order_id}.created", name = "OrderCreated")]
///     Created { order_id: u64, total_cents: i64 },
///     #[outbox(routing_key = "order.{order_id}.cancelled", name = "OrderCancelled")]
///     Cancelled { order_id: u64 },
/// }
/// ```
///
/// Container keys of `#[outbox(...)]`:
///
/// | key | meaning |
/// |---|---|
/// | `exchange = "orders"` | required: the subject prefix and, upper-cased, the stream |
/// | `routing_key = "order.{order_id}.created"` | required (on the type or on every variant): the rest of the subject; `{field}` placeholders are filled from the event |
/// | `key = order_id` | the partition key: events sharing it are delivered in commit order |
/// | `name = "OrderCreated"` | the event type consumers dispatch on (default: the type's or variant's name) |
/// | `version = 2` | the schema version, 1 to 65535 (default 1) |
/// | `stream = "ORDERS"` | the JetStream stream (default: the exchange upper-cased) |
/// | `crate = "path::to::outbox_core"` | where `outbox_core` is, when used through a re-export |
///
/// Enum variants take `routing_key`, `name` and `key`.
pub use outbox_macros::OutboxEvent;

/// Runs an `async fn` body in one database transaction, with [`emit!`] writing events in it.
///
/// The function must return `Result<T, E>` with `E: From<outbox_core::Error>`.
/// Its connection is the one parameter of type `&DatabaseConnection`,
/// `&DatabaseTransaction`, or `&C` with `C: TransactionTrait`; or the
/// expression given as `#[transactional(conn = self.db)]`. Inside the body,
/// that name stands for the transaction.
///
/// - `Ok`: the events are inserted (one multi-row statement per 2,500 events)
///   and the transaction commits; relays in this process are woken.
/// - `Err`, `?`, a panic, or a dropped future: nothing commits.
/// - Called with a transaction (one `#[transactional]` function calling
///   another), the body runs in a savepoint: its events commit with the outer
///   transaction, and its `Err` rolls back only its own part.
///
/// Arguments: `conn = <expr>` names the connection, `crate = "path"` where
/// `outbox_core` is when used through a re-export.
///
/// Equivalent code without the macro:
///
/// ```ignore
/// async fn place_order(db: &DatabaseConnection, id: i64) -> Result<(), AppError> {
///     let outcome = match Scope::begin(db.begin()).await {
///         Ok(scope) => {
///             let result: Result<(), AppError> = {
///                 let db = scope.transaction();
///                 async move { /* body; emit! records into scope.emitter() */ }.await
///             };
///             scope.finish(result).await // Ok: insert events, commit. Err: roll back.
///         }
///         Err(error) => Err(error),
///     };
///     match outcome {
///         Ok(result) => result,
///         Err(error) => Err(AppError::from(error)), // begin or commit failed
///     }
/// }
/// ```
pub use outbox_macros::transactional;

/// Items the macros' expansions name. Not public API: no stability promise.
#[doc(hidden)]
pub mod __private {
    pub use crate::emit::{EmitOptions, Emitter};
    pub use crate::registry::DescriptorParts;
    pub use crate::scope::{Outcome, Scope};
    pub use crate::signal::{AnyConnection, Database, KnownConnection, Probe};
    pub use crate::subject::SubjectBuilder;
    pub use inventory;
    pub use sea_orm::TransactionTrait;
    pub use std::string::String;
    pub use uuid::Uuid;

    use std::any::Any;

    use crate::Error;

    /// The registry decoder of a JSON event type.
    pub fn decode_json<T>(payload: &[u8]) -> Result<Box<dyn Any + Send>, Error>
    where
        T: serde::de::DeserializeOwned + crate::OutboxEvent,
    {
        serde_json::from_slice::<T>(payload)
            .map(|event| Box::new(event) as Box<dyn Any + Send>)
            .map_err(|source| Error::Decode {
                event_type: T::EVENT_TYPES.join("|"),
                version: T::VERSION,
                source,
            })
    }
}
