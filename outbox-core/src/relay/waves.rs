//! Publishes a batch so that a failing event holds back later events of its
//! key, and nothing else.
//!
//! Wave `i` holds the `i`-th event of each partition key in the batch (every
//! unkeyed event goes in wave 0). A wave is published in one go, with all its
//! acknowledgements in flight together; a key whose event was not stored sits
//! out the later waves, so its later events can never overtake it. A batch
//! over many keys is one or two waves; a batch of one hot key is one wave per
//! event, which is what ordering that key costs.
//!
//! An event newer than its key's entry in `held` (an event of the previous,
//! overlapped round that was not stored) sits the whole batch out.

use std::collections::{HashMap, HashSet};

use super::publisher::{Delivery, Publisher};
use super::round::Held;
use crate::entity::outbox_message::Model;

/// Each event's delivery, or `None` when it was held back behind a failure of its key.
pub(super) async fn publish<P: Publisher>(
    publisher: &P,
    batch: &[Model],
    held: &Held,
) -> Vec<Option<Delivery>> {
    let mut waves: Vec<Vec<usize>> = Vec::new();
    let mut position: HashMap<&str, usize> = HashMap::new();
    for (index, event) in batch.iter().enumerate() {
        let wave = match event.partition_key.as_deref() {
            Some(key) if held.get(key).is_some_and(|oldest| *oldest < event.id) => continue,
            Some(key) => {
                let next = position.entry(key).or_insert(0);
                *next += 1;
                *next - 1
            }
            None => 0,
        };
        if waves.len() <= wave {
            waves.resize_with(wave + 1, Vec::new);
        }
        waves[wave].push(index);
    }

    let mut outcome: Vec<Option<Delivery>> = vec![None; batch.len()];
    let mut blocked: HashSet<&str> = HashSet::new();
    for wave in waves {
        let members: Vec<usize> = wave
            .into_iter()
            .filter(|&i| {
                batch[i]
                    .partition_key
                    .as_deref()
                    .is_none_or(|k| !blocked.contains(k))
            })
            .collect();
        if members.is_empty() {
            break;
        }
        let events: Vec<&Model> = members.iter().map(|&i| &batch[i]).collect();
        let deliveries = publisher.publish(&events).await;
        let mut all_unavailable = true;
        for (&i, delivery) in members.iter().zip(deliveries) {
            all_unavailable &= matches!(delivery, Delivery::Unavailable(_));
            if !matches!(delivery, Delivery::Stored { .. })
                && let Some(key) = batch[i].partition_key.as_deref()
            {
                blocked.insert(key);
            }
            outcome[i] = Some(delivery);
        }
        if all_unavailable {
            break; // the broker is down: the rest of the batch waits for the next round
        }
    }
    outcome
}
