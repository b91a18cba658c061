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
fn count() -> u64 {
    *COMMITS.borrow()
}

/// The process's counts of commits with events and with scheduled events,
/// taken when a transaction begins.
///
/// A nested `#[transactional]` call signals when its savepoint is released,
/// before its events are visible; the transaction around it signals again
/// after its own commit if the counts moved meanwhile ([`Counts::signal_since`]).
/// A commit elsewhere in the process moves them too, and then costs a relay
/// a spare wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    events: u64,
    scheduled: u64,
}

impl Counts {
    pub(crate) fn now() -> Self {
        Self {
            events: count(),
            scheduled: scheduled_count(),
        }
    }

    /// Wakes relays after a commit, for what the transaction wrote itself
    /// (`events`, `scheduled`) and for what nested calls signalled since `self`.
    pub(crate) fn signal_since(self, events: bool, scheduled: bool) {
        let now = Self::now();
        let scheduled = scheduled || now.scheduled != self.scheduled;
        if scheduled {
            // A relay then looks again when the next scheduled event is due.
            self::scheduled();
        }
        if events || scheduled || now != self {
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
