//! What the consumer holds, and when each message may run: queued behind
//! its key, ready to start, or waiting out a retry delay with its key held.

use std::collections::{BTreeMap, VecDeque};

use tokio::time::Instant;

use super::held::Held;
use super::keys::KeyQueues;

/// Every message the consumer holds that is not running.
#[derive(Debug)]
pub(super) struct Pending<M> {
    keys: KeyQueues<Held<M>>,
    /// May start as soon as there is room; their keys are busy with them.
    ready: VecDeque<Held<M>>,
    /// Failed, to run again at the instant; their keys stay busy meanwhile.
    /// The second part of the map key only tells equal instants apart.
    retries: BTreeMap<(Instant, u64), Held<M>>,
    retry_ids: u64,
}

impl<M> Pending<M> {
    pub(super) fn new() -> Self {
        Self {
            keys: KeyQueues::new(),
            ready: VecDeque::new(),
            retries: BTreeMap::new(),
            retry_ids: 0,
        }
    }

    /// Messages held and not running.
    pub(super) fn len(&self) -> usize {
        self.keys.queued() + self.ready.len() + self.retries.len()
    }

    /// Messages that wait only for room to start.
    pub(super) fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Whether a message waits only for room to start.
    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Takes a message delivered by the durable consumer: it runs when its
    /// key's earlier messages are resolved (unkeyed ones at once).
    pub(super) fn receive(&mut self, held: Held<M>) {
        let ready = match held.key.clone() {
            Some(key) => self.keys.push(&key, held.position.stream_sequence, held),
            None => Some(held),
        };
        self.ready.extend(ready);
    }

    /// Takes a message read back from the stream at recovery, unless this
    /// process holds it already (delivered copies are kept: they can be acked).
    pub(super) fn recovered(&mut self, held: Held<M>) {
        let sequence = held.position.stream_sequence;
        if !(held.key.as_deref()).is_some_and(|key| self.keys.holds(key, sequence)) {
            self.receive(held);
        }
    }

    /// `held` is resolved: its key's next message may run.
    pub(super) fn resolve(&mut self, held: &Held<M>) {
        if let Some(key) = &held.key {
            self.ready.extend(self.keys.finish(key));
        }
    }

    /// `held` failed and runs again at `at`; its key stays busy until then.
    pub(super) fn retry(&mut self, held: Held<M>, at: Instant) {
        self.retry_ids += 1;
        self.retries.insert((at, self.retry_ids), held);
    }

    /// When the next retry is due.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.first_key_value().map(|((at, _), _)| *at)
    }

    /// Makes the retries due at `now` ready.
    pub(super) fn due(&mut self, now: Instant) {
        while let Some(entry) = self.retries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    /// The next message to start.
    pub(super) fn pop_ready(&mut self) -> Option<Held<M>> {
        self.ready.pop_front()
    }

    /// Held messages whose ack deadline was last extended before `before`;
    /// each is stamped `now`, and the caller extends them.
    pub(super) fn due_for_extension(&mut self, before: Instant, now: Instant) -> Vec<&Held<M>> {
        let mut due = Vec::new();
        let held = (self.keys.queued_mut())
            .chain(self.ready.iter_mut())
            .chain(self.retries.values_mut());
        for held in held {
            if held.extended_at < before {
                held.extended_at = now;
                due.push(&*held);
            }
        }
        due
    }

    /// Gives up the messages of the keys `key_gone` names, and the unkeyed
    /// ones `unkeyed_gone` names, with their keys' places: a group member's
    /// partitions that went to another member, whose messages must not run
    /// here ahead of the copies read again if it takes them back.
    pub(super) fn forget(
        &mut self,
        key_gone: impl Fn(&str) -> bool,
        unkeyed_gone: impl Fn(&Held<M>) -> bool,
    ) {
        let gone_keys: Vec<String> = (self.keys.keys())
            .filter(|key| key_gone(key))
            .map(str::to_owned)
            .collect();
        for key in &gone_keys {
            self.keys.forget(key);
        }
        let gone = |held: &Held<M>| match held.key.as_deref() {
            Some(key) => key_gone(key),
            None => unkeyed_gone(held),
        };
        self.ready.retain(|held| !gone(held));
        self.retries.retain(|_, held| !gone(held));
    }

    /// Gives up every held message (at shutdown).
    pub(super) fn drain(&mut self) -> Vec<Held<M>> {
        let mut all = self.keys.drain();
        all.extend(self.ready.drain(..));
        all.extend(std::mem::take(&mut self.retries).into_values());
        all
    }
}
