//! What an operator asks of the outbox at once: the relay's backlog and dead
//! letters, the events scheduled for later, and each consumer's dead letters.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, Func, SimpleExpr};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryOrder, QuerySelect};

use crate::consumer::group;
use crate::entity::{inbox_dead_letter, outbox_scheduled};
use crate::relay::{OutboxStats, stats};

/// A snapshot of every outbox table, for `outbox status` and health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The relay's side: pending events, the oldest one, its dead letters.
    pub outbox: OutboxStats,
    /// Events emitted for later, not due yet (`emit!(event, at = ..)`).
    pub scheduled: u64,
    /// When the earliest of them comes due.
    pub next_scheduled: Option<DateTime<Utc>>,
    /// Each consumer that has dead letters, by name.
    pub consumers: Vec<ConsumerStatus>,
    /// Each consumer name run as a group, by name.
    pub groups: Vec<GroupStatus>,
}

/// A consumer group: its live members and who owns each partition.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStatus {
    /// The consumer name.
    pub name: String,
    /// The members alive now, by id.
    pub members: Vec<String>,
    /// The stream's last sequence as the members last saw it (at their last
    /// look at the group, every third of a lease), once one has read.
    pub stream_end: Option<u64>,
    /// Its partitions, in order.
    pub partitions: Vec<PartitionStatus>,
}

/// One partition of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// The partition.
    pub index: u32,
    /// The member that owns it, if its lease holds.
    pub owner: Option<String>,
    /// Changes of owner so far.
    pub epoch: i64,
    /// The stream sequence through which its messages are settled, as last
    /// stored.
    pub position: u64,
    /// Its lag: the stream's messages after `position`, of every partition
    /// (so at most its own), once a member has read.
    pub behind: Option<u64>,
}

/// One consumer's share of the inbox dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStatus {
    /// The consumer name.
    pub name: String,
    /// Its messages in `outbox_inbox_dead_letters`.
    pub dead_letters: u64,
    /// Of those, how many an operator handed back for replay, not yet taken.
    pub replay_requested: u64,
}

impl Status {
    /// Dead letters of every consumer together.
    pub fn inbox_dead_letters(&self) -> u64 {
        self.consumers.iter().map(|c| c.dead_letters).sum()
    }
}

/// Reads the snapshot: a few indexed counts, nothing that scans the inbox.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
/// let status = outbox_core::status(&db).await?;
/// println!("{} pending, {} consumer dead letters", status.outbox.pending, status.inbox_dead_letters());
/// # Ok(()) }
/// ```
pub async fn status<C: ConnectionTrait>(db: &C) -> Result<Status, DbErr> {
    let next_scheduled: Option<Option<DateTime<Utc>>> = outbox_scheduled::Entity::find()
        .select_only()
        .column_as(
            SimpleExpr::from(Func::min(Expr::col(outbox_scheduled::Column::DeliverAt))),
            "next",
        )
        .into_tuple()
        .one(db)
        .await?;
    use inbox_dead_letter::Column;
    let consumers: Vec<(String, i64, i64)> = inbox_dead_letter::Entity::find()
        .select_only()
        .column(Column::Consumer)
        .column_as(
            SimpleExpr::from(Func::count(Expr::col(Column::Id))),
            "dead_letters",
        )
        // COUNT of a column counts the rows where it is not NULL.
        .column_as(
            SimpleExpr::from(Func::count(Expr::col(Column::ReplayRequestedAt))),
            "replay_requested",
        )
        .group_by(Column::Consumer)
        .order_by_asc(Column::Consumer)
        .into_tuple()
        .all(db)
        .await?;
    Ok(Status {
        groups: groups(db).await?,
        outbox: stats(db).await?,
        scheduled: outbox_scheduled::Entity::find().count(db).await?,
        next_scheduled: next_scheduled.flatten(),
        consumers: (consumers.into_iter())
            .map(|(name, dead_letters, replay_requested)| ConsumerStatus {
                name,
                dead_letters: u64::try_from(dead_letters).unwrap_or(0),
                replay_requested: u64::try_from(replay_requested).unwrap_or(0),
            })
            .collect(),
    })
}

/// Every consumer group, from its tables.
async fn groups<C: ConnectionTrait>(db: &C) -> Result<Vec<GroupStatus>, DbErr> {
    use crate::entity::consumer_partition as partition;
    let now = Utc::now().timestamp_millis();
    let names: Vec<String> = partition::Entity::find()
        .select_only()
        .column(partition::Column::Consumer)
        .distinct()
        .order_by_asc(partition::Column::Consumer)
        .into_tuple()
        .all(db)
        .await?;
    let mut groups = Vec::with_capacity(names.len());
    for name in names {
        let stream_end = group::stream_end(db, &name, now).await?;
        let partitions = (group::partitions(db, &name).await?.into_iter())
            .map(|row| {
                let held = row.lease_until_ms.is_some_and(|until| until >= now);
                let position = row.position.unsigned_abs();
                PartitionStatus {
                    index: row.partition_index.unsigned_abs(),
                    owner: row.owner.filter(|_| held),
                    epoch: row.epoch,
                    position,
                    behind: stream_end.map(|end| end.saturating_sub(position)),
                }
            })
            .collect();
        groups.push(GroupStatus {
            members: group::members(db, &name, now).await?,
            name,
            stream_end,
            partitions,
        });
    }
    Ok(groups)
}
