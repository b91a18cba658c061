//! What the relay needs from a broker: publish a batch, report each event's fate.

use std::future::Future;

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
}

/// What became of one published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The broker stored it; `duplicate` when it had stored this id before.
    Stored {
        /// The broker recognised the id and dropped this copy.
        duplicate: bool,
    },
    /// The broker refused this event; retried with backoff, dead-lettered after the attempt bound.
    Rejected(String),
    /// Larger than the broker accepts: dead-lettered at once, since a retry cannot succeed.
    Oversized(String),
    /// The broker could not be reached or did not answer in time. Not the
    /// event's fault: not counted as an attempt; the relay backs off as a whole.
    Unavailable(String),
}
