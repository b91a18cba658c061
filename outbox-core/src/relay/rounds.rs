//! A relay's rounds: claim, publish, settle — one at a time, or overlapped.
//!
//! Overlapped, the next round is claimed while this one publishes, and the
//! previous one settles meanwhile: `claim(N+2) ∥ publish(N+1) ∥ settle(N)`.
//! Order still holds. A round's claim skips the rows earlier rounds hold
//! locked and counts an event right behind one of them as publishable
//! ([`claim`](super::claim)); it is published only after the earlier rounds'
//! publishes finished, and held back if its key failed in them.

use std::collections::HashSet;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseTransaction, DbBackend};
use tracing::Instrument;
use uuid::Uuid;

use super::publisher::{Delivery, Publisher};
use super::{BatchReport, Relay, claim, settle, stats, waves};
use crate::Error;
use crate::entity::outbox_message::Model;

/// Claimed events; where rows can be locked, its transaction holds them until settled.
struct Round {
    txn: Option<DatabaseTransaction>,
    batch: Vec<Model>,
    now: DateTime<Utc>,
    started: Instant,
}

/// A published round waiting to be settled, and the keys it did not store.
struct Published {
    round: Round,
    deliveries: Vec<Option<Delivery>>,
}

impl Published {
    fn failed_keys(&self) -> impl Iterator<Item = String> + '_ {
        (self.round.batch.iter())
            .zip(&self.deliveries)
            .filter(|(_, delivery)| !matches!(delivery, Some(Delivery::Stored { .. })))
            .filter_map(|(event, _)| event.partition_key.clone())
    }

    /// Nothing reached the broker for want of a connection.
    fn broker_down(&self) -> bool {
        let unreachable = |d: &Option<Delivery>| matches!(d, Some(Delivery::Unavailable(_)));
        self.deliveries.iter().any(unreachable)
            && (self.deliveries.iter()).all(|d| d.is_none() || unreachable(d))
    }
}

impl<P: Publisher> Relay<P> {
    /// Runs one round: claim, publish, settle. The background task calls
    /// [`process_rounds`](Self::process_rounds) instead; call this to drive a
    /// relay step by step.
    ///
    /// Fails with [`Error::Database`] when the database fails, and with
    /// [`Error::BrokerUnavailable`] when no event of the batch reached the broker.
    pub async fn process_batch(&self) -> Result<BatchReport, Error> {
        let round = self.claim_round(&HashSet::new()).await?;
        let published = self.publish_round(round, &HashSet::new()).await;
        let report = self.settle_round(published).await?;
        unavailable(report)
    }

    /// Runs up to `max_rounds` rounds back to back while each comes back
    /// full, overlapping the claim of the next, the publish of the current and
    /// the settling of the previous one. Returns the rounds' reports added up.
    ///
    /// On PostgreSQL only. SQLite cannot lock rows; on MySQL/MariaDB the
    /// overlapping transactions hit InnoDB deadlocks and lock-wait timeouts
    /// (seen in the three-relay tests), so there it runs one round.
    pub async fn process_rounds(&self, max_rounds: usize) -> Result<BatchReport, Error> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return self.process_batch().await;
        }
        let mut total = BatchReport::default();
        let mut settling: Option<Published> = None;
        let (mut blocked, mut failed_before) = (HashSet::new(), HashSet::new());
        let mut next = Some(self.claim_round(&HashSet::new()).await?);
        let mut rounds = 0;
        while let Some(round) = next.take() {
            rounds += 1;
            let go_on = round.batch.len() >= self.config.batch_size && rounds < max_rounds;
            let in_flight: HashSet<Uuid> = (round.batch.iter())
                .chain(settling.iter().flat_map(|p| &p.round.batch))
                .map(|event| event.id)
                .collect();
            let (published, claimed, settled) = tokio::join!(
                self.publish_round(round, &blocked),
                async {
                    match go_on {
                        true => Some(self.claim_round(&in_flight).await),
                        false => None,
                    }
                },
                async {
                    match settling.take() {
                        Some(previous) => Some(self.settle_round(previous).await),
                        None => None,
                    }
                },
            );
            if let Some(settled) = settled {
                total.add(settled?);
            }
            // The next round may hold events right behind this round's or the
            // previous one's: a key that failed in either stays blocked there.
            let failed: HashSet<String> = published.failed_keys().collect();
            let broker_down = published.broker_down();
            blocked = failed.union(&failed_before).cloned().collect();
            failed_before = failed;
            settling = Some(published);
            if broker_down {
                break; // the claimed round, if any, is rolled back when dropped
            }
            next = claimed.transpose()?;
        }
        if let Some(last) = settling {
            total.add(self.settle_round(last).await?);
        }
        unavailable(total)
    }

    async fn claim_round(&self, in_flight: &HashSet<Uuid>) -> Result<Round, Error> {
        let started = Instant::now();
        let now = Utc::now();
        let keep = self.config.keep_delivered.is_some();
        // Where rows can be locked, the claim's transaction holds them until
        // settled; SQLite runs one relay and keeps no write lock while publishing.
        let txn = match self.db.get_database_backend() {
            DbBackend::Sqlite => None,
            _ => Some(self.begin().await?),
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

    async fn publish_round(&self, round: Round, blocked: &HashSet<String>) -> Published {
        let deliveries = match round.batch.is_empty() {
            true => Vec::new(),
            false => {
                let span = tracing::debug_span!("outbox.publish", events = round.batch.len());
                waves::publish(&self.publisher, &round.batch, blocked)
                    .instrument(span)
                    .await
            }
        };
        Published { round, deliveries }
    }

    async fn settle_round(&self, published: Published) -> Result<BatchReport, Error> {
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
        Ok(report)
    }
}

/// The broker was unreachable if nothing was published and something could not be.
fn unavailable(report: BatchReport) -> Result<BatchReport, Error> {
    if report.published == 0 && report.unavailable > 0 {
        return Err(Error::BrokerUnavailable(
            report.last_error.unwrap_or_default(),
        ));
    }
    Ok(report)
}
