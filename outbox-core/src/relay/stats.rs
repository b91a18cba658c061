//! What the outbox holds, and the relay's metrics (through the `metrics` facade).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, Func, SimpleExpr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect,
};

use super::BatchReport;
use crate::entity::{outbox_dead_letter, outbox_message};

/// Counters: events stored by the broker, duplicates among them, rejections, dead letters.
const PUBLISHED: &str = "outbox_published_total";
const DUPLICATES: &str = "outbox_duplicates_total";
const FAILURES: &str = "outbox_publish_failures_total";
const DEAD_LETTERED: &str = "outbox_dead_lettered_total";
/// Gauges: undelivered rows, and the age of the oldest one.
const PENDING: &str = "outbox_pending_rows";
const OLDEST_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Histograms: events per round and a round's duration.
const BATCH_SIZE: &str = "outbox_batch_size";
const BATCH_SECONDS: &str = "outbox_batch_duration_seconds";

/// A snapshot of the outbox tables.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Events not delivered yet.
    pub pending: u64,
    /// Since when the oldest of them has been due: its emit time, or for a
    /// scheduled event its delivery time. (A scheduled event that has been
    /// retried counts from its emit time: its row no longer says when it
    /// came due.)
    pub oldest_pending: Option<DateTime<Utc>>,
    /// Events in the dead-letter table.
    pub dead_letters: u64,
}

impl OutboxStats {
    /// Seconds since the oldest pending event came due (0 for a time
    /// ahead), or `None` with nothing pending: the age gauge and `outbox
    /// status` read it.
    pub fn oldest_pending_age(&self) -> Option<f64> {
        self.oldest_pending
            .map(|oldest| (Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1e3)
    }
}

/// Counts what the outbox holds.
pub async fn stats<C: ConnectionTrait>(db: &C) -> Result<OutboxStats, DbErr> {
    let pending =
        outbox_message::Entity::find().filter(outbox_message::Column::DeliveredAt.is_null());
    // Until its first attempt, a row's `next_attempt_at` is when it came due:
    // its `created_at` if emitted for now, its `deliver_at` if scheduled.
    let due_since = Expr::case(
        outbox_message::Column::Attempts.eq(0),
        Expr::col(outbox_message::Column::NextAttemptAt),
    )
    .finally(Expr::col(outbox_message::Column::CreatedAt));
    let oldest: Option<Option<DateTime<Utc>>> = pending
        .clone()
        .select_only()
        .column_as(SimpleExpr::from(Func::min(due_since)), "oldest")
        .into_tuple()
        .one(db)
        .await?;
    Ok(OutboxStats {
        pending: pending.count(db).await?,
        oldest_pending: oldest.flatten(),
        dead_letters: outbox_dead_letter::Entity::find().count(db).await?,
    })
}

pub(super) fn record_batch(report: &BatchReport, took: Duration) {
    metrics::counter!(PUBLISHED).increment(report.published as u64);
    metrics::counter!(DUPLICATES).increment(report.duplicates as u64);
    metrics::counter!(FAILURES).increment((report.retried + report.unavailable) as u64);
    metrics::counter!(DEAD_LETTERED).increment(report.dead_lettered as u64);
    metrics::histogram!(BATCH_SIZE).record(report.claimed as f64);
    metrics::histogram!(BATCH_SECONDS).record(took.as_secs_f64());
}

pub(super) fn record_stats(stats: &OutboxStats) {
    metrics::gauge!(PENDING).set(stats.pending as f64);
    metrics::gauge!(OLDEST_AGE).set(stats.oldest_pending_age().unwrap_or(0.0));
}
