//! The rule [`Publisher::publish_in_key_order`](super::Publisher::publish_in_key_order) follows, for publishers to
//! drive: which events may go out now, given the acknowledgements so far.

use std::collections::VecDeque;

use super::delivery::Delivery;

/// Tracks a batch published in key order: an event is ready once the event
/// before it of its key is stored, and never if that one was not.
///
/// ```
/// use outbox_core::relay::{Delivery, KeyOrder};
///
/// // Events 0 and 2 share a key; 1 has its own.
/// let mut order = KeyOrder::new(&[None, None, Some(0)]).unwrap();
/// assert_eq!(order.next_ready(), Some(0));
/// assert_eq!(order.next_ready(), Some(1));
/// assert_eq!(order.next_ready(), None); // 2 waits for 0
/// order.settle(0, Delivery::Rejected("full".into()));
/// order.settle(1, Delivery::Stored { duplicate: false });
/// assert_eq!(order.next_ready(), None); // and is held back
/// assert_eq!(order.into_outcome()[2], None);
///
/// // An event may only follow an earlier one, and no two the same.
/// assert!(KeyOrder::new(&[Some(1), None]).is_err());
/// assert!(KeyOrder::new(&[None, Some(0), Some(0)]).is_err());
/// ```
#[derive(Debug)]
pub struct KeyOrder {
    successors: Vec<Option<usize>>,
    ready: VecDeque<usize>,
    sent: Vec<bool>,
    outcome: Vec<Option<Delivery>>,
    in_flight: usize,
}

/// An `after` list that is not a set of chains: an event following itself,
/// a later event or one outside the batch, or two events following one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event {index} of the batch is to follow event {previous}, which is not an earlier \
     event of the batch that no other event follows"
)]
pub struct InvalidKeyOrder {
    /// The event.
    pub index: usize,
    /// The event it was to follow.
    pub previous: usize,
}

impl InvalidKeyOrder {
    /// What a publisher answers for a batch it cannot order: every event
    /// unavailable, so that none is charged an attempt and none is lost.
    pub fn outcome(&self, events: usize) -> Vec<Option<Delivery>> {
        vec![Some(Delivery::Unavailable(self.to_string())); events]
    }
}

impl KeyOrder {
    /// `after[i]`: the previous event of event `i`'s key in the batch, if any
    /// (as passed to [`Publisher::publish_in_key_order`](super::Publisher::publish_in_key_order)). Each must name an
    /// earlier event, and no event may be named twice.
    pub fn new(after: &[Option<usize>]) -> Result<Self, InvalidKeyOrder> {
        let mut successors = vec![None; after.len()];
        let mut ready = VecDeque::new();
        for (index, previous) in after.iter().enumerate() {
            match *previous {
                Some(previous) if previous < index && successors[previous].is_none() => {
                    successors[previous] = Some(index);
                }
                Some(previous) => return Err(InvalidKeyOrder { index, previous }),
                None => ready.push_back(index),
            }
        }
        Ok(Self {
            successors,
            ready,
            sent: vec![false; after.len()],
            outcome: vec![None; after.len()],
            in_flight: 0,
        })
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
        KeyOrder::new(after).expect("chains")
    }

    #[test]
    fn an_after_list_that_is_not_chains_is_refused() {
        let invalid = |index, previous| Err(InvalidKeyOrder { index, previous });
        assert_eq!(KeyOrder::new(&[Some(0)]).map(|_| ()), invalid(0, 0));
        assert_eq!(KeyOrder::new(&[None, Some(5)]).map(|_| ()), invalid(1, 5));
        assert_eq!(KeyOrder::new(&[Some(1), None]).map(|_| ()), invalid(0, 1));
        assert_eq!(
            KeyOrder::new(&[None, Some(0), Some(0)]).map(|_| ()),
            invalid(2, 0)
        );
        let outcome = InvalidKeyOrder {
            index: 2,
            previous: 0,
        }
        .outcome(3);
        assert!(
            outcome
                .iter()
                .all(|d| matches!(d, Some(Delivery::Unavailable(_))))
        );
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
        let outcome = order.into_outcome();
        assert_eq!(outcome[3], None);
        assert_eq!(outcome[4], Some(stored()));
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
        assert_eq!(
            order.into_outcome()[0],
            Some(Delivery::Rejected("no".into()))
        );
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
        let unavailable = Some(Delivery::Unavailable("silent".into()));
        assert_eq!(
            order.into_outcome(),
            [unavailable.clone(), None, Some(stored()), unavailable]
        );
    }
}
