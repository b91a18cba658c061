//! What became of one published event: the answer a [`Publisher`](super::Publisher)
//! gives per event, which the relay settles by.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::BoxError;

/// What became of one published event.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Delivery {
    /// The broker stored it; `duplicate` when it had stored this id before.
    Stored {
        /// The broker recognised the id and dropped this copy.
        duplicate: bool,
    },
    /// The broker refused this event; retried with backoff, dead-lettered after the attempt bound.
    Rejected(DeliveryError),
    /// Larger than the broker accepts: dead-lettered at once, since a retry cannot succeed.
    Oversized(DeliveryError),
    /// Not publishable as it stands (a header or subject the broker's
    /// protocol cannot carry): dead-lettered at once, since a retry cannot
    /// succeed, so that its key's later events need not wait out the retries.
    Undeliverable(DeliveryError),
    /// The broker could not be reached or did not answer in time. Not the
    /// event's fault: not counted as an attempt; the relay backs off as a whole.
    Unavailable(DeliveryError),
}

/// Why a publish did not store an event: the publisher's own error, with
/// its causes, shared by every event it concerns (one outage fails a whole
/// batch). Its text, causes included, is what logs and the outbox's
/// `last_error` column get; [`get_ref`](Self::get_ref) gives the error
/// itself, to downcast to the publisher's type (`outbox_nats::Refusal`
/// carries JetStream's error code, say).
#[derive(Debug, Clone)]
pub struct DeliveryError(Arc<dyn Error + Send + Sync>);

impl DeliveryError {
    /// Wraps a publisher's error (or a `String`, or a `&str`).
    pub fn new(error: impl Into<BoxError>) -> Self {
        Self(Arc::from(error.into()))
    }

    /// The publisher's error.
    pub fn get_ref(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Error for DeliveryError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl From<&str> for DeliveryError {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl From<String> for DeliveryError {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}
