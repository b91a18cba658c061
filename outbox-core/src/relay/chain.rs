//! A round's publish: the claimed events that may go out, as a [`Batch`]
//! chained by key, handed to the [`Publisher`]; each claimed event comes back
//! with its delivery, or with none when it was held back (see `pipeline` for
//! why this keeps each key in order).

use std::collections::HashMap;

use uuid::Uuid;

use super::publish::{Batch, Publisher};
use super::store::{Claimed, Settled};

/// Keys whose events must wait, with the oldest event of each that the
/// previous round did not get stored: newer events of the key go after it.
pub(super) type HeldKeys = HashMap<String, Uuid>;

/// Publishes `batch` but for the events newer than their key's entry in
/// `held`, which sit the whole round out.
pub(super) async fn publish<P: Publisher>(
    publisher: &P,
    batch: Vec<Claimed>,
    held: &HeldKeys,
) -> Vec<Settled> {
    let positions: Vec<usize> = (batch.iter().enumerate())
        .filter(|(_, Claimed { event, .. })| {
            (event.partition_key.as_deref())
                .and_then(|key| held.get(key))
                .is_none_or(|oldest| *oldest >= event.id)
        })
        .map(|(index, _)| index)
        .collect();
    let sent = Batch::new(positions.iter().map(|&i| &batch[i].event).collect());
    let deliveries = publisher.publish_in_key_order(&sent).await;
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
