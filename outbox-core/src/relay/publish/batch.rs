//! A batch as a [`Publisher`](super::Publisher) sees it: the events in emit
//! order, each keyed one chained to the previous event of its key.

use std::collections::HashMap;

use super::key_order::KeyOrder;
use crate::entity::outbox_message::Model;

/// Events to publish, in emit order, with each keyed event's predecessor: the
/// previous event of its key in the batch, which must be stored before it is
/// sent. Built from the events' partition keys, so the chains always hold.
///
/// ```
/// # use outbox_core::entity::outbox_message::Model;
/// use outbox_core::relay::Batch;
/// # fn event(key: Option<&str>) -> Model {
/// #     let now = chrono::Utc::now();
/// #     Model { id: uuid::Uuid::now_v7(), event_type: "E".into(), event_version: 1,
/// #         exchange: "x".into(), subject: "x.e".into(), partition_key: key.map(Into::into),
/// #         payload: Vec::new(), headers: None, content_type: "application/json".into(),
/// #         created_at: now, attempts: 0, next_attempt_at: now, last_error: None,
/// #         delivered_at: None }
/// # }
/// let (a1, b, a2) = (event(Some("a")), event(None), event(Some("a")));
/// let batch = Batch::new(vec![&a1, &b, &a2]);
/// assert_eq!(batch.after(2), Some(0)); // a2 goes out once a1 is stored
/// assert_eq!(batch.after(1), None);
/// ```
#[derive(Debug, Clone)]
pub struct Batch<'a> {
    events: Vec<&'a Model>,
    after: Vec<Option<usize>>,
}

impl<'a> Batch<'a> {
    /// Chains `events` (in emit order) by partition key.
    pub fn new(events: Vec<&'a Model>) -> Self {
        let mut last_of_key: HashMap<&str, usize> = HashMap::with_capacity(events.len());
        let after = (events.iter().enumerate())
            .map(|(index, event)| {
                let key = event.partition_key.as_deref()?;
                last_of_key.insert(key, index)
            })
            .collect();
        Self { events, after }
    }

    /// `events` with none waiting on another, whatever their keys: for a
    /// publisher whose [`publish`](super::Publisher::publish) goes through
    /// its own [`publish_in_key_order`](super::Publisher::publish_in_key_order).
    pub fn unordered(events: &[&'a Model]) -> Self {
        Self {
            events: events.to_vec(),
            after: vec![None; events.len()],
        }
    }

    /// The events, in emit order.
    pub fn events(&self) -> &[&'a Model] {
        &self.events
    }

    /// The number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there is no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The event that event `index` follows: the previous event of its key.
    pub fn after(&self, index: usize) -> Option<usize> {
        self.after.get(index).copied().flatten()
    }

    /// A tracker of which events may go out as the acknowledgements come in.
    pub fn key_order(&self) -> KeyOrder {
        KeyOrder::new(&self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::Batch;
    use crate::relay::fixture::event;

    #[test]
    fn each_keyed_event_follows_the_previous_event_of_its_key() {
        let keys = [Some("a"), Some("b"), None, Some("a"), Some("b"), Some("a")];
        let events: Vec<_> = (keys.iter().zip(1..))
            .map(|(key, id)| event(id, *key))
            .collect();
        let batch = Batch::new(events.iter().collect());
        let after: Vec<_> = (0..batch.len()).map(|i| batch.after(i)).collect();
        assert_eq!(after, [None, None, None, Some(0), Some(1), Some(3)]);
        let unordered = Batch::unordered(batch.events());
        assert!((0..unordered.len()).all(|i| unordered.after(i).is_none()));
    }
}
