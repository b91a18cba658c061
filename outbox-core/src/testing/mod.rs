//! A test kit for services built on the outbox (feature `testing`): what a
//! service's own `cargo test` needs with a real database and no broker.
//!
//! - [`emitted`]: the events of a type that committed in the outbox, decoded,
//!   in emit order — "placing an order emitted exactly this `OrderCreated`".
//! - [`MemoryPublisher`]: a relay [`Publisher`](crate::relay::Publisher)
//!   that records what it was given and answers chosen events with a
//!   rejection, an outage or an undeliverable verdict, to test one's retry
//!   and dead-letter handling.
//! - [`TestConsumer`]: a consumer's handlers run through the inbox without a
//!   broker: give it an event, get back what became of it.
//! - [`relayed`]: waits, bounded, until everything committed so far has
//!   left the outbox, for end-to-end tests that do run a relay.

mod consumer;
mod publisher;

use std::time::Duration;

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use tokio::time::Instant;

pub use consumer::TestConsumer;
pub use publisher::MemoryPublisher;

use crate::entity::outbox_message::{Column, Entity};
use crate::{Error, OutboxEvent};

/// The events of type `E` (every event type it carries, at `E::VERSION`)
/// that are in the outbox — committed and not yet delivered — decoded, in
/// emit order. Events scheduled for later are not there until they come
/// due: they wait in [`outbox_scheduled`](crate::entity::outbox_scheduled).
///
/// Fails if one does not decode into `E`, or if `E` is not in the registry.
pub async fn emitted<E: OutboxEvent>(db: &impl ConnectionTrait) -> Result<Vec<E>, Error> {
    let rows = Entity::find()
        .filter(Column::EventType.is_in(E::EVENT_TYPES.iter().copied()))
        .filter(Column::EventVersion.eq(i32::from(E::VERSION)))
        .filter(Column::DeliveredAt.is_null())
        .order_by_asc(Column::Id)
        .all(db)
        .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let descriptor = (crate::registry().get(&row.event_type, E::VERSION))
            .ok_or_else(|| Error::NotRegistered(std::any::type_name::<E>()))?;
        let event = (descriptor.decode)(&row.payload)?;
        let event = event
            .downcast::<E>()
            .map_err(|_| Error::NotRegistered(std::any::type_name::<E>()))?;
        events.push(*event);
    }
    Ok(events)
}

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
