//! Wakes relays in this process when a transaction with events commits.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// How many commits with events this process has counted so far.
pub(crate) fn count() -> u64 {
    *COMMITS.borrow()
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
