//! The claim: which committed events a relay may publish now.
//!
//! It takes the oldest `limit` due events, locked `FOR UPDATE SKIP LOCKED`
//! where the database can (so that relays never take the same row), and
//! drops each keyed event that an unclaimed older event of its key stops
//! (step 1 of the ordering argument in `relay/pipeline.rs`).
//!
//! The events that stop a key are found by a second statement over the
//! claimed keys (one index range per key), which returns nothing unless a key
//! is held up: a correlated probe per claimed row, the first design, spent
//! more time in PostgreSQL than the rest of the claim together. A count of
//! the keyed events up to the newest claimed one comes first, and the search
//! runs only when there are more of them than this relay holds.
//!
//! On MariaDB the claim is planned as a range of the due index and a sort
//! by id, which locks every due row it reads, not only the `limit` it
//! keeps, until the round settles: a second relay finds the rest locked and
//! claims what came due since. Nothing is lost or reordered by it, but
//! relays there share the work less than the number suggests.
//!
//! While a round of this relay is in flight, the claim filters out its id
//! span before locking: every locked row that reaches the lock step costs
//! PostgreSQL a check that its locker is still running, and with 2,000 rows
//! in flight that made the claim 1.7 times as long (2.7 ms against 1.6 ms
//! in `psql`; 1.3 ms with the span's upper bound as the index condition,
//! which needs a second statement for the rows below). Why that keeps order
//! is step 5 of the argument in `relay/pipeline.rs`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Order, Query, SelectStatement, SimpleExpr};
use sea_orm::{ConnectionTrait, DbErr, Iterable};
use uuid::Uuid;

use super::decode::{self, Claimed};
use crate::dialect::Dialect;
use crate::entity::outbox_message::{Column, Entity};

/// Another round of this relay, being published now and settled before the
/// claimed events are published.
#[derive(Debug, Default)]
pub(in crate::relay) struct InFlight {
    /// Its keyed events, which do not stop their keys here: that round
    /// holds back what follows its failures.
    pub keyed: Vec<Uuid>,
    /// The id span the claim skips: the round's first and last id, unless
    /// the round took events below the span its own claim skipped.
    pub span: Option<(Uuid, Uuid)>,
}

/// The publishable events among the oldest `limit` due ones outside the
/// in-flight round's span, in id (emit) order, with their `ctid` on PostgreSQL.
pub(in crate::relay) async fn claim<C: ConnectionTrait>(
    conn: &C,
    dialect: Dialect,
    limit: usize,
    now: DateTime<Utc>,
    keep_delivered: bool,
    in_flight: &InFlight,
) -> Result<Vec<Claimed>, DbErr> {
    let outside = (in_flight.span).map(|(first, last)| {
        Expr::col(Column::Id)
            .lt(first)
            .or(Expr::col(Column::Id).gt(last))
    });
    let claim = claim_statement(dialect, limit, now, keep_delivered, outside);
    let rows = conn.query_all(&claim).await?;
    let mut claimed = decode::decode_all(&rows, dialect.locates_rows())?;
    let first_stop = stops(conn, &claimed, keep_delivered, &in_flight.keyed).await?;
    if !first_stop.is_empty() {
        claimed.retain(|Claimed { event, .. }| {
            event.partition_key.as_ref().is_none_or(|key| {
                first_stop
                    .get(key.as_str())
                    .is_none_or(|stop| event.id < *stop)
            })
        });
    }
    Ok(claimed)
}

/// The oldest undelivered event of each claimed key that is older than a
/// claimed event of that key but neither claimed itself nor in flight, by key.
async fn stops<C: ConnectionTrait>(
    conn: &C,
    claimed: &[Claimed],
    keep_delivered: bool,
    in_flight: &[Uuid],
) -> Result<HashMap<String, Uuid>, DbErr> {
    let mut keys = HashSet::new();
    let mut ids = Vec::new();
    for Claimed { event, .. } in claimed {
        if let Some(key) = &event.partition_key {
            keys.insert(key.as_str());
            ids.push(event.id);
        }
    }
    let Some(&newest) = ids.last() else {
        return Ok(HashMap::new());
    };
    ids.extend(in_flight.iter().filter(|&&id| id < newest));
    if !keep_delivered && keyed_rows_through(conn, newest, ids.len()).await? == ids.len() {
        return Ok(HashMap::new());
    }
    let mut query = Query::select();
    query
        .columns([Column::PartitionKey, Column::Id])
        .from(Entity)
        .and_where(Expr::col(Column::PartitionKey).is_in(keys))
        .and_where(Expr::col(Column::Id).lt(newest))
        .and_where(Expr::col(Column::Id).is_not_in(ids));
    if keep_delivered {
        query.and_where(Expr::col(Column::DeliveredAt).is_null());
    }
    let mut first_stop: HashMap<String, Uuid> = HashMap::new();
    for row in conn.query_all(&query).await? {
        let (key, id): (String, Uuid) = (row.try_get_by_index(0)?, row.try_get_by_index(1)?);
        let stop = first_stop.entry(key).or_insert(id);
        *stop = Ord::min(*stop, id);
    }
    Ok(first_stop)
}

/// How many keyed events there are up to `newest`, counting no further than
/// one past `held`. When they are just the `held` claimed and in-flight ones,
/// nothing can stop a key and [`stops`] need not look: what a drain by one
/// relay meets round after round. The search binds every claimed key and id
/// (about 5,000 values a round with another in flight) and took 4-6 ms of
/// PostgreSQL's time a round of 2,000; the count, a walk of the primary key.
///
/// The limit keeps the walk to the rows the claim walked: unbounded, the
/// count of a 1,000,000-event backlog was planned as a parallel scan of the
/// table and made its drain four times slower. Not with delivered events
/// kept: they lie below `newest` too, and the walk would step over them all.
async fn keyed_rows_through<C: ConnectionTrait>(
    conn: &C,
    newest: Uuid,
    held: usize,
) -> Result<usize, DbErr> {
    let mut keyed = Query::select();
    keyed
        .expr(Expr::val(1))
        .from(Entity)
        .and_where(Expr::col(Column::PartitionKey).is_not_null())
        .and_where(Expr::col(Column::Id).lte(newest))
        .order_by(Column::Id, Order::Asc)
        .limit(u64::try_from(held).map_or(u64::MAX, |held| held.saturating_add(1)));
    let count = Query::select()
        .expr(Expr::cust("COUNT(*)"))
        .from_subquery(keyed, "keyed")
        .to_owned();
    let count: i64 = match conn.query_one(&count).await? {
        Some(row) => row.try_get_by_index(0)?,
        None => 0,
    };
    Ok(usize::try_from(count).unwrap_or(usize::MAX))
}

/// The oldest `limit` due rows, those matching `bound` if given, each with
/// its locator after the entity's columns where the dialect has one.
fn claim_statement(
    dialect: Dialect,
    limit: usize,
    now: DateTime<Utc>,
    keep_delivered: bool,
    bound: Option<SimpleExpr>,
) -> SelectStatement {
    let mut claim = Query::select();
    claim
        .columns(Column::iter())
        .from(Entity)
        .and_where(Expr::col(Column::NextAttemptAt).lte(now))
        .and_where_option(bound)
        .order_by(Column::Id, Order::Asc)
        .limit(u64::try_from(limit).unwrap_or(u64::MAX));
    if keep_delivered {
        claim.and_where(Expr::col(Column::DeliveredAt).is_null());
    }
    dialect.finish_claim(&mut claim);
    claim
}
