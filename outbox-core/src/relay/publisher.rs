//! What the relay needs from a broker: publish a batch, report each event's fate.

use std::future::Future;

use super::waves;
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

    /// Publishes `events` so that each partition key stays in order: event
    /// `i` is sent only once `after[i]` (the previous event of its key in
    /// `events`, if any) is [`Delivery::Stored`], and is held back (`None`)
    /// when that one was not. `after[i] < i`, and no two events name the same
    /// event in `after`.
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
        events: &[&outbox_message::Model],
        after: &[Option<usize>],
    ) -> impl Future<Output = Vec<Option<Delivery>>> + Send {
        waves::publish_in_waves(self, events, after)
    }
}

/// What became of one published event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Not publishable as it stands (a header or subject the broker's
    /// protocol cannot carry): dead-lettered at once, since a retry cannot
    /// succeed, so that its key's later events need not wait out the retries.
    Undeliverable(String),
    /// The broker could not be reached or did not answer in time. Not the
    /// event's fault: not counted as an attempt; the relay backs off as a whole.
    Unavailable(String),
}
