//! Per-key order with several messages in flight: messages sharing a
//! partition key run one at a time, in stream order, and wait while an
//! earlier one of their key is away for redelivery.

use std::collections::{BTreeMap, HashMap};

use tokio::time::Instant;

/// Messages held back by their key, and which keys are busy.
#[derive(Debug)]
pub(super) struct KeyQueues<T> {
    keys: HashMap<String, Key<T>>,
    queued: usize,
}

#[derive(Debug)]
struct Key<T> {
    /// A message of this key is being handled.
    running: bool,
    /// A failed message of this key (stream sequence) is to be redelivered:
    /// later ones wait for it until the deadline.
    awaiting: Option<(u64, Instant)>,
    /// Received, not started: stream sequence → (message, received at).
    queue: BTreeMap<u64, (T, Instant)>,
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

    /// Adds a received message; returns it if it may start now (it is then running).
    /// A redelivered copy of a message already queued replaces it.
    pub(super) fn push(&mut self, key: &str, sequence: u64, message: T, now: Instant) -> Option<T> {
        let state = self.keys.entry(key.to_owned()).or_insert_with(|| Key {
            running: false,
            awaiting: None,
            queue: BTreeMap::new(),
        });
        if state.queue.insert(sequence, (message, now)).is_none() {
            self.queued += 1;
        }
        self.next(key)
    }

    /// Marks the running message of `key` finished. With `redelivery`, it is
    /// coming back: later messages of the key wait for it until that deadline.
    /// Returns the key's next message if one may start.
    pub(super) fn finish(
        &mut self,
        key: &str,
        sequence: u64,
        redelivery: Option<Instant>,
    ) -> Option<T> {
        let state = self.keys.get_mut(key)?;
        state.running = false;
        if let Some(deadline) = redelivery {
            state.awaiting = Some((sequence, deadline));
        }
        self.next(key)
    }

    /// Stops waiting for redeliveries overdue at `now` (another consumer
    /// instance may have taken them); returns the messages that may start.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<T> {
        let overdue: Vec<String> = (self.keys.iter())
            .filter(|(_, k)| k.awaiting.is_some_and(|(_, deadline)| deadline <= now))
            .map(|(key, _)| key.clone())
            .collect();
        let mut ready = Vec::new();
        for key in overdue {
            if let Some(state) = self.keys.get_mut(&key) {
                state.awaiting = None;
            }
            ready.extend(self.next(&key));
        }
        ready
    }

    /// Queued messages received (or last extended) before `before`: their
    /// ack deadline needs extending, which the caller does; each is stamped `now`.
    pub(super) fn due_for_extension(&mut self, before: Instant, now: Instant) -> Vec<&T> {
        let mut due = Vec::new();
        for (message, stamp) in self.keys.values_mut().flat_map(|k| k.queue.values_mut()) {
            if *stamp < before {
                *stamp = now;
                due.push(&*message);
            }
        }
        due
    }

    /// Empties every queue (at shutdown).
    pub(super) fn drain(&mut self) -> Vec<T> {
        self.queued = 0;
        (self.keys.drain())
            .flat_map(|(_, k)| k.queue.into_values().map(|(message, _)| message))
            .collect()
    }

    /// Starts the key's earliest message if the key is free and not waiting
    /// for an earlier redelivery; forgets keys with nothing left to track.
    fn next(&mut self, key: &str) -> Option<T> {
        let state = self.keys.get_mut(key)?;
        if state.running {
            return None;
        }
        let Some(first) = state.queue.first_key_value().map(|(s, _)| *s) else {
            if state.awaiting.is_none() {
                self.keys.remove(key);
            }
            return None;
        };
        match state.awaiting {
            Some((awaited, _)) if first > awaited => return None,
            Some((awaited, _)) if first == awaited => state.awaiting = None,
            _ => {}
        }
        let (message, _) = state.queue.remove(&first)?;
        state.running = true;
        self.queued -= 1;
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_message_per_key_at_a_time_in_stream_order() {
        let now = Instant::now();
        let mut keys = KeyQueues::new();
        assert_eq!(keys.push("a", 1, "a1", now), Some("a1"));
        assert_eq!(keys.push("a", 3, "a3", now), None);
        assert_eq!(keys.push("a", 2, "a2", now), None);
        assert_eq!(keys.push("b", 4, "b4", now), Some("b4"));
        assert_eq!(keys.queued(), 2);
        assert_eq!(keys.finish("a", 1, None), Some("a2"));
        assert_eq!(keys.finish("a", 2, None), Some("a3"));
        assert_eq!(keys.finish("a", 3, None), None);
        assert_eq!(keys.finish("b", 4, None), None);
        assert!(keys.keys.is_empty());
        assert_eq!(keys.queued(), 0);
    }

    #[test]
    fn later_messages_wait_for_a_failed_ones_redelivery() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(10);
        let mut keys = KeyQueues::new();
        assert_eq!(keys.push("a", 1, "a1", now), Some("a1"));
        assert_eq!(keys.push("a", 2, "a2", now), None);
        assert_eq!(keys.finish("a", 1, Some(deadline)), None);
        assert_eq!(keys.push("a", 3, "a3", now), None);
        assert_eq!(keys.push("a", 1, "a1 again", now), Some("a1 again"));
        assert_eq!(keys.finish("a", 1, None), Some("a2"));
        assert_eq!(keys.finish("a", 2, None), Some("a3"));
    }

    #[test]
    fn an_overdue_redelivery_releases_the_key() {
        let now = Instant::now();
        let mut keys = KeyQueues::new();
        keys.push("a", 1, "a1", now);
        keys.push("a", 2, "a2", now);
        keys.finish("a", 1, Some(now + Duration::from_secs(1)));
        assert!(keys.expire(now).is_empty());
        assert_eq!(keys.expire(now + Duration::from_secs(2)), vec!["a2"]);
    }

    #[test]
    fn a_redelivered_copy_replaces_the_queued_one_and_drain_empties() {
        let now = Instant::now();
        let mut keys = KeyQueues::new();
        keys.push("a", 1, "a1", now);
        keys.push("a", 2, "a2", now);
        keys.push("a", 2, "a2 again", now + Duration::from_secs(1));
        assert_eq!(keys.queued(), 1);
        let later = now + Duration::from_secs(1);
        assert!(keys.due_for_extension(later, later).is_empty());
        let after = later + Duration::from_millis(1);
        assert_eq!(keys.due_for_extension(after, after), vec![&"a2 again"]);
        assert!(
            keys.due_for_extension(after, later).is_empty(),
            "stamped when extended"
        );
        assert_eq!(keys.drain(), vec!["a2 again"]);
        assert_eq!(keys.queued(), 0);
    }
}
