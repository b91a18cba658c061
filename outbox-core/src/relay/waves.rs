//! Publishes a batch so that a failing event holds back later events of its
//! key, and nothing else.
//!
//! Each keyed event is chained to the previous event of its key in the batch
//! and goes out only once that one is stored ([`Publisher::publish_in_key_order`]);
//! a key whose event was not stored publishes nothing newer, so its later
//! events can never overtake it. A batch over many keys is one or two links
//! per key; a batch of one hot key is one chain, which is what ordering that
//! key costs.
//!
//! An event newer than its key's entry in `held` (an event of the previous,
//! overlapped round that was not stored) sits the whole batch out.

use std::collections::HashMap;

use super::key_order::KeyOrder;
use super::publisher::{Delivery, Publisher};
use super::round::Held;
use crate::entity::outbox_message::Model;

/// Each event's delivery, or `None` when it was held back behind a failure of its key.
pub(super) async fn publish<P: Publisher>(
    publisher: &P,
    batch: &[Model],
    held: &Held,
) -> Vec<Option<Delivery>> {
    let mut positions = Vec::with_capacity(batch.len());
    let mut after = Vec::with_capacity(batch.len());
    let mut last_of_key: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (index, event) in batch.iter().enumerate() {
        let previous = match event.partition_key.as_deref() {
            Some(key) if held.get(key).is_some_and(|oldest| *oldest < event.id) => continue,
            Some(key) => last_of_key.insert(key, positions.len()),
            None => None,
        };
        positions.push(index);
        after.push(previous);
    }
    let events: Vec<&Model> = positions.iter().map(|&i| &batch[i]).collect();
    let deliveries = publisher.publish_in_key_order(&events, &after).await;
    let mut outcome: Vec<Option<Delivery>> = vec![None; batch.len()];
    for (index, delivery) in positions.into_iter().zip(deliveries) {
        outcome[index] = delivery;
    }
    outcome
}

/// [`Publisher::publish_in_key_order`] for a publisher that can only await
/// whole batches: each wave is every event ready when the previous wave's
/// acknowledgements are all in.
pub(super) async fn publish_in_waves<P: Publisher + ?Sized>(
    publisher: &P,
    events: &[&Model],
    after: &[Option<usize>],
) -> Vec<Option<Delivery>> {
    let mut order = KeyOrder::new(after);
    loop {
        let mut wave: Vec<usize> = std::iter::from_fn(|| order.next_ready()).collect();
        if wave.is_empty() {
            break;
        }
        wave.sort_unstable();
        let members: Vec<&Model> = wave.iter().map(|&i| events[i]).collect();
        let deliveries = publisher.publish(&members).await;
        let all_unavailable = (deliveries.iter()).all(|d| matches!(d, Delivery::Unavailable(_)));
        for (i, delivery) in wave.into_iter().zip(deliveries) {
            order.settle(i, delivery);
        }
        if all_unavailable {
            break; // the broker is down: the rest of the batch waits for the next round
        }
    }
    order.into_outcome()
}
