//! A round's three stages — claim, publish, settle — as steps of their own, so
//! that [`Relay::process_batch`] can run them in turn and `pipeline` can
//! overlap the stages of consecutive rounds.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use tracing::Instrument;
use uuid::Uuid;

use super::claim::InFlight;
use super::publisher::{Delivery, Publisher};
use super::{BatchReport, Relay, claim, settle, stats, waves};
use crate::Error;
use crate::entity::outbox_message::Model;

/// Claimed events, and the transaction whose row locks keep other relays off
/// them until the round is settled (`None` on SQLite, which has no row locks).
pub(super) struct Round {
    txn: Option<DatabaseTransaction>,
    batch: Vec<Model>,
    now: DateTime<Utc>,
    started: Instant,
}

/// A round whose publish is over, waiting to be settled.
pub(super) struct Published {
    round: Round,
    deliveries: Vec<Option<Delivery>>,
}

/// Keys whose events must wait, with the oldest event of each that the
/// previous round did not get stored: newer events of the key go after it.
pub(super) type Held = HashMap<String, Uuid>;

impl Round {
    pub(super) fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Lets go of a round not to be published: its rows are unlocked, unchanged.
    pub(super) async fn release(self) -> Result<(), Error> {
        if let Some(txn) = self.txn {
            txn.rollback().await?;
        }
        Ok(())
    }

    /// What the next claim must know of this round while it is in flight:
    /// its span, and its keyed events, which are not to stop their keys.
    pub(super) fn in_flight(&self) -> InFlight {
        let keyed = (self.batch.iter())
            .filter(|event| event.partition_key.is_some())
            .map(|event| event.id)
            .collect();
        let span = (self.batch.first()).zip(self.batch.last());
        InFlight {
            keyed,
            span: span.map(|(first, last)| (first.id, last.id)),
        }
    }
}

impl Published {
    /// The keys that had an event this round did not get stored, each with
    /// its oldest such event.
    pub(super) fn held(&self) -> Held {
        let mut held = Held::new();
        for (event, delivery) in self.round.batch.iter().zip(&self.deliveries) {
            if let Some(key) = &event.partition_key
                && !matches!(delivery, Some(Delivery::Stored { .. }))
            {
                held.entry(key.clone()).or_insert(event.id);
            }
        }
        held
    }

    /// Whether the broker stored something this round.
    pub(super) fn stored_any(&self) -> bool {
        (self.deliveries.iter()).any(|d| matches!(d, Some(Delivery::Stored { .. })))
    }
}

impl<P: Publisher> Relay<P> {
    /// Claims the next batch beside the round `in_flight`, if any.
    pub(super) async fn claim_round(&self, in_flight: &InFlight) -> Result<Round, Error> {
        let started = Instant::now();
        let now = Utc::now();
        let keep = self.config.keep_delivered.is_some();
        // Where rows can be locked, the claim's transaction holds them until
        // settled; SQLite runs one relay and keeps no write lock while publishing.
        let txn = if self.locking() {
            Some(self.begin().await?)
        } else {
            None
        };
        let limit = self.config.batch_size;
        let claimed = async {
            match &txn {
                Some(txn) => claim::claim(txn, limit, now, keep, in_flight).await,
                None => claim::claim(&self.db, limit, now, keep, in_flight).await,
            }
        };
        let batch = claimed
            .instrument(tracing::debug_span!("outbox.claim"))
            .await?;
        Ok(Round {
            txn,
            batch,
            now,
            started,
        })
    }

    /// Publishes a claimed batch; a keyed event newer than its key's entry in
    /// `held` is held back.
    pub(super) async fn publish_round(&self, round: Round, held: &Held) -> Published {
        let deliveries = waves::publish(&self.publisher, &round.batch, held)
            .instrument(tracing::debug_span!(
                "outbox.publish",
                events = round.batch.len()
            ))
            .await;
        Published { round, deliveries }
    }

    /// Records what the broker did with a round, and releases its events.
    ///
    /// Fails with [`Error::BrokerUnavailable`] when no event reached the broker.
    pub(super) async fn settle_round(&self, published: Published) -> Result<BatchReport, Error> {
        let Published { round, deliveries } = published;
        let Round {
            txn,
            batch,
            now,
            started,
        } = round;
        if batch.is_empty() {
            if let Some(txn) = txn {
                txn.commit().await?;
            }
            return Ok(BatchReport::default());
        }
        let txn = match txn {
            Some(txn) => txn,
            None => self.begin().await?,
        };
        let settled = async {
            let report = settle::settle(&txn, batch, deliveries, &self.config, now).await?;
            txn.commit().await?;
            Ok::<_, sea_orm::DbErr>(report)
        };
        let report = settled
            .instrument(tracing::debug_span!("outbox.settle"))
            .await?;
        stats::record_batch(&report, started.elapsed());
        if report.published == 0 && report.unavailable > 0 {
            return Err(Error::BrokerUnavailable(
                report.last_error.unwrap_or_default(),
            ));
        }
        Ok(report)
    }
}
