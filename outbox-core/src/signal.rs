//! Wakes relays in this process when a transaction with events commits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use tokio::sync::watch;

static COMMITS: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Counts a commit that wrote events; called by `#[transactional]` after commit.
pub(crate) fn committed() {
    COMMITS.send_modify(|n| *n = n.wrapping_add(1));
}

static SCHEDULES: AtomicU64 = AtomicU64::new(0);

/// Counts a commit that wrote scheduled events; called before [`committed`],
/// so that the relay it wakes sees it.
pub(crate) fn scheduled() {
    SCHEDULES.fetch_add(1, Ordering::Release);
}

/// How many commits with scheduled events this process has counted so far.
pub(crate) fn scheduled_count() -> u64 {
    SCHEDULES.load(Ordering::Acquire)
}

/// What the commits of one task's transaction, and of the calls nested in
/// it, wrote: carried by the task (`task_local`), so that the outermost
/// commit knows, without guessing from the process's counters, whether a
/// nested `#[transactional]` call emitted anything. A nested call's events
/// become visible only when the transaction around it commits.
#[derive(Debug, Default)]
pub(crate) struct Written {
    events: AtomicBool,
    scheduled: AtomicBool,
}

tokio::task_local! {
    static WRITTEN: Arc<Written>;
}

impl Written {
    /// The record of the transaction this task is in, if a `#[transactional]`
    /// call or the inbox opened one, or a new one.
    pub(crate) fn current() -> Arc<Self> {
        WRITTEN.try_with(Arc::clone).unwrap_or_default()
    }

    /// Runs `body` with `record` as its task's record.
    pub(crate) async fn scope<F: Future>(record: Arc<Self>, body: F) -> F::Output {
        WRITTEN.scope(record, body).await
    }

    /// Notes a commit (or a savepoint's release) that wrote events.
    pub(crate) fn note(&self, events: bool, scheduled: bool) {
        self.events.fetch_or(events || scheduled, Ordering::Relaxed);
        self.scheduled.fetch_or(scheduled, Ordering::Relaxed);
    }

    /// Wakes relays if anything was written, by this transaction or in it.
    pub(crate) fn signal(&self) {
        if self.scheduled.load(Ordering::Relaxed) {
            // A relay then looks again when the next scheduled event is due.
            scheduled();
        }
        if self.events.load(Ordering::Relaxed) {
            committed();
        }
    }
}

/// Wakes this process's relays, as the commit of a `#[transactional]`
/// function that emitted events does.
///
/// Call it after committing a transaction yourself in which a
/// `#[transactional]` function emitted events (called with your transaction,
/// it runs in a savepoint, whose release wakes relays before the events are
/// visible). Without it those events wait for the relays' next poll. Waking
/// relays with nothing to do costs each one an empty claim.
pub fn wake_relays() {
    scheduled();
    committed();
}

/// A subscription to commits of outbox events made in this process.
///
/// A relay waits on it instead of polling, so events leave the outbox as soon
/// as their transaction commits.
#[derive(Debug)]
pub struct CommitSignal(watch::Receiver<u64>);

impl CommitSignal {
    /// Subscribes; commits made before this call are not reported.
    pub fn subscribe() -> Self {
        Self(COMMITS.subscribe())
    }

    /// Resolves once a commit with events has happened since the last call
    /// (or since [`subscribe`](Self::subscribe)).
    pub async fn committed(&mut self) {
        // The sender lives in a static and is never dropped, so this cannot fail.
        let _ = self.0.changed().await;
    }
}
