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

mod backoff;
mod chain;
mod claim;
mod decode;
mod delivery;
mod key_order;
#[cfg(feature = "postgres")]
pub mod notify;
mod pipeline;
mod publisher;
mod round;
mod settle;
mod stats;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, IsolationLevel, TransactionTrait};

pub use backoff::Backoff;
pub use delivery::Delivery;
pub use key_order::{InvalidKeyOrder, KeyOrder};
pub use publisher::Publisher;
pub use stats::{OutboxStats, stats};
pub use worker::RelayHandle;

use crate::Error;

/// The largest batch a relay claims: the claim binds up to three values per
/// event (its key and id, and the id of an event of the round in flight),
/// and databases cap the values of one statement (65,535 on PostgreSQL and
/// MySQL, 32,766 on SQLite).
pub const MAX_BATCH_SIZE: usize = 10_000;

/// How a relay batches, retries and keeps delivered events: set through
/// [`RelayBuilder`], read through [`Relay::config`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Events claimed and published per round (default 2,000; at most
    /// [`MAX_BATCH_SIZE`]). Larger rounds cost the broker less per event, up
    /// to a few thousand (the README's performance section has the figures).
    pub batch_size: usize,
    /// How often to look for events when nothing wakes the relay (default 1 s).
    pub poll_interval: Duration,
    /// How often to refresh the gauges (a count over the outbox) and delete
    /// kept deliveries past their retention (default 15 s).
    pub stats_interval: Duration,
    /// Attempts before an event the broker keeps rejecting is dead-lettered (default 10).
    pub max_attempts: u32,
    /// Delays between attempts of one event (default 100 ms doubling to 60 s).
    pub retry: Backoff,
    /// Delays between rounds while the database or broker is unreachable (default 100 ms doubling to 10 s).
    pub outage: Backoff,
    /// Keep delivered rows (marked `delivered_at`) this long instead of deleting them at once.
    pub keep_delivered: Option<Duration>,
    /// Wake on PostgreSQL notifications from other processes (see `notify`).
    #[cfg(feature = "postgres")]
    pub wake_on_notify: bool,
    /// Commit the relay's own bookkeeping without waiting for the WAL flush
    /// (PostgreSQL `synchronous_commit = off`). A database crash can then
    /// forget the last moments of deletions: those events are published again,
    /// and JetStream drops the copies within its duplicate window.
    pub async_commit: bool,
    /// Overlap consecutive rounds (default on): while one round is published,
    /// settle the previous one and claim the next, so that the database and
    /// the broker work at the same time rather than in turn. The relay then
    /// holds two connections of the pool; with a pool of one, the first
    /// overlapped claim waits out the pool's acquire timeout, and the relay
    /// goes on with rounds in turn. PostgreSQL only: on MySQL and SQLite
    /// rounds always run in turn.
    pub overlap_rounds: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 2_000,
            poll_interval: Duration::from_secs(1),
            stats_interval: Duration::from_secs(15),
            max_attempts: 10,
            retry: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(60),
            },
            outage: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            keep_delivered: None,
            #[cfg(feature = "postgres")]
            wake_on_notify: false,
            async_commit: false,
            overlap_rounds: true,
        }
    }
}

impl RelayConfig {
    /// The longest time over which one event may be published again: a
    /// broker's deduplication window must be at least this long.
    pub fn retry_horizon(&self) -> Duration {
        self.retry.horizon(self.max_attempts)
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    /// Events claimed.
    pub claimed: usize,
    /// Events the broker stored (duplicates included).
    pub published: usize,
    /// Of those, events the broker had already stored.
    pub duplicates: usize,
    /// Events rejected and rescheduled.
    pub retried: usize,
    /// Events moved to the dead-letter table.
    pub dead_lettered: usize,
    /// Events not published because the broker was unreachable.
    pub unavailable: usize,
    /// Events not published because an earlier event of their key failed in this round.
    pub held_back: usize,
    /// The broker's error when it was unreachable.
    pub last_error: Option<String>,
}

impl BatchReport {
    /// Adds up the rounds of a drain; the last broker error stays.
    fn add(&mut self, round: BatchReport) {
        self.claimed += round.claimed;
        self.published += round.published;
        self.duplicates += round.duplicates;
        self.retried += round.retried;
        self.dead_lettered += round.dead_lettered;
        self.unavailable += round.unavailable;
        self.held_back += round.held_back;
        if round.last_error.is_some() {
            self.last_error = round.last_error;
        }
    }
}

/// Delivers committed events through a [`Publisher`].
#[derive(Debug)]
pub struct Relay<P> {
    db: DatabaseConnection,
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
                db,
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

    /// Runs one round: claim, publish, settle. Call it yourself to drive a
    /// relay step by step; [`drain`](Self::drain) runs rounds until the
    /// outbox is empty.
    ///
    /// Fails with [`Error::Database`] when the database fails, and with
    /// [`Error::BrokerUnavailable`] when no event of the batch reached the broker.
    pub async fn process_batch(&self) -> Result<BatchReport, Error> {
        let round = self.claim_round(&claim::InFlight::default()).await?;
        let published = self.publish_round(round, &chain::Held::new()).await;
        self.settle_round(published).await
    }

    /// Runs rounds, overlapped where [`RelayConfig::overlap_rounds`] allows,
    /// until a claim finds nothing to publish or a round gets nothing stored
    /// (its events wait for a retry or behind another relay's); returns their
    /// reports added up. The background task drains whenever it wakes.
    pub async fn drain(&self) -> Result<BatchReport, Error> {
        pipeline::drain(self, None, None).await
    }

    /// Whether claimed rows stay locked until settled: everywhere but on SQLite.
    fn locking(&self) -> bool {
        self.db.get_database_backend() != DbBackend::Sqlite
    }

    /// Whether rounds overlap: configured, on PostgreSQL, and not given up on.
    ///
    /// Not on MySQL: InnoDB's `DELETE ... WHERE id IN (...)` may scan the
    /// table and wait on every locked row it meets, among them the next
    /// round's, which this relay releases only after that very delete.
    fn overlapping(&self) -> bool {
        self.config.overlap_rounds
            && self.db.get_database_backend() == DbBackend::Postgres
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

    /// Every transaction of a round starts here, so that `async_commit` applies to all of them.
    ///
    /// On MySQL it runs at READ COMMITTED: under InnoDB's default REPEATABLE
    /// READ the claim's locking read also locks the gaps of the index ranges
    /// it scans, and handlers inserting events into those gaps deadlock with it.
    async fn begin(&self) -> Result<sea_orm::DatabaseTransaction, sea_orm::DbErr> {
        let txn = match self.db.get_database_backend() {
            DbBackend::MySql => {
                (self.db)
                    .begin_with_config(Some(IsolationLevel::ReadCommitted), None)
                    .await?
            }
            _ => self.db.begin().await?,
        };
        if self.config.async_commit && txn.get_database_backend() == DbBackend::Postgres {
            txn.execute_unprepared("SET LOCAL synchronous_commit = off")
                .await?;
        }
        Ok(txn)
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

    /// How often to look for events when nothing wakes the relay.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.relay.config.poll_interval = interval;
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

    /// The configured relay, to drive with [`Relay::process_batch`].
    pub fn build(self) -> Relay<P> {
        self.relay
    }

    /// Starts the configured relay in a background task.
    pub fn spawn(self) -> RelayHandle {
        self.relay.spawn()
    }
}
