//! The relay's background task: drains while there is work; otherwise waits
//! for a commit in this process, the poll interval, or the next scheduled
//! event's time, whichever comes first; backs off while the
//! database or broker is down, logging each change of state once.

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::publish::Publisher;
use super::{Relay, pipeline, stats};
use crate::CommitSignal;
use crate::background::Background;
use crate::entity::outbox_message;

/// A running relay. Dropping it leaves the relay running; call
/// [`shutdown`](Self::shutdown) to stop it cleanly.
#[derive(Debug)]
pub struct RelayHandle(pub(super) Background);

impl RelayHandle {
    /// Lets the batch in flight finish and settle, then stops the relay.
    ///
    /// Fails only if the relay task panicked.
    pub async fn shutdown(self) -> Result<(), tokio::task::JoinError> {
        self.0.shutdown().await
    }
}

/// Rounds in a row that may fail on a lock conflict and be tried again at
/// once; past them, the relay backs off as from an outage.
const IMMEDIATE_CONFLICT_RETRIES: u32 = 5;

/// Counter: rounds the database failed to break a lock conflict (deadlocks).
const LOCK_CONFLICTS: &str = "outbox_relay_lock_conflicts_total";

pub(super) fn spawn<P: Publisher>(relay: Relay<P>) -> RelayHandle {
    RelayHandle(Background::spawn(|stopped| run(relay, stopped)))
}

async fn run<P: Publisher>(relay: Relay<P>, mut stopped: watch::Receiver<bool>) {
    let config = relay.config.clone();
    let mut commits = CommitSignal::to(relay.store.db());
    let notified = std::sync::Arc::new(tokio::sync::Notify::new());
    let listener = listener(&relay, &notified);
    let mut failures = 0_u32;
    let mut conflicts = 0_u32;
    let mut next_housekeeping = Instant::now();
    let mut due = DueTimes::default();
    tracing::info!(batch_size = config.batch_size, "relay started");
    while !*stopped.borrow() {
        if Instant::now() >= next_housekeeping {
            housekeeping(&relay).await;
            next_housekeeping = Instant::now() + config.stats_interval;
        }
        let span = tracing::debug_span!("relay_drain");
        // A long drain pauses for housekeeping, the gauges mattering most
        // during a backlog, and when a scheduled event comes due.
        let drained = async {
            if due.stale(config.poll_interval, commits.scheduled()) {
                let seen = commits.scheduled();
                due.looked(seen, relay.promote_due().await?);
            }
            let next_due = due.next_due.map(instant_of);
            let pause = next_due.map_or(next_housekeeping, |due| due.min(next_housekeeping));
            pipeline::drain(&relay, Some(&stopped), Some(pause)).await?;
            Ok::<_, crate::Error>(pause)
        };
        let wait = match tracing::Instrument::instrument(drained, span).await {
            Ok(pause) => {
                conflicts = 0;
                if failures > 0 {
                    tracing::info!(failed_rounds = failures, "relay recovered");
                    failures = 0;
                }
                let now = Instant::now();
                if now >= pause {
                    continue; // paused, or something came due: more may be waiting
                }
                config.poll_interval.min(pause - now)
            }
            // Another relay won a lock conflict: not an outage, so no
            // backoff and no warning, unless it keeps happening.
            Err(error) if error.is_lock_conflict() && conflicts < IMMEDIATE_CONFLICT_RETRIES => {
                conflicts += 1;
                metrics::counter!(LOCK_CONFLICTS).increment(1);
                tracing::debug!(error = %crate::ErrorReport(&error), "a relay round lost a lock conflict; retrying at once");
                continue;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %crate::ErrorReport(&error), "relay cannot deliver; retrying with backoff");
                }
                config.outage.delay(failures)
            }
        };
        tokio::select! {
            () = commits.committed(), if failures == 0 => {}
            () = notified.notified(), if failures == 0 => {}
            () = tokio::time::sleep(wait) => {}
            // Err: the handle was dropped, which leaves the relay running.
            Ok(()) = stopped.changed() => {}
        }
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    tracing::info!("relay stopped");
}

/// What the worker last learnt of the scheduled events, so that a wake
/// looks at them only when something may have changed: an event came due,
/// this process committed scheduled events, or a poll interval passed
/// (another process may have). Each look is a statement, which at 1,000
/// wakes a second added a quarter of a millisecond to commit → ack.
#[derive(Debug, Default)]
struct DueTimes {
    /// When the earliest scheduled event is due, as of the last look.
    next_due: Option<DateTime<Utc>>,
    looked_at: Option<Instant>,
    /// The commit signal's count of commits with scheduled events as of the
    /// last look.
    seen: u64,
}

impl DueTimes {
    /// Whether to look again, given the commit signal's count of commits
    /// with scheduled events.
    fn stale(&self, poll_interval: std::time::Duration, scheduled: u64) -> bool {
        self.looked_at
            .is_none_or(|at| at.elapsed() >= poll_interval)
            || scheduled != self.seen
            || self.next_due.is_some_and(|due| due <= Utc::now())
    }

    fn looked(&mut self, seen: u64, next_due: Option<DateTime<Utc>>) {
        *self = Self {
            next_due,
            looked_at: Some(Instant::now()),
            seen,
        };
    }
}

/// The instant of a wall-clock time; now, if it has passed.
fn instant_of(time: DateTime<Utc>) -> Instant {
    Instant::now() + (time - Utc::now()).to_std().unwrap_or_default()
}

#[cfg(feature = "postgres")]
fn listener<P: Publisher>(
    relay: &Relay<P>,
    notified: &std::sync::Arc<tokio::sync::Notify>,
) -> Option<JoinHandle<()>> {
    relay
        .config
        .wake_on_notify
        .then(|| super::notify::listen(relay.store.db(), notified.clone()))
        .flatten()
}

#[cfg(not(feature = "postgres"))]
fn listener<P: Publisher>(
    _: &Relay<P>,
    _: &std::sync::Arc<tokio::sync::Notify>,
) -> Option<JoinHandle<()>> {
    None
}

/// Gauges, and deleting delivered rows past their retention.
async fn housekeeping<P: Publisher>(relay: &Relay<P>) {
    if let Some(retention) = relay.config.keep_delivered {
        let cutoff = Utc::now() - retention;
        let expired = outbox_message::Entity::delete_many()
            .filter(outbox_message::Column::DeliveredAt.lt(cutoff))
            .exec(relay.store.db())
            .await;
        if let Err(error) = expired {
            tracing::debug!(error = %crate::ErrorReport(&error), "could not delete expired delivered events");
        }
    }
    match stats::stats(relay.store.db()).await {
        Ok(stats) => stats::record_stats(&stats),
        Err(error) => {
            tracing::debug!(error = %crate::ErrorReport(&error), "could not read outbox stats")
        }
    }
}
