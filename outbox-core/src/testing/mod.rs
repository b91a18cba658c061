//! A test kit for services built on the outbox (feature `testing`): what a
//! service's own `cargo test` needs with a real database and no broker.
//!
//! - [`emitted`]: the events of a type that committed in the outbox, decoded,
//!   in emit order — "placing an order emitted exactly this `OrderCreated`";
//!   [`emitted_in_full`] adds each one's id, subject, key, headers and, for
//!   events emitted for later, when they are due.
//! - [`Metadata::for_event`](crate::inbox::Metadata::for_event): what a
//!   handler is given with an event, for calling a handler directly.
//! - [`MemoryPublisher`]: a relay [`Publisher`](crate::relay::Publisher)
//!   that records what it was given and answers chosen events with a
//!   rejection, an outage or an undeliverable verdict, to test one's retry
//!   and dead-letter handling.
//! - [`TestConsumer`]: a consumer's handlers run through the inbox without a
//!   broker: give it an event, get back what became of it.
//! - [`TestDatabase`]: a fresh, migrated schema (PostgreSQL), database
//!   (MySQL) or file (SQLite) per test, dropped after it.
//! - [`relayed`]: waits, bounded, until everything committed so far has
//!   left the outbox, for end-to-end tests that do run a relay.
//! - [`Proxy`]: a TCP proxy a test cuts and restores, to put one process
//!   out of a server's reach while the others go on.

mod consumer;
mod database;
mod emitted;
mod proxy;
mod publisher;

use std::time::Duration;

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use tokio::time::Instant;

pub use consumer::TestConsumer;
pub use database::TestDatabase;
pub use emitted::{Emitted, emitted, emitted_in_full};
pub use proxy::Proxy;
pub use publisher::MemoryPublisher;

use crate::Error;
use crate::entity::outbox_message::{Column, Entity};

/// Events committed before [`relayed`] was called were still in the outbox
/// when it stopped waiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pending} events committed before the wait were still in the outbox after {waited:?}")]
pub struct NotRelayed {
    /// Those events.
    pub pending: u64,
    /// How long it waited.
    pub waited: Duration,
}

/// Waits until every event committed before this call has left the outbox
/// (delivered, or dead-lettered), checking every 20 ms for up to `timeout`.
/// Events committed during the wait are not waited for.
///
/// Fails with [`NotRelayed`] (as [`Error::NotRelayed`]) when `timeout`
/// passes first, and with [`Error::Database`] when the outbox cannot be read.
pub async fn relayed(db: &impl ConnectionTrait, timeout: Duration) -> Result<(), Error> {
    let started = Instant::now();
    // PostgreSQL has no `max(uuid)`: the newest by the primary key instead.
    let newest = Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::DeliveredAt.is_null())
        .order_by_desc(Column::Id)
        .into_tuple::<uuid::Uuid>()
        .one(db)
        .await?;
    let Some(newest) = newest else {
        return Ok(());
    };
    loop {
        let pending = Entity::find()
            .filter(Column::Id.lte(newest))
            .filter(Column::DeliveredAt.is_null())
            .count(db)
            .await?;
        if pending == 0 {
            return Ok(());
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(NotRelayed { pending, waited }.into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
