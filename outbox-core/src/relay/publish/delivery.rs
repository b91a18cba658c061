//! What became of one published event: the answer a [`Publisher`](super::Publisher)
//! gives per event, which the relay settles by.

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
