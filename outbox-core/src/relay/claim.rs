//! The claim query: which committed events a relay may publish now.
//!
//! An event is claimable when it is due and, if it has a partition key, no
//! earlier event of that key is still in the outbox: it is its key's head.
//! On PostgreSQL and MySQL heads are locked `FOR UPDATE SKIP LOCKED`, so each
//! relay owns the keys whose heads it locked; it may then take the following
//! events of those keys too, since no other relay can claim them while their
//! head exists. That keeps every key in order with any number of relays.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use crate::entity::outbox_message::{Column, Entity, Model};

/// Claims up to `limit` events, in id order (which is emit order).
pub(super) async fn claim<C: ConnectionTrait>(
    conn: &C,
    limit: usize,
    now: DateTime<Utc>,
    keep_delivered: bool,
) -> Result<Vec<Model>, DbErr> {
    let mut batch = heads(conn, limit, now, keep_delivered).await?;
    let keys: HashSet<&str> = batch
        .iter()
        .filter_map(|e| e.partition_key.as_deref())
        .collect();
    if keys.is_empty() || batch.len() >= limit {
        return Ok(batch);
    }
    let keys: Vec<String> = keys.into_iter().map(str::to_owned).collect();
    let head_ids: Vec<_> = batch.iter().map(|e| e.id).collect();
    let mut query = Entity::find()
        .filter(Column::PartitionKey.is_in(keys))
        .filter(Column::Id.is_not_in(head_ids))
        .order_by_asc(Column::Id)
        .limit(u64::try_from(limit - batch.len()).unwrap_or(u64::MAX));
    if keep_delivered {
        query = query.filter(Column::DeliveredAt.is_null());
    }
    // A key stops at its first event that is not due yet (it is backing off).
    let mut stopped = HashSet::new();
    for event in query.all(conn).await? {
        let key = event.partition_key.clone().unwrap_or_default();
        if stopped.contains(&key) || event.next_attempt_at > now {
            stopped.insert(key);
        } else {
            batch.push(event);
        }
    }
    batch.sort_by_key(|e| e.id);
    Ok(batch)
}

/// Due unkeyed events and due heads of keys, locked where the database can.
async fn heads<C: ConnectionTrait>(
    conn: &C,
    limit: usize,
    now: DateTime<Utc>,
    keep_delivered: bool,
) -> Result<Vec<Model>, DbErr> {
    let earlier = Alias::new("earlier");
    let mut earlier_of_key = Query::select();
    earlier_of_key
        .expr(Expr::val(1))
        .from_as(Entity, earlier.clone())
        .and_where(
            Expr::col((earlier.clone(), Column::PartitionKey))
                .equals((Entity, Column::PartitionKey)),
        )
        .and_where(Expr::col((earlier.clone(), Column::Id)).lt(Expr::col((Entity, Column::Id))));
    if keep_delivered {
        earlier_of_key.and_where(Expr::col((earlier, Column::DeliveredAt)).is_null());
    }
    let mut query = Entity::find()
        .filter(Column::NextAttemptAt.lte(now))
        .filter(
            Condition::any()
                .add(Column::PartitionKey.is_null())
                .add(Expr::exists(earlier_of_key).not()),
        )
        .order_by_asc(Column::Id)
        .limit(u64::try_from(limit).unwrap_or(u64::MAX));
    if keep_delivered {
        query = query.filter(Column::DeliveredAt.is_null());
    }
    if conn.get_database_backend() != DbBackend::Sqlite {
        query = query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    query.all(conn).await
}
