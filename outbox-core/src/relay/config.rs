//! The relay's settings, as [`RelayBuilder`](super::RelayBuilder) leaves them.

use std::time::Duration;

use crate::Backoff;

/// The largest batch a relay claims: the claim binds up to three values per
/// event (its key and id, and the id of an event of the round in flight),
/// and databases cap the values of one statement (65,535 on PostgreSQL and
/// MySQL, 32,766 on SQLite).
pub const MAX_BATCH_SIZE: usize = 10_000;

/// The shortest poll interval a relay takes (`RelayBuilder::poll_interval`),
/// the `outbox` binary's lower bound too.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How a relay batches, retries and keeps delivered events: set through
/// [`RelayBuilder`](super::RelayBuilder), read through
/// [`Relay::config`](super::Relay::config).
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
    /// Vacuum `outbox_messages` in the background after every so many
    /// deleted events (default 100,000; PostgreSQL only; `None`: never).
    /// A long drain otherwise slows down as it goes: each claim steps over
    /// the index entries of the rows deleted before it until the table is
    /// vacuumed. The vacuum takes a connection of the pool while it runs.
    pub vacuum_after: Option<u64>,
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
            vacuum_after: Some(100_000),
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
