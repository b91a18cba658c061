//! A round's three stages — claim, publish, settle — as steps of their own, so
//! that [`Relay::process_batch`](super::Relay::process_batch) can run them in
//! turn and `pipeline` can overlap the stages of consecutive rounds.

use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use tracing::Instrument;

use super::chain::{self, HeldKeys};
use super::config::RelayConfig;
use super::publish::{Delivery, Publisher};
use super::report::BatchReport;
use super::stats;
use super::store::{self, Claimed, InFlight, Settled, Store};
use crate::Error;

/// Claimed events, and the transaction whose row locks keep other relays off
/// them until the round is settled (`None` on SQLite, which has no row locks).
pub(super) struct Round {
    txn: Option<DatabaseTransaction>,
    batch: Vec<Claimed>,
    now: DateTime<Utc>,
    started: Instant,
    /// Whether the next claim may skip this round's span (see [`Round::in_flight`]).
    skippable: bool,
}

/// A round whose publish is over, waiting to be settled: each claimed event
/// with what the broker did with it.
pub(super) struct Published {
    txn: Option<DatabaseTransaction>,
    events: Vec<Settled>,
    now: DateTime<Utc>,
    started: Instant,
}

impl Round {
    /// Claims the next batch beside the round `in_flight`, if any.
    pub(super) async fn claim(
        store: &Store,
        config: &RelayConfig,
        in_flight: &InFlight,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let now = Utc::now();
        let dialect = store.dialect();
        let keep = config.keep_delivered.is_some();
        // Where rows can be locked, the claim's transaction holds them until settled.
        let txn = if dialect.locks_rows() {
            Some(store.begin(config.async_commit).await?)
        } else {
            None
        };
        let limit = config.batch_size;
        let claimed = async {
            match &txn {
                Some(txn) => store::claim(txn, dialect, limit, now, keep, in_flight).await,
                None => store::claim(store.db(), dialect, limit, now, keep, in_flight).await,
            }
        };
        let claimed = claimed
            .instrument(tracing::debug_span!("outbox.claim"))
            .await?;
        let skippable = above(in_flight, &claimed);
        Ok(Self {
            txn,
            batch: claimed,
            now,
            started,
            skippable,
        })
    }

    /// Publishes the claimed batch; a keyed event newer than its key's entry
    /// in `held` is held back.
    pub(super) async fn publish<P: Publisher>(self, publisher: &P, held: &HeldKeys) -> Published {
        let Self {
            txn,
            batch,
            now,
            started,
            ..
        } = self;
        let span = tracing::debug_span!("outbox.publish", events = batch.len());
        #[cfg(feature = "opentelemetry")]
        crate::trace::link_events(&span, batch.iter().map(|claimed| &claimed.event));
        let events = chain::publish(publisher, batch, held)
            .instrument(span)
            .await;
        Published {
            txn,
            events,
            now,
            started,
        }
    }

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
    /// its keyed events, which are not to stop their keys, and the span it
    /// may skip: only that of a round lying wholly above the span its own
    /// claim skipped, so that no event is passed over twice (steps 4 and 5
    /// of the ordering argument in `pipeline`).
    pub(super) fn in_flight(&self) -> InFlight {
        let keyed = (self.batch.iter())
            .filter(|claimed| claimed.event.partition_key.is_some())
            .map(|claimed| claimed.event.id)
            .collect();
        let span = (self.batch.first()).zip(self.batch.last());
        InFlight {
            keyed,
            span: (span.filter(|_| self.skippable))
                .map(|(first, last)| (first.event.id, last.event.id)),
        }
    }
}

impl Published {
    /// Records what the broker did with the round, and releases its events.
    ///
    /// Fails with [`Error::BrokerUnavailable`] when no event reached the broker.
    pub(super) async fn settle(
        self,
        store: &Store,
        config: &RelayConfig,
    ) -> Result<BatchReport, Error> {
        let Self {
            txn,
            events,
            now,
            started,
        } = self;
        if events.is_empty() {
            if let Some(txn) = txn {
                txn.commit().await?;
            }
            return Ok(BatchReport::default());
        }
        let txn = match txn {
            Some(txn) => txn,
            None => store.begin(config.async_commit).await?,
        };
        let settled = async {
            let report = store::settle(&txn, store.dialect(), events, config, now).await?;
            txn.commit().await?;
            Ok::<_, sea_orm::DbErr>(report)
        };
        let report = settled
            .instrument(tracing::debug_span!("outbox.settle"))
            .await?;
        stats::record_batch(&report, started.elapsed());
        if config.keep_delivered.is_none() {
            store.deleted(report.published + report.dead_lettered, config.vacuum_after);
        }
        if report.published == 0
            && report.unavailable > 0
            && let Some(error) = &report.last_error
        {
            return Err(Error::BrokerUnavailable(error.clone()));
        }
        Ok(report)
    }

    /// The keys that had an event this round did not get stored, each with
    /// its oldest such event.
    pub(super) fn held(&self) -> HeldKeys {
        let mut held = HeldKeys::new();
        for Settled { claimed, delivery } in &self.events {
            if let Some(key) = &claimed.event.partition_key
                && !matches!(delivery, Some(Delivery::Stored { .. }))
            {
                held.entry(key.clone()).or_insert(claimed.event.id);
            }
        }
        held
    }

    /// Whether the broker stored something this round.
    pub(super) fn stored_any(&self) -> bool {
        (self.events.iter()).any(|e| matches!(e.delivery, Some(Delivery::Stored { .. })))
    }
}

/// Whether `batch` (in id order) lies wholly above the span its claim skipped.
fn above(in_flight: &InFlight, batch: &[Claimed]) -> bool {
    match (in_flight.span, batch.first()) {
        (Some((_, last)), Some(first)) => first.event.id > last,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::{Claimed, InFlight, above};
    use crate::relay::fixture;

    fn event(id: u128) -> Claimed {
        let event = fixture::event(id, None);
        Claimed { event, row: None }
    }

    fn skipped(first: u128, last: u128) -> InFlight {
        let span = Some((Uuid::from_u128(first), Uuid::from_u128(last)));
        InFlight {
            keyed: Vec::new(),
            span,
        }
    }

    #[test]
    fn only_a_round_above_the_span_its_claim_skipped_may_be_skipped_in_turn() {
        let nothing_skipped = InFlight::default();
        assert!(above(&nothing_skipped, &[event(5), event(9)]));
        assert!(above(&skipped(10, 20), &[event(21), event(30)]));
        assert!(above(&skipped(10, 20), &[]));
        // An older event (a retry come due) below the span: this round's span
        // would cover what the previous claim passed over inside 10..=20.
        assert!(!above(&skipped(10, 20), &[event(3), event(21), event(30)]));
    }
}
