//! The events read from the slot and not yet settled, in commit order,
//! and the position the relay may confirm: the end of the last
//! transaction whose events are all stored or dead-lettered. I/O-free.
//!
//! A transaction's events stay here until each is settled; the slot is
//! confirmed only past whole transactions, so a restart resends exactly
//! the transactions not wholly stored. Each round publishes the events due
//! in commit order, leaving out an event waiting for a retry and every
//! later event of its key: a key's events reach the stream in commit order.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::entity::outbox_message::Model;
use crate::relay::config::RelayConfig;
use crate::relay::publish::{Delivery, DeliveryError};
use crate::relay::report::BatchReport;
use crate::relay::store::{DeadLetter, dead_letter, stored_text};

/// The unsettled transactions, oldest first.
#[derive(Debug, Default)]
pub(super) struct Pending {
    txns: VecDeque<Txn>,
    unsettled: usize,
}

/// A committed transaction's events, or a position with none (a
/// heartbeat), which becomes confirmable once everything before it is.
#[derive(Debug)]
struct Txn {
    end: u64,
    events: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    event: Model,
    /// Not to be published before this (a rejection's backoff).
    not_before: Option<Instant>,
    settled: bool,
}

/// Where an event is: its transaction's and its own index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct At(usize, usize);

/// What a round settled that the database must record before the slot
/// is confirmed: the events to dead-letter.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub report: BatchReport,
    pub dead: Vec<DeadLetter>,
}

impl Pending {
    /// Adds a committed transaction's events (none for a heartbeat).
    pub(super) fn push(&mut self, end: u64, events: Vec<Model>) {
        self.unsettled += events.len();
        let events = (events.into_iter())
            .map(|event| Entry {
                event,
                not_before: None,
                settled: false,
            })
            .collect();
        self.txns.push_back(Txn { end, events });
    }

    /// Events read and not yet settled.
    pub(super) fn unsettled(&self) -> usize {
        self.unsettled
    }

    /// Up to `limit` events to publish now, in commit order: not settled,
    /// not waiting out a backoff, and not behind an event of their key
    /// that is.
    pub(super) fn due(&self, now: Instant, limit: usize) -> Vec<At> {
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut due = Vec::new();
        for (t, txn) in self.txns.iter().enumerate() {
            for (e, entry) in txn.events.iter().enumerate() {
                if entry.settled {
                    continue;
                }
                let key = entry.event.partition_key.as_deref();
                let waiting = entry.not_before.is_some_and(|at| at > now);
                if waiting || key.is_some_and(|key| blocked.contains(key)) {
                    blocked.extend(key);
                    continue;
                }
                due.push(At(t, e));
                if due.len() == limit {
                    return due;
                }
            }
        }
        due
    }

    /// The event at `at`.
    pub(super) fn event(&self, At(t, e): At) -> &Model {
        &self.txns[t].events[e].event
    }

    /// When the earliest backoff ends, if an event waits for one.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        (self.txns.iter().flat_map(|txn| &txn.events))
            .filter(|entry| !entry.settled)
            .filter_map(|entry| entry.not_before)
            .min()
    }

    /// Records what the broker did with the events at `sent`; `None`: held
    /// back behind an earlier event of its key, to go in a later round.
    pub(super) fn settle(
        &mut self,
        sent: &[At],
        deliveries: Vec<Option<Delivery>>,
        config: &RelayConfig,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        outcome.report.claimed = sent.len();
        let now = Utc::now();
        for (&At(t, e), delivery) in sent.iter().zip(deliveries) {
            let entry = &mut self.txns[t].events[e];
            let dead = |entry: &Entry, error: &DeliveryError| {
                dead_letter(entry.event.clone(), stored_text(error), now)
            };
            match delivery {
                None => outcome.report.held_back += 1,
                Some(Delivery::Stored { duplicate }) => {
                    outcome.report.published += 1;
                    outcome.report.duplicates += usize::from(duplicate);
                    entry.settled = true;
                }
                Some(Delivery::Oversized(error) | Delivery::Undeliverable(error)) => {
                    outcome.dead.push(dead(entry, &error));
                    entry.settled = true;
                }
                Some(Delivery::Rejected(error)) => {
                    let attempts = u32::try_from(entry.event.attempts).unwrap_or(0) + 1;
                    if attempts >= config.max_attempts {
                        outcome.dead.push(dead(entry, &error));
                        entry.settled = true;
                    } else {
                        if attempts == 1 {
                            tracing::warn!(event_id = %entry.event.id, subject = %entry.event.subject,
                                error = %crate::ErrorReport(&error), "the broker rejected an event; it will be retried");
                        }
                        outcome.report.retried += 1;
                        entry.event.attempts += 1;
                        entry.event.last_error = Some(stored_text(&error));
                        entry.not_before = Some(Instant::now() + config.retry.delay(attempts));
                    }
                }
                Some(Delivery::Unavailable(error)) => {
                    outcome.report.unavailable += 1;
                    outcome.report.last_error = Some(error);
                }
            }
            if entry.settled {
                self.unsettled -= 1;
            }
        }
        outcome.report.dead_lettered = outcome.dead.len();
        outcome
    }

    /// Drops the transactions at the front whose events are all settled;
    /// returns the end of the last one, the position to confirm.
    pub(super) fn confirmable(&mut self) -> Option<u64> {
        let mut end = None;
        while let Some(txn) = self.txns.front() {
            if !txn.events.iter().all(|entry| entry.settled) {
                break;
            }
            end = Some(txn.end);
            self.txns.pop_front();
        }
        end
    }
}

/// How long to wait before a round when nothing is due: until the
/// earliest retry, at most `idle`.
pub(super) fn wait_for(pending: &Pending, idle: Duration) -> Duration {
    pending.next_retry().map_or(idle, |at| {
        at.saturating_duration_since(Instant::now()).min(idle)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::{At, Pending};
    use crate::relay::config::RelayConfig;
    use crate::relay::fixture::event;
    use crate::relay::publish::Delivery;

    fn stored() -> Option<Delivery> {
        Some(Delivery::Stored { duplicate: false })
    }

    #[test]
    fn a_transaction_is_confirmable_once_all_its_events_are_settled() {
        let mut pending = Pending::default();
        pending.push(10, vec![event(1, None), event(2, None)]);
        pending.push(20, vec![]);
        pending.push(30, vec![event(3, None)]);
        let config = RelayConfig::default();
        let due = pending.due(Instant::now(), 10);
        assert_eq!(due, [At(0, 0), At(0, 1), At(2, 0)]);
        let unavailable = Some(Delivery::Unavailable("down".into()));
        pending.settle(&due, vec![stored(), unavailable, stored()], &config);
        assert_eq!(
            pending.confirmable(),
            None,
            "the first transaction is half stored"
        );
        assert_eq!(pending.unsettled(), 1);
        let due = pending.due(Instant::now(), 10);
        assert_eq!(due, [At(0, 1)]);
        pending.settle(&due, vec![stored()], &config);
        assert_eq!(
            pending.confirmable(),
            Some(30),
            "past the heartbeat and the third"
        );
        assert_eq!(pending.confirmable(), None);
    }

    #[test]
    fn an_event_waiting_for_a_retry_holds_back_its_key_but_not_others() {
        let mut pending = Pending::default();
        pending.push(10, vec![event(1, Some("a")), event(2, Some("b"))]);
        pending.push(20, vec![event(3, Some("a")), event(4, None)]);
        let config = RelayConfig::default();
        let due = pending.due(Instant::now(), 10);
        let rejected = Some(Delivery::Rejected("no".into()));
        // As the publisher answers: 3 held back behind 1, which was rejected.
        let outcome = pending.settle(&due, vec![rejected, stored(), None, stored()], &config);
        assert_eq!(outcome.report.retried, 1);
        assert_eq!(outcome.report.held_back, 1);
        assert!(outcome.dead.is_empty());
        assert!(
            pending.due(Instant::now(), 10).is_empty(),
            "1 waits; 3 waits behind it"
        );
        assert!(pending.next_retry().is_some());
        let later = Instant::now() + config.retry.ceiling(1) + std::time::Duration::from_secs(1);
        assert_eq!(pending.due(later, 10), [At(0, 0), At(1, 0)]);
    }

    #[test]
    fn an_oversized_event_is_dead_lettered_and_stops_nothing() {
        let mut pending = Pending::default();
        pending.push(10, vec![event(1, Some("a")), event(2, Some("a"))]);
        let config = RelayConfig::default();
        let due = pending.due(Instant::now(), 10);
        let oversized = Some(Delivery::Oversized("too big".into()));
        let outcome = pending.settle(&due, vec![oversized, stored()], &config);
        assert_eq!(outcome.dead.len(), 1);
        assert_eq!(outcome.report.dead_lettered, 1);
        assert_eq!(pending.confirmable(), Some(10));
    }

    #[test]
    fn a_rejection_past_the_attempt_bound_is_dead_lettered() {
        let mut pending = Pending::default();
        pending.push(10, vec![event(1, None)]);
        let config = RelayConfig {
            max_attempts: 2,
            ..RelayConfig::default()
        };
        let rejected = || Some(Delivery::Rejected("no".into()));
        let due = pending.due(Instant::now(), 10);
        assert!(
            pending
                .settle(&due, vec![rejected()], &config)
                .dead
                .is_empty()
        );
        let later = Instant::now() + config.retry.ceiling(1) + std::time::Duration::from_secs(1);
        let due = pending.due(later, 10);
        assert_eq!(
            pending.settle(&due, vec![rejected()], &config).dead.len(),
            1
        );
        assert_eq!(pending.confirmable(), Some(10));
    }
}
