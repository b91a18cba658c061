//! The rule [`Publisher::publish_in_key_order`](super::Publisher::publish_in_key_order)
//! follows, for publishers to drive: which events may go out now, given the
//! acknowledgements so far.

use std::collections::VecDeque;

use super::delivery::Delivery;

/// Tracks a [`Batch`](super::Batch) published in key order: an event is ready
/// once the event before it of its key is stored, and never if that one was
/// not. Made by [`Batch::key_order`](super::Batch::key_order).
///
/// ```
/// # use outbox_core::entity::outbox_message::Model;
/// use outbox_core::relay::{Batch, Delivery};
/// # fn event(key: Option<&str>) -> Model {
/// #     let now = chrono::Utc::now();
/// #     Model { id: uuid::Uuid::now_v7(), event_type: "E".into(), event_version: 1,
/// #         exchange: "x".into(), subject: "x.e".into(), partition_key: key.map(Into::into),
/// #         payload: Vec::new(), headers: None, content_type: "application/json".into(),
/// #         created_at: now, attempts: 0, next_attempt_at: now, last_error: None,
/// #         delivered_at: None }
/// # }
/// // Events 0 and 2 share a key; 1 has none.
/// let events = [event(Some("a")), event(None), event(Some("a"))];
/// let batch = Batch::new(events.iter().collect());
/// let mut order = batch.key_order();
/// assert_eq!(order.next_ready(), Some(0));
/// assert_eq!(order.next_ready(), Some(1));
/// assert_eq!(order.next_ready(), None); // 2 waits for 0
/// order.settle(0, Delivery::Rejected("full".into()));
/// order.settle(1, Delivery::Stored { duplicate: false });
/// assert_eq!(order.next_ready(), None); // and is held back
/// assert!(order.into_outcome()[2].is_none());
/// ```
#[derive(Debug)]
pub struct KeyOrder {
    successors: Vec<Option<usize>>,
    ready: VecDeque<usize>,
    sent: Vec<bool>,
    outcome: Vec<Option<Delivery>>,
    in_flight: usize,
}

impl KeyOrder {
    /// `after[i]`: the previous event of event `i`'s key, if any. [`Batch`](super::Batch)
    /// builds it, so each names an earlier event that no other event names.
    pub(super) fn new(after: &[Option<usize>]) -> Self {
        let mut successors = vec![None; after.len()];
        let mut ready = VecDeque::new();
        for (index, previous) in after.iter().enumerate() {
            match *previous {
                Some(previous) => successors[previous] = Some(index),
                None => ready.push_back(index),
            }
        }
        Self {
            successors,
            ready,
            sent: vec![false; after.len()],
            outcome: vec![None; after.len()],
            in_flight: 0,
        }
    }

    /// The next event to send, taken as sent: oldest first of those ready.
    pub fn next_ready(&mut self) -> Option<usize> {
        let index = self.ready.pop_front()?;
        self.sent[index] = true;
        self.in_flight += 1;
        Some(index)
    }

    /// Events sent and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records what became of a sent event; once it is stored, its key's next
    /// event is ready. Returns whether it was recorded: a delivery for an
    /// event not sent, or a second one, is ignored.
    pub fn settle(&mut self, index: usize, delivery: Delivery) -> bool {
        if !self.sent.get(index).copied().unwrap_or(false) || self.outcome[index].is_some() {
            return false;
        }
        if matches!(delivery, Delivery::Stored { .. })
            && let Some(next) = self.successors[index]
        {
            self.ready.push_back(next);
        }
        self.outcome[index] = Some(delivery);
        self.in_flight -= 1;
        true
    }

    /// The broker stopped answering: `delivery` for every event sent and not
    /// answered, and for every event ready and not sent. Their keys' later
    /// events stay held back.
    pub fn abandon(&mut self, delivery: &Delivery) {
        while self.next_ready().is_some() {}
        for (sent, outcome) in self.sent.iter().zip(&mut self.outcome) {
            if *sent && outcome.is_none() {
                *outcome = Some(delivery.clone());
            }
        }
        self.in_flight = 0;
    }

    /// Each event's delivery; `None` for those held back.
    pub fn into_outcome(self) -> Vec<Option<Delivery>> {
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Delivery {
        Delivery::Stored { duplicate: false }
    }

    fn order(after: &[Option<usize>]) -> KeyOrder {
        KeyOrder::new(after)
    }

    /// An outcome in words, to compare (an error compares by its text).
    fn said(outcome: &[Option<Delivery>]) -> Vec<String> {
        (outcome.iter())
            .map(|delivery| match delivery {
                None => "held back".to_owned(),
                Some(Delivery::Stored { duplicate }) => format!("stored (duplicate: {duplicate})"),
                Some(Delivery::Rejected(error)) => format!("rejected: {error}"),
                Some(Delivery::Unavailable(error)) => format!("unavailable: {error}"),
                Some(other) => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_key_advances_one_stored_event_at_a_time() {
        // Key A: 0, 2, 3; key B: 1, 4; unkeyed: 5.
        let mut order = order(&[None, None, Some(0), Some(2), Some(1), None]);
        let first: Vec<usize> = std::iter::from_fn(|| order.next_ready()).collect();
        assert_eq!(first, [0, 1, 5]);
        order.settle(1, stored());
        order.settle(0, stored());
        assert_eq!(order.next_ready(), Some(4), "in the order the acks came");
        assert_eq!(order.next_ready(), Some(2));
        assert_eq!(order.next_ready(), None);
        order.settle(2, Delivery::Unavailable("timeout".into()));
        order.settle(4, stored());
        order.settle(5, stored());
        assert_eq!(order.next_ready(), None, "3 stays behind the unavailable 2");
        let outcome = said(&order.into_outcome());
        assert_eq!(outcome[3], "held back");
        assert_eq!(outcome[4], "stored (duplicate: false)");
    }

    #[test]
    fn a_second_delivery_or_one_for_an_event_not_sent_changes_nothing() {
        let mut order = order(&[None, Some(0)]);
        assert!(!order.settle(0, stored()), "not sent yet");
        assert_eq!(order.next_ready(), Some(0));
        assert!(order.settle(0, Delivery::Rejected("no".into())));
        assert!(!order.settle(0, stored()));
        assert!(!order.settle(7, stored()));
        assert_eq!(order.in_flight(), 0);
        assert_eq!(order.next_ready(), None);
        assert_eq!(said(&order.into_outcome())[0], "rejected: no");
    }

    #[test]
    fn abandoning_settles_what_is_in_flight_or_ready_and_holds_back_the_rest() {
        // Key A: 0, 1; unkeyed: 2, 3.
        let mut order = order(&[None, Some(0), None, None]);
        assert_eq!(order.next_ready(), Some(0));
        assert_eq!(order.next_ready(), Some(2));
        assert!(order.settle(2, stored()));
        order.abandon(&Delivery::Unavailable("silent".into()));
        assert_eq!(order.in_flight(), 0);
        let unavailable = "unavailable: silent";
        assert_eq!(
            said(&order.into_outcome()),
            [
                unavailable,
                "held back",
                "stored (duplicate: false)",
                unavailable
            ]
        );
    }
}
