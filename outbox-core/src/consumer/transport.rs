//! The seam between the consumer and a broker: what the consumer's loop asks
//! of a transport, and nothing of how the broker does it.
//!
//! As the relay runs over a [`Publisher`](crate::relay::Publisher), the
//! consumer runs over a [`Transport`]: pull deliveries, settle each one,
//! read back the unsure span, flush. Key order, batching, retries, dead
//! letters, replays, the inbox and its purge, recovery decisions and metrics
//! are the consumer's (`outbox_core::consumer`), the same for every broker.

use futures::stream::BoxStream;

use crate::inbox::BoxError;

/// A message as the consumer reads it: subject, headers, payload.
pub trait Message: Send + Sync + 'static {
    /// The subject it was published on, namespace included.
    fn subject(&self) -> &str;
    /// The first value of header `name`, if it has one.
    fn header(&self, name: &str) -> Option<&str>;
    /// Calls `each` with every header's name and first value.
    fn for_each_header(&self, each: &mut dyn FnMut(&str, &str));
    /// The event, as serialized.
    fn payload(&self) -> &[u8];
}

/// How the consumer ends (or prolongs) a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settle {
    /// Handled, a duplicate, or skipped: never deliver it again.
    Ack,
    /// Not handled here: deliver it again, now (at shutdown).
    Redeliver,
    /// Still being worked on: push its redelivery deadline back.
    Extend,
    /// Dead-lettered: never deliver it again, and do not count it handled.
    Terminate,
}

/// A delivery pulled from the broker, with where it sits.
#[derive(Debug)]
pub struct Pulled<M> {
    /// The message.
    pub message: M,
    /// Its place in the stream.
    pub stream_sequence: u64,
    /// How often the broker delivered it, this time included (at least 1).
    pub delivered: u64,
    /// The consumer's own count of deliveries: a gap means a delivery went
    /// to another process (or was lost on the wire), and the unsure span
    /// must be read back.
    pub consumer_sequence: u64,
    /// Messages the stream holds after this one for the consumer: its lag.
    pub pending: u64,
}

/// The deliveries the consumer may not have seen: from just above its
/// acknowledged floor to its last delivery, read back from the stream.
#[derive(Debug)]
pub struct Span<M> {
    /// The span's messages with their stream sequences, in stream order.
    pub messages: Vec<(M, u64)>,
    /// The consumer sequence of the last delivery when the span was read.
    pub delivered_consumer_sequence: u64,
}

/// Why pulling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The pull is gone (the broker's consumer was deleted, nobody
    /// answers): the consumer opens a new one after a pause.
    #[error("the pull ended")]
    Closed(#[source] BoxError),
    /// This attempt failed; the pull goes on after a pause.
    #[error("pulling failed")]
    Failed(#[source] BoxError),
}

/// Deliveries as an open pull yields them.
pub type Pull<M> = BoxStream<'static, Result<Pulled<M>, PullError>>;

/// A broker the consumer runs over. `outbox-nats` implements it for a
/// JetStream durable pull consumer.
pub trait Transport: Send + Sync + 'static {
    /// What a delivery carries; also what the unsure span holds.
    type Message: Message;

    /// Opens a pull of deliveries, asking for up to `batch` at a time. It
    /// ends (`None`) or fails [`PullError::Closed`] when the consumer must
    /// open another.
    fn open(
        &self,
        batch: usize,
    ) -> impl Future<Output = Result<Pull<Self::Message>, BoxError>> + Send;

    /// Settles a delivery. An error means the broker delivers it again,
    /// which the inbox makes harmless.
    fn settle(
        &self,
        message: &Self::Message,
        how: Settle,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Reads the unsure span back from the stream.
    fn unsure_span(&self) -> impl Future<Output = Result<Span<Self::Message>, BoxError>> + Send;

    /// Reads the stream from `sequence` on, in order, without
    /// acknowledgements: how a consumer group member reads, its progress kept
    /// in the database ([`group`](super::group)). Its deliveries are never
    /// settled.
    fn read_from(
        &self,
        sequence: u64,
    ) -> impl Future<Output = Result<Pull<Self::Message>, BoxError>> + Send;

    /// Sends what settles are buffered, at shutdown.
    fn flush(&self) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Whether the broker is reachable, as the client last knew it (no
    /// I/O): a consumer group member cut off from it for a lease hands its
    /// partitions over. `true` for a transport that cannot tell.
    fn reachable(&self) -> bool {
        true
    }
}
