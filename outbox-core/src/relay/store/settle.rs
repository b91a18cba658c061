//! After a publish: remove or mark what the broker stored, reschedule what it
//! rejected, dead-letter what can never be delivered — a statement per kind
//! (per attempt count and error, for the rescheduled).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, QueryFilter};
use uuid::Uuid;

use super::decode::{Claimed, RowLocation};
use crate::dialect::Dialect;
use crate::entity::{outbox_dead_letter, outbox_message};
use crate::insert::insert_all;
use crate::relay::config::RelayConfig;
use crate::relay::publish::Delivery;
use crate::relay::report::BatchReport;

/// A claimed event and its delivery, or `None` when it was held back behind
/// an earlier event of its key.
pub(in crate::relay) struct Settled {
    pub claimed: Claimed,
    pub delivery: Option<Delivery>,
}

/// Settles a published round, each event by its delivery.
pub(in crate::relay) async fn settle<C: ConnectionTrait>(
    conn: &C,
    dialect: Dialect,
    events: Vec<Settled>,
    config: &RelayConfig,
    now: DateTime<Utc>,
) -> Result<BatchReport, DbErr> {
    let mut report = BatchReport {
        claimed: events.len(),
        ..BatchReport::default()
    };
    let mut stored = Vec::new();
    let mut located = Vec::new();
    let mut dead = Vec::new();
    let mut retries: HashMap<Retry, Vec<Uuid>> = HashMap::new();
    for Settled { claimed, delivery } in events {
        let event = claimed.event;
        match delivery {
            // Held back behind an earlier event of its key: untouched, claimed again later.
            None => report.held_back += 1,
            Some(Delivery::Stored { duplicate }) => {
                report.published += 1;
                report.duplicates += usize::from(duplicate);
                stored.push(event.id);
                located.extend(claimed.row);
            }
            Some(Delivery::Oversized(error) | Delivery::Undeliverable(error)) => {
                dead.push(dead_letter(event, stored_text(&error), now));
            }
            Some(Delivery::Rejected(error)) => {
                let error = stored_text(&error);
                // The first rejection is worth a line: a dead letter would
                // say so only after every retry, minutes later.
                if event.attempts == 0 {
                    tracing::warn!(
                        event_id = %event.id,
                        event_type = %event.event_type,
                        subject = %event.subject,
                        error = %error,
                        "the broker rejected an event; it will be retried"
                    );
                }
                let attempts = event.attempts.saturating_add(1);
                if u32::try_from(attempts).unwrap_or(u32::MAX) >= config.max_attempts {
                    dead.push(dead_letter(event, error, now));
                } else {
                    report.retried += 1;
                    retries
                        .entry(Retry { attempts, error })
                        .or_default()
                        .push(event.id);
                }
            }
            Some(Delivery::Unavailable(error)) => {
                report.unavailable += 1;
                report.last_error = Some(error);
            }
        }
    }
    for (retry, ids) in retries {
        reschedule(conn, dialect, ids, retry, config, now).await?;
    }
    if !stored.is_empty() {
        let mut unsettled = stored.len() as u64;
        if located.len() == stored.len() {
            let done = settle_located(conn, dialect, &located, config, now).await?;
            unsettled = unsettled.saturating_sub(done);
        }
        // Rows without a locator, or that it did not reach (none, as the
        // claim's row locks keep them in place), go by id; settling a row
        // twice is harmless, as the first pass changed or removed it.
        if unsettled > 0 {
            mark_delivered(conn, dialect, stored, config, now).await?;
        }
    }
    if !dead.is_empty() {
        report.dead_lettered = dead.len();
        let ids: Vec<Uuid> = dead.iter().filter_map(|d| d.id.clone().take()).collect();
        for letter in &dead {
            tracing::warn!(
                event_id = %letter.id.as_ref(),
                error = %letter.last_error.as_ref(),
                "event dead-lettered"
            );
        }
        insert_all(conn, dead).await?;
        dialect
            .delete_ids::<outbox_message::Entity>(conn, outbox_message::Column::Id, ids)
            .await?;
    }
    Ok(report)
}

/// Deletes the delivered rows at `located`, or marks them `delivered_at` if
/// the relay keeps them for a while, a statement per table they are in (one,
/// unless the outbox is partitioned); returns how many there were.
async fn settle_located<C: ConnectionTrait>(
    conn: &C,
    dialect: Dialect,
    located: &[RowLocation],
    config: &RelayConfig,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let mut by_table: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
    for row in located {
        let table = row.table.as_deref();
        by_table.entry(table).or_default().push(&row.ctid);
    }
    let delivered_at = config.keep_delivered.map(|_| now);
    let mut done = 0;
    for (table, ctids) in by_table {
        let statement = dialect.settle_located(table, &ctids, delivered_at);
        done += conn.execute_raw(statement).await?.rows_affected();
    }
    Ok(done)
}

/// Deletes the delivered events `ids`, or marks them `delivered_at` if the
/// relay keeps them for a while; returns how many there were.
async fn mark_delivered<C: ConnectionTrait>(
    conn: &C,
    dialect: Dialect,
    ids: Vec<Uuid>,
    config: &RelayConfig,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    use outbox_message::{Column, Entity};
    if config.keep_delivered.is_none() {
        return dialect.delete_ids::<Entity>(conn, Column::Id, ids).await;
    }
    let marked = Entity::update_many()
        .col_expr(Column::DeliveredAt, Expr::value(now))
        .filter(dialect.ids_in(Column::Id, ids))
        .exec(conn)
        .await?;
    Ok(marked.rows_affected)
}

/// A delivery error as the outbox's `last_error` column keeps it: its text
/// and every cause under it.
pub(in crate::relay) fn stored_text(error: &crate::relay::DeliveryError) -> String {
    crate::ErrorReport(error).to_string()
}

/// What a rejected event's row gets, shared by the events of a round
/// rejected at the same attempt with the same error.
#[derive(PartialEq, Eq, Hash)]
struct Retry {
    attempts: i32,
    error: String,
}

/// Sets `ids` to be tried again after the backoff of `retry.attempts`
/// failures. One draw of the jitter serves the group: events rejected
/// together come due together and are claimed again in one round, while
/// rounds and relays still spread apart.
async fn reschedule<C: ConnectionTrait>(
    conn: &C,
    dialect: Dialect,
    ids: Vec<Uuid>,
    Retry { attempts, error }: Retry,
    config: &RelayConfig,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let failures = u32::try_from(attempts).unwrap_or(u32::MAX);
    let next = now + config.retry.delay(failures);
    outbox_message::Entity::update_many()
        .col_expr(outbox_message::Column::Attempts, Expr::value(attempts))
        .col_expr(outbox_message::Column::NextAttemptAt, Expr::value(next))
        .col_expr(outbox_message::Column::LastError, Expr::value(error))
        .filter(dialect.ids_in(outbox_message::Column::Id, ids))
        .exec(conn)
        .await?;
    Ok(())
}

/// The dead letter of `event`, which failed with `error`.
pub(in crate::relay) fn dead_letter(
    event: outbox_message::Model,
    error: String,
    now: DateTime<Utc>,
) -> outbox_dead_letter::ActiveModel {
    outbox_dead_letter::ActiveModel {
        id: Set(event.id),
        event_type: Set(event.event_type),
        event_version: Set(event.event_version),
        exchange: Set(event.exchange),
        subject: Set(event.subject),
        partition_key: Set(event.partition_key),
        payload: Set(event.payload),
        headers: Set(event.headers),
        content_type: Set(event.content_type),
        created_at: Set(event.created_at),
        attempts: Set(event.attempts.saturating_add(1)),
        last_error: Set(error),
        failed_at: Set(now),
    }
}
