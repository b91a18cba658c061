//! The broker's side of the relay: the [`Publisher`] trait, the [`Batch`] it
//! is given, the [`Delivery`] it answers per event, and the [`KeyOrder`] that
//! publishers follow to keep each key in order. Imports nothing else of the
//! relay.

mod batch;
mod delivery;
mod key_order;

use std::future::Future;

pub use batch::Batch;
pub use delivery::{Delivery, DeliveryError};
pub use key_order::KeyOrder;

use crate::entity::outbox_message;

/// A broker the relay delivers to. `outbox-nats` implements it for JetStream.
///
/// Implementations publish a whole batch with many acknowledgements in flight
/// at once (never one round trip per event), in the order given, and use the
/// event id as the broker's deduplication key, so that re-publishing an event
/// after a lost acknowledgement stores it once.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `events` in order; returns one [`Delivery`] per event, in the same order.
    fn publish(
        &self,
        events: &[&outbox_message::Model],
    ) -> impl Future<Output = Vec<Delivery>> + Send;

    /// Publishes `batch` so that each partition key stays in order: an event
    /// is sent only once the previous event of its key ([`Batch::after`]) is
    /// [`Delivery::Stored`], and is held back (`None`) when that one was not.
    /// Returns one entry per event of the batch, in its order;
    /// [`Batch::key_order`] tracks all of this.
    ///
    /// The provided method publishes in waves through [`publish`](Self::publish):
    /// wave *n* holds the events whose predecessor wave *n − 1* got stored,
    /// and all its acknowledgements are awaited before the next wave goes out.
    /// A broker client that can follow each acknowledgement as it comes in
    /// should send an event's successor right then instead (the JetStream
    /// publisher does): waiting for whole waves leaves the broker idle at the
    /// end of each, and following each ack drained a backlog about 5 % faster.
    fn publish_in_key_order(
        &self,
        batch: &Batch<'_>,
    ) -> impl Future<Output = Vec<Option<Delivery>>> + Send {
        publish_in_waves(self, batch)
    }
}

/// [`Publisher::publish_in_key_order`] for a publisher that can only await
/// whole batches: each wave is every event ready when the previous wave's
/// acknowledgements are all in.
async fn publish_in_waves<P: Publisher + ?Sized>(
    publisher: &P,
    batch: &Batch<'_>,
) -> Vec<Option<Delivery>> {
    let mut order = batch.key_order();
    loop {
        let mut wave: Vec<usize> = std::iter::from_fn(|| order.next_ready()).collect();
        if wave.is_empty() {
            break;
        }
        wave.sort_unstable();
        let members: Vec<&outbox_message::Model> =
            wave.iter().map(|&i| batch.events()[i]).collect();
        let deliveries = publisher.publish(&members).await;
        let all_unavailable = (deliveries.iter()).all(|d| matches!(d, Delivery::Unavailable(_)));
        for (i, delivery) in wave.into_iter().zip(deliveries) {
            order.settle(i, delivery);
        }
        if all_unavailable {
            break; // the broker is down: the rest of the batch waits for the next round
        }
    }
    order.into_outcome()
}
