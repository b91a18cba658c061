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

use uuid::Uuid;

use super::decode::Claimed;
use super::delivery::Delivery;
use super::publisher::Publisher;
use crate::entity::outbox_message::Model;

/// Keys whose events must wait, with the oldest event of each that the
/// previous round did not get stored: newer events of the key go after it.
pub(super) type Held = HashMap<String, Uuid>;

/// A claimed event and its delivery, or `None` when it was held back behind
/// an earlier event of its key.
pub(super) struct Settled {
    pub(super) claimed: Claimed,
    pub(super) delivery: Option<Delivery>,
}

/// Publishes `batch`; returns each event with its delivery, or with `None`
/// when it was held back behind a failure of its key.
pub(super) async fn publish<P: Publisher>(
    publisher: &P,
    batch: Vec<Claimed>,
    held: &Held,
) -> Vec<Settled> {
    let mut positions = Vec::with_capacity(batch.len());
    let mut after = Vec::with_capacity(batch.len());
    let mut last_of_key: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (index, Claimed { event, .. }) in batch.iter().enumerate() {
        let previous = match event.partition_key.as_deref() {
            Some(key) if held.get(key).is_some_and(|oldest| *oldest < event.id) => continue,
            Some(key) => last_of_key.insert(key, positions.len()),
            None => None,
        };
        positions.push(index);
        after.push(previous);
    }
    let events: Vec<&Model> = positions.iter().map(|&i| &batch[i].event).collect();
    let deliveries = publisher.publish_in_key_order(&events, &after).await;
    let mut settled: Vec<Settled> = (batch.into_iter())
        .map(|claimed| Settled {
            claimed,
            delivery: None,
        })
        .collect();
    for (index, delivery) in positions.into_iter().zip(deliveries) {
        settled[index].delivery = delivery;
    }
    settled
}
