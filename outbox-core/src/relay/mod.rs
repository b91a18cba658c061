//! The relay: moves committed events from the outbox to a broker, at least once.
//!
//! ```no_run
//! # async fn run<P: outbox_core::relay::Publisher>(db: sea_orm::DatabaseConnection, publisher: P) {
//! use outbox_core::relay::Relay;
//!
//! let relay = Relay::builder(db, publisher).batch_size(2_000).spawn();
//! // ... serve ...
//! relay.shutdown().await; // finishes the batch in flight, then stops
//! # }
//! ```
//!
//! Each round claims a batch (due events, each key's in order; several
//! relays share the work through `FOR UPDATE SKIP LOCKED`), publishes it
//! through the [`Publisher`] with many acknowledgements in flight (each key's
//! next event sent once the previous one is stored, so that a failing event
//! is never overtaken by later events of its key), then settles it in one
//! transaction:
//! stored events are deleted (or marked delivered), rejected ones are
//! rescheduled with exponential backoff, and ones that can never be delivered
//! move to `outbox_dead_letters` with their last error.
//!
//! While events keep coming, rounds overlap: as one round is published, the
//! previous one is settled and the next one claimed (see
//! [`RelayConfig::overlap_rounds`]).

mod chain;
mod config;
#[cfg(test)]
pub(crate) mod fixture;
#[cfg(feature = "logical")]
pub mod logical;
#[cfg(feature = "postgres")]
pub mod notify;
mod pipeline;
mod publish;
mod report;
mod round;
mod stats;
mod store;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

pub use config::{MAX_BATCH_SIZE, MIN_POLL_INTERVAL, RelayConfig};
pub use publish::{Batch, Delivery, DeliveryError, KeyOrder, Publisher};
pub use report::BatchReport;
pub use stats::{OutboxStats, stats};
pub use worker::RelayHandle;

use crate::Backoff;
use crate::Error;
use chain::HeldKeys;
use round::Round;
use store::{InFlight, Store};

/// Delivers committed events through a [`Publisher`].
#[derive(Debug)]
pub struct Relay<P> {
    store: Store,
    publisher: P,
    config: RelayConfig,
    /// Cleared when the pool could not give an overlapped claim its connection.
    overlap: AtomicBool,
}

/// Configures a [`Relay`]; see [`RelayConfig`] for the defaults.
#[derive(Debug)]
pub struct RelayBuilder<P> {
    relay: Relay<P>,
}

impl<P: Publisher> Relay<P> {
    /// Starts configuring a relay over `db`'s outbox.
    pub fn builder(db: DatabaseConnection, publisher: P) -> RelayBuilder<P> {
        RelayBuilder {
            relay: Relay {
                store: Store::new(db),
                publisher,
                config: RelayConfig::default(),
                overlap: AtomicBool::new(true),
            },
        }
    }

    /// The relay's settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Runs one round: moves the scheduled events now due into the outbox,
    /// then claims, publishes, settles. Call it yourself to drive a relay
    /// step by step; [`drain`](Self::drain) runs rounds until the outbox is
    /// empty.
    ///
    /// Fails with [`Error::Database`] when the database fails, and with
    /// [`Error::BrokerUnavailable`] when no event of the batch reached the broker.
    pub async fn process_batch(&self) -> Result<BatchReport, Error> {
        self.promote_due().await?;
        self.round().await
    }

    /// Moves the scheduled events now due into the outbox, then runs rounds,
    /// overlapped where [`RelayConfig::overlap_rounds`] allows, until a claim
    /// finds nothing to publish or a round gets nothing stored (its events
    /// wait for a retry or behind another relay's); returns their reports
    /// added up. The background task drains whenever it wakes.
    pub async fn drain(&self) -> Result<BatchReport, Error> {
        self.promote_due().await?;
        pipeline::drain(self, None, None).await
    }

    /// One round in turn: claim, publish, settle.
    async fn round(&self) -> Result<BatchReport, Error> {
        let round = Round::claim(&self.store, &self.config, &InFlight::default()).await?;
        let published = round.publish(&self.publisher, &HeldKeys::new()).await;
        published.settle(&self.store, &self.config).await
    }

    /// Moves the scheduled events due now into the outbox (see
    /// `store::schedule`); returns when the next one is due.
    async fn promote_due(&self) -> Result<Option<DateTime<Utc>>, Error> {
        let (moved, next_due) =
            store::promote_due(&self.store, Utc::now(), self.config.batch_size).await?;
        if moved > 0 {
            tracing::debug!(moved, "scheduled events came due");
        }
        Ok(next_due)
    }

    /// Whether rounds overlap: configured, where the dialect allows, and not given up on.
    fn overlapping(&self) -> bool {
        self.config.overlap_rounds
            && self.store.dialect().overlaps_rounds()
            && self.overlap.load(Ordering::Relaxed)
    }

    /// Gives up overlapping rounds for this relay's life: the pool had no
    /// second connection for an overlapped claim.
    fn stop_overlapping(&self) {
        tracing::warn!(
            "the connection pool has no second connection for the relay: rounds no longer overlap"
        );
        self.overlap.store(false, Ordering::Relaxed);
    }

    /// Runs the relay in a background task until [`RelayHandle::shutdown`].
    pub fn spawn(self) -> RelayHandle {
        worker::spawn(self)
    }
}

impl<P: Publisher> RelayBuilder<P> {
    /// Events claimed and published per round, from 1 to [`MAX_BATCH_SIZE`].
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.relay.config.batch_size = batch_size.clamp(1, MAX_BATCH_SIZE);
        self
    }

    /// How often to look for events when nothing wakes the relay; at least
    /// [`MIN_POLL_INTERVAL`] (0 would poll without pause, a busy loop).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.relay.config.poll_interval = interval.max(MIN_POLL_INTERVAL);
        self
    }

    /// How often to refresh the gauges and delete expired kept deliveries.
    pub fn stats_interval(mut self, interval: Duration) -> Self {
        self.relay.config.stats_interval = interval;
        self
    }

    /// Attempts before a rejected event is dead-lettered (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.relay.config.max_attempts = attempts.max(1);
        self
    }

    /// Delays between attempts of one event.
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.relay.config.retry = backoff;
        self
    }

    /// Delays between rounds while the database or broker is unreachable.
    pub fn outage_backoff(mut self, backoff: Backoff) -> Self {
        self.relay.config.outage = backoff;
        self
    }

    /// Marks delivered rows instead of deleting them, and deletes them after `retention`.
    pub fn keep_delivered(mut self, retention: Duration) -> Self {
        self.relay.config.keep_delivered = Some(retention);
        self
    }

    /// Also wakes when another process commits events: LISTENs for the
    /// notifications of [`notify::enable`]'s trigger (PostgreSQL only).
    #[cfg(feature = "postgres")]
    pub fn wake_on_notify(mut self) -> Self {
        self.relay.config.wake_on_notify = true;
        self
    }

    /// Overlaps consecutive rounds (on by default); see [`RelayConfig::overlap_rounds`].
    pub fn overlap_rounds(mut self, enabled: bool) -> Self {
        self.relay.config.overlap_rounds = enabled;
        self
    }

    /// Commits the relay's bookkeeping without waiting for the WAL flush; see
    /// [`RelayConfig::async_commit`].
    pub fn async_commit(mut self, enabled: bool) -> Self {
        self.relay.config.async_commit = enabled;
        self
    }

    /// Vacuums the outbox after every `events` deleted events, or never with
    /// `None`; see [`RelayConfig::vacuum_after`].
    pub fn vacuum_after(mut self, events: Option<u64>) -> Self {
        self.relay.config.vacuum_after = events;
        self
    }

    /// The configured relay, to drive with [`Relay::process_batch`].
    pub fn build(self) -> Relay<P> {
        self.relay
    }

    /// Starts the configured relay in a background task.
    pub fn spawn(self) -> RelayHandle {
        self.relay.spawn()
    }
}
