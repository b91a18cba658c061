//! A relay publisher that keeps what it is given.

use std::sync::{Arc, Mutex};

use crate::entity::outbox_message::Model;
use crate::relay::{Delivery, Publisher};

type Matcher = Box<dyn Fn(&Model) -> bool + Send + Sync>;

/// A [`Publisher`] that stores every event in memory, in the order the
/// relay published them, unless told to answer an event otherwise.
///
/// ```
/// use outbox_core::relay::Delivery;
/// use outbox_core::testing::MemoryPublisher;
///
/// let publisher = MemoryPublisher::new()
///     .answer(|event| event.event_type == "PaymentFailed", Delivery::Rejected("no stream".into()));
/// let seen = publisher.clone(); // shares the record
/// assert!(seen.published().is_empty());
/// ```
///
/// A clone shares the record and the answers, so that a test keeps one
/// while the relay owns the other.
#[derive(Clone, Default)]
pub struct MemoryPublisher {
    published: Arc<Mutex<Vec<Model>>>,
    answers: Arc<Mutex<Vec<(Matcher, Delivery)>>>,
}

impl std::fmt::Debug for MemoryPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPublisher")
            .field("published", &self.published().len())
            .finish_non_exhaustive()
    }
}

impl MemoryPublisher {
    /// A publisher that stores everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers the events `matches` picks with `delivery` instead of storing
    /// them: [`Delivery::Rejected`] to test retries and dead letters,
    /// [`Delivery::Unavailable`] for an outage or an ack that timed out,
    /// [`Delivery::Undeliverable`] or [`Delivery::Oversized`] for an event no
    /// retry can send. The first matching rule answers; rules can be added
    /// while the relay runs.
    pub fn answer(
        self,
        matches: impl Fn(&Model) -> bool + Send + Sync + 'static,
        delivery: Delivery,
    ) -> Self {
        lock(&self.answers).push((Box::new(matches), delivery));
        self
    }

    /// Drops every rule: from now on every event is stored.
    pub fn answer_all_stored(&self) {
        lock(&self.answers).clear();
    }

    /// The events stored so far, in publish order.
    pub fn published(&self) -> Vec<Model> {
        lock(&self.published).clone()
    }
}

impl Publisher for MemoryPublisher {
    async fn publish(&self, events: &[&Model]) -> Vec<Delivery> {
        let answers = lock(&self.answers);
        let mut published = lock(&self.published);
        (events.iter())
            .map(|event| {
                let rule = answers.iter().find(|(matches, _)| matches(event));
                match rule {
                    Some((_, delivery)) => delivery.clone(),
                    None => {
                        let duplicate = published.iter().any(|stored| stored.id == event.id);
                        if !duplicate {
                            published.push((*event).clone());
                        }
                        Delivery::Stored { duplicate }
                    }
                }
            })
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
