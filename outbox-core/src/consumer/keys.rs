//! Per-key order with several messages in flight: messages sharing a
//! partition key run one at a time, in stream order. A key stays busy while
//! its message runs *and* while that message waits to be retried, so a later
//! message of the key never overtakes an unresolved earlier one, however
//! long the retries take: no timer ever releases a key.

use std::collections::{BTreeMap, HashMap};

/// Messages held back by their key, and which keys are busy.
#[derive(Debug)]
pub(super) struct KeyQueues<T> {
    keys: HashMap<String, Key<T>>,
    queued: usize,
}

#[derive(Debug)]
struct Key<T> {
    /// The stream sequence of the key's message that runs or waits to be retried.
    busy: Option<u64>,
    /// Received, not started: stream sequence → message.
    queue: BTreeMap<u64, T>,
}

impl<T> KeyQueues<T> {
    pub(super) fn new() -> Self {
        Self {
            keys: HashMap::new(),
            queued: 0,
        }
    }

    /// Messages received and not started.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }

    /// Whether the key's message at `sequence` is busy or queued.
    pub(super) fn holds(&self, key: &str, sequence: u64) -> bool {
        self.keys.get(key).is_some_and(|state| {
            state.busy == Some(sequence) || state.queue.contains_key(&sequence)
        })
    }

    /// Adds a received message; returns it if it may start now (its key is
    /// then busy with it). A copy of a message already queued replaces it.
    pub(super) fn push(&mut self, key: &str, sequence: u64, message: T) -> Option<T> {
        let state = self.keys.entry(key.to_owned()).or_insert_with(|| Key {
            busy: None,
            queue: BTreeMap::new(),
        });
        if state.queue.insert(sequence, message).is_none() {
            self.queued += 1;
        }
        self.next(key)
    }

    /// Marks the key's busy message resolved (handled, skipped, dead-lettered
    /// or handed back); returns the key's next message if there is one.
    pub(super) fn finish(&mut self, key: &str) -> Option<T> {
        self.keys.get_mut(key)?.busy = None;
        self.next(key)
    }

    /// Every queued message, for extending their ack deadlines.
    pub(super) fn queued_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.keys.values_mut().flat_map(|k| k.queue.values_mut())
    }

    /// Forgets key `key`, busy or not, with what it has queued (a group
    /// member's partition gone to another member): a message of it still
    /// running finishes against nothing.
    pub(super) fn forget(&mut self, key: &str) {
        if let Some(state) = self.keys.remove(key) {
            self.queued -= state.queue.len();
        }
    }

    /// The keys with messages queued or busy.
    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Empties every queue (at shutdown).
    pub(super) fn drain(&mut self) -> Vec<T> {
        self.queued = 0;
        (self.keys.drain())
            .flat_map(|(_, k)| k.queue.into_values())
            .collect()
    }

    /// Starts the key's earliest message if the key is free; forgets keys
    /// with nothing left to track.
    fn next(&mut self, key: &str) -> Option<T> {
        let state = self.keys.get_mut(key)?;
        if state.busy.is_some() {
            return None;
        }
        let Some((sequence, message)) = state.queue.pop_first() else {
            self.keys.remove(key);
            return None;
        };
        state.busy = Some(sequence);
        self.queued -= 1;
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_key_at_a_time_in_stream_order() {
        let mut keys = KeyQueues::new();
        assert_eq!(keys.push("a", 1, "a1"), Some("a1"));
        assert_eq!(keys.push("a", 3, "a3"), None);
        assert_eq!(keys.push("a", 2, "a2"), None);
        assert_eq!(keys.push("b", 4, "b4"), Some("b4"));
        assert_eq!(keys.queued(), 2);
        assert!(keys.holds("a", 1) && keys.holds("a", 3) && !keys.holds("a", 4));
        assert_eq!(keys.finish("a"), Some("a2"));
        assert_eq!(keys.finish("a"), Some("a3"));
        assert_eq!(keys.finish("a"), None);
        assert_eq!(keys.finish("b"), None);
        assert!(keys.keys.is_empty());
        assert_eq!(keys.queued(), 0);
    }

    #[test]
    fn a_recovered_earlier_message_runs_before_the_queued_later_ones() {
        let mut keys = KeyQueues::new();
        assert_eq!(keys.push("a", 5, "a5"), Some("a5"));
        assert_eq!(keys.push("a", 9, "a9"), None);
        // Recovery finds a7, which a crashed predecessor was handed.
        assert_eq!(keys.push("a", 7, "a7"), None);
        assert_eq!(keys.finish("a"), Some("a7"));
        assert_eq!(keys.finish("a"), Some("a9"));
    }

    #[test]
    fn a_forgotten_key_starts_afresh_with_the_copies_read_again() {
        let mut keys = KeyQueues::new();
        assert_eq!(keys.push("a", 5, "a5"), Some("a5"));
        keys.push("a", 6, "a6");
        keys.push("b", 7, "b7");
        keys.forget("a");
        assert_eq!(keys.queued(), 0, "a6 is gone; b7 runs");
        assert_eq!(
            keys.push("a", 5, "a5 again"),
            Some("a5 again"),
            "not behind the old a5"
        );
        assert_eq!(keys.finish("a"), None);
        assert_eq!(keys.keys().count(), 1, "b is busy with b7");
    }

    #[test]
    fn a_copy_replaces_the_queued_one_and_drain_empties() {
        let mut keys = KeyQueues::new();
        keys.push("a", 1, "a1");
        keys.push("a", 2, "a2");
        keys.push("a", 2, "a2 again");
        assert_eq!(keys.queued(), 1);
        assert_eq!(
            keys.queued_mut().map(|m| *m).collect::<Vec<_>>(),
            ["a2 again"]
        );
        assert_eq!(keys.drain(), vec!["a2 again"]);
        assert_eq!(keys.queued(), 0);
    }
}
