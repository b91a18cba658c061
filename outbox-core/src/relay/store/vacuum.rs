//! Vacuuming the outbox during a long drain (PostgreSQL).
//!
//! Each claim walks the primary key from its start, and a drain leaves that
//! start full of the deleted rows' index entries until the table is
//! vacuumed. With 500,000 of a 1,000,000-event backlog drained, a claim took
//! 6 ms, 5 of them stepping over those entries (`EXPLAIN ANALYZE`: 1,900
//! index pages before the first live row; 0.1 ms after a `VACUUM`), and the
//! drain's PostgreSQL CPU per event was 1.75 times a 100,000-event one's.
//! Autovacuum looks at a database once a minute, too late for a drain of
//! seconds; so the relay vacuums the table itself, in the background, after
//! every so many deleted events.
//!
//! Without truncating the table's empty end (`TRUNCATE false`): that takes
//! an exclusive lock, which the relay's own claims keep from it, and
//! `VACUUM` tries for it up to five seconds per table. On an outbox
//! partitioned by id, whose drained partitions are empty to the end, one
//! vacuum took 1.2 s instead of 5–10 ms, and in a 1,000,000-event drain over
//! ten partitions none finished. An outbox reuses the space anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sea_orm::{ConnectionTrait, DatabaseConnection};

/// Deleted events since the last vacuum, and whether one is running.
#[derive(Debug, Default)]
pub(in crate::relay) struct Vacuum {
    deleted: AtomicU64,
    running: Arc<AtomicBool>,
}

impl Vacuum {
    /// Counts `count` deleted events; once `every` have been deleted since
    /// the last vacuum, and none is running, starts one on a connection of
    /// `db`'s pool. A failure (the database restarting, say) is logged and
    /// the next threshold tries again; a role that does not own the table
    /// gets a warning from PostgreSQL and no vacuum.
    pub(super) fn deleted(&self, db: &DatabaseConnection, count: u64, every: u64) {
        let total = self.deleted.fetch_add(count, Ordering::Relaxed) + count;
        if total < every || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.deleted.store(0, Ordering::Relaxed);
        let db = db.clone();
        let running = Arc::clone(&self.running);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match db
                .execute_unprepared("VACUUM (TRUNCATE false) outbox_messages")
                .await
            {
                Ok(_) => tracing::debug!(took = ?started.elapsed(), "vacuumed outbox_messages"),
                Err(error) => {
                    tracing::info!(error = %crate::ErrorReport(&error), "could not vacuum outbox_messages")
                }
            }
            running.store(false, Ordering::Release);
        });
    }
}
