//! The group's tables: members alive while they renew, partitions owned
//! under a lease and an epoch, and the fence a batch's transaction checks.
//!
//! Leases are liveness, not safety: a member's clock running ahead may take
//! a partition a little early. Safety is the epoch. Every take bumps it, and
//! a batch commits only if, inside its transaction, the partition's row
//! still carries the epoch it was taken at ([`fence`]). That read takes a
//! shared row lock (PostgreSQL `FOR SHARE`, MySQL `LOCK IN SHARE MODE`), so
//! batches of one owner never wait for each other, while a take, an
//! `UPDATE`, waits for the batches in flight to end: it then reads the
//! position they left, and any batch after it fails the fence. SQLite has
//! one writer at a time, which orders them the same way.

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue, ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
};

use crate::entity::{consumer_member as member, consumer_partition as partition};

/// A partition a member owns: taken at `epoch`, its messages settled
/// through stream sequence `position` when taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The partition.
    pub partition: u32,
    /// The epoch it was taken at.
    pub epoch: i64,
    /// Where to start reading it.
    pub position: u64,
}

/// Why a group's tables refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The consumer name's group was started with another partition count.
    #[error(
        "consumer `{consumer}` runs as a group of {stored} partitions, not {configured}: the count \
         is chosen once per consumer name (see docs/consumer-groups.md to change it)"
    )]
    PartitionCount {
        /// The consumer.
        consumer: String,
        /// The count asked for.
        configured: u32,
        /// The count its rows hold.
        stored: u32,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbErr),
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Creates the consumer's `count` partition rows if it has none, their
/// messages settled through stream sequence `start_after`, and checks
/// that a group started before chose the same count. In one transaction that
/// rolls back on a mismatch, so that no row of another count is left behind,
/// even when two members with different counts start at once.
pub async fn ensure_partitions(
    db: &impl TransactionTrait,
    consumer: &str,
    count: u32,
    start_after: u64,
) -> Result<(), GroupError> {
    let txn = db.begin().await?;
    let rows = (0..count).map(|index| partition::ActiveModel {
        consumer: ActiveValue::Set(consumer.to_owned()),
        partition_index: ActiveValue::Set(to_i32(index)),
        partition_count: ActiveValue::Set(to_i32(count)),
        owner: ActiveValue::Set(None),
        epoch: ActiveValue::Set(0),
        lease_until_ms: ActiveValue::Set(None),
        position: ActiveValue::Set(forward(start_after)),
    });
    let key = [
        partition::Column::Consumer,
        partition::Column::PartitionIndex,
    ];
    partition::Entity::insert_many(rows)
        .on_conflict_do_nothing_on(key)
        .exec(&txn)
        .await?;
    let stored = partition::Entity::find()
        .filter(partition::Column::Consumer.eq(consumer))
        .select_only()
        .column(partition::Column::PartitionCount)
        .distinct()
        .into_tuple::<i32>()
        .all(&txn)
        .await?;
    match stored.iter().find(|&&stored| stored != to_i32(count)) {
        None => Ok(txn.commit().await?),
        Some(&other) => {
            txn.rollback().await?;
            Err(GroupError::PartitionCount {
                consumer: consumer.to_owned(),
                configured: count,
                stored: other.unsigned_abs(),
            })
        }
    }
}

/// Records member `id` as alive until `until_ms`, having seen the stream
/// end at `stream_end`, extends the leases of the partitions it owns to
/// `until_ms`, and forgets members gone before `now_ms`. Returns how many
/// partitions it still owns.
pub async fn renew(
    db: &impl TransactionTrait,
    consumer: &str,
    id: &str,
    now_ms: i64,
    until_ms: i64,
    stream_end: Option<u64>,
) -> Result<u64, DbErr> {
    let txn = db.begin().await?;
    let row = member::ActiveModel {
        consumer: ActiveValue::Set(consumer.to_owned()),
        member: ActiveValue::Set(id.to_owned()),
        alive_until_ms: ActiveValue::Set(until_ms),
        stream_end: ActiveValue::Set(stream_end.map(forward)),
    };
    let key = [member::Column::Consumer, member::Column::Member];
    member::Entity::insert(row)
        .on_conflict(
            OnConflict::columns(key)
                .update_columns([member::Column::AliveUntilMs, member::Column::StreamEnd])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    member::Entity::delete_many()
        .filter(member::Column::Consumer.eq(consumer))
        .filter(member::Column::AliveUntilMs.lt(now_ms))
        .exec(&txn)
        .await?;
    let owned = partition::Entity::update_many()
        .col_expr(partition::Column::LeaseUntilMs, Expr::val(until_ms))
        .filter(partition::Column::Consumer.eq(consumer))
        .filter(partition::Column::Owner.eq(id))
        .exec(&txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(owned)
}

/// The members alive at `now_ms`, by id.
pub async fn members(
    db: &impl ConnectionTrait,
    consumer: &str,
    now_ms: i64,
) -> Result<Vec<String>, DbErr> {
    member::Entity::find()
        .filter(member::Column::Consumer.eq(consumer))
        .filter(member::Column::AliveUntilMs.gte(now_ms))
        .order_by_asc(member::Column::Member)
        .select_only()
        .column(member::Column::Member)
        .into_tuple()
        .all(db)
        .await
}

/// The stream's last sequence as the members alive at `now_ms` last saw it.
pub async fn stream_end(
    db: &impl ConnectionTrait,
    consumer: &str,
    now_ms: i64,
) -> Result<Option<u64>, DbErr> {
    let end: Option<Option<i64>> = member::Entity::find()
        .filter(member::Column::Consumer.eq(consumer))
        .filter(member::Column::AliveUntilMs.gte(now_ms))
        .select_only()
        .column_as(member::Column::StreamEnd.max(), "end")
        .into_tuple()
        .one(db)
        .await?;
    Ok(end.flatten().map(i64::unsigned_abs))
}

/// The consumer's partitions, in order.
pub async fn partitions(
    db: &impl ConnectionTrait,
    consumer: &str,
) -> Result<Vec<partition::Model>, DbErr> {
    partition::Entity::find()
        .filter(partition::Column::Consumer.eq(consumer))
        .order_by_asc(partition::Column::PartitionIndex)
        .all(db)
        .await
}

/// Takes partition `index` for `id` if it is free or its lease ended before
/// `now_ms`, bumping its epoch. Waits for the batches of a former owner still
/// in flight (see the module's doc), but for a second at most: one paused
/// mid-commit would hold up this member's whole loop, so the take fails
/// and is tried again at the next look.
pub async fn take(
    db: &impl TransactionTrait,
    consumer: &str,
    index: u32,
    id: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<Option<Claim>, DbErr> {
    let txn = db.begin().await?;
    let backend = txn.get_database_backend();
    // PostgreSQL's setting ends with the transaction; MySQL's is the
    // session's, so it is put back before the connection returns to the pool.
    let wait_a_second = match backend {
        DbBackend::Postgres => Some("SET LOCAL lock_timeout = '1s'"),
        DbBackend::MySql => Some("SET SESSION innodb_lock_wait_timeout = 1"),
        _ => None,
    };
    if let Some(statement) = wait_a_second {
        txn.execute_unprepared(statement).await?;
    }
    let claim = taken(&txn, consumer, index, id, now_ms, until_ms).await;
    if backend == DbBackend::MySql {
        txn.execute_unprepared("SET SESSION innodb_lock_wait_timeout = DEFAULT")
            .await?;
    }
    let claim = claim?;
    txn.commit().await?;
    Ok(claim)
}

/// [`take`]'s statements.
async fn taken(
    txn: &impl ConnectionTrait,
    consumer: &str,
    index: u32,
    id: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<Option<Claim>, DbErr> {
    let this = partition::Column::Consumer
        .eq(consumer)
        .and(partition::Column::PartitionIndex.eq(to_i32(index)));
    let free = partition::Column::Owner
        .is_null()
        .or(partition::Column::LeaseUntilMs.is_null())
        .or(partition::Column::LeaseUntilMs.lt(now_ms));
    let taken = partition::Entity::update_many()
        .col_expr(partition::Column::Owner, Expr::val(id))
        .col_expr(
            partition::Column::Epoch,
            Expr::col(partition::Column::Epoch).add(1),
        )
        .col_expr(partition::Column::LeaseUntilMs, Expr::val(until_ms))
        .filter(this.clone())
        .filter(free)
        .exec(txn)
        .await?
        .rows_affected;
    Ok(match taken {
        0 => None,
        _ => partition::Entity::find()
            .filter(this)
            .one(txn)
            .await?
            .map(|row| Claim {
                partition: index,
                epoch: row.epoch,
                position: row.position.unsigned_abs(),
            }),
    })
}

/// Lets `claim` go, recording that its messages are settled through
/// `position`: the next owner may take it at once.
pub async fn release(
    db: &impl ConnectionTrait,
    consumer: &str,
    id: &str,
    claim: &Claim,
    position: u64,
) -> Result<bool, DbErr> {
    let released = held(partition::Entity::update_many(), consumer, id, claim)
        .col_expr(partition::Column::Owner, Expr::val(None::<String>))
        .col_expr(partition::Column::LeaseUntilMs, Expr::val(None::<i64>))
        .col_expr(partition::Column::Position, Expr::val(forward(position)))
        .exec(db)
        .await?;
    Ok(released.rows_affected == 1)
}

/// Records, while `claim` holds, that the partition's messages are settled
/// through `position`; `false` if it no longer holds.
pub async fn advance(
    db: &impl ConnectionTrait,
    consumer: &str,
    id: &str,
    claim: &Claim,
    position: u64,
) -> Result<bool, DbErr> {
    let advanced = held(partition::Entity::update_many(), consumer, id, claim)
        .col_expr(partition::Column::Position, Expr::val(forward(position)))
        .exec(db)
        .await?;
    Ok(advanced.rows_affected == 1)
}

/// The fence: inside a batch's transaction, whether every claim of
/// `claims` still holds, read with the shared row lock that makes a take
/// wait for the transaction; one statement however many partitions the
/// batch has. A `false` must roll the transaction back.
pub async fn fence(
    db: &impl ConnectionTrait,
    consumer: &str,
    id: &str,
    claims: &[Claim],
) -> Result<bool, DbErr> {
    let held = (claims.iter()).fold(Condition::any(), |any, claim| {
        any.add(
            partition::Column::PartitionIndex
                .eq(to_i32(claim.partition))
                .and(partition::Column::Epoch.eq(claim.epoch)),
        )
    });
    // Rows, not a count: PostgreSQL locks no rows for an aggregate.
    let found = partition::Entity::find()
        .filter(partition::Column::Consumer.eq(consumer))
        .filter(partition::Column::Owner.eq(id))
        .filter(held)
        .select_only()
        .column(partition::Column::PartitionIndex)
        .lock_shared()
        .into_tuple::<i32>()
        .all(db)
        .await?;
    Ok(found.len() == claims.len())
}

/// A position as stored; positions never go back, so a position that does
/// not fit is the largest.
fn forward(position: u64) -> i64 {
    i64::try_from(position).unwrap_or(i64::MAX)
}

/// Narrows `query` to `claim`'s row while `id` holds it at its epoch.
fn held<Q: QueryFilter>(query: Q, consumer: &str, id: &str, claim: &Claim) -> Q {
    query
        .filter(partition::Column::Consumer.eq(consumer))
        .filter(partition::Column::PartitionIndex.eq(to_i32(claim.partition)))
        .filter(partition::Column::Owner.eq(id))
        .filter(partition::Column::Epoch.eq(claim.epoch))
}
