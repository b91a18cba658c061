//! The claim: which committed events a relay may publish now, in one statement.
//!
//! It takes the oldest `limit` due events, locked `FOR UPDATE SKIP LOCKED`
//! where the database can (so that relays never take the same row), each
//! with the id of the previous undelivered event of its partition key (one
//! backward probe of the `(partition_key, id)` index). An event is
//! publishable when it has no key, or when its previous event is the one
//! before it in this same claim, or there is none: a key is then published
//! from its oldest event on, in order, and stops at the first event this
//! relay does not hold (another relay's, one backing off, one not yet
//! claimed). Several relays therefore split the keys between them without
//! ever reordering one.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{
    Alias, Expr, ExprTrait, LockBehavior, LockType, Order, Query, SelectStatement,
};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, Iterable};
use uuid::Uuid;

use crate::entity::outbox_message::{Column, Entity, Model};

/// The publishable events among the oldest `limit` due ones, in id (emit) order.
pub(super) async fn claim<C: ConnectionTrait>(
    conn: &C,
    limit: usize,
    now: DateTime<Utc>,
    keep_delivered: bool,
) -> Result<Vec<Model>, DbErr> {
    let statement = claim_statement(conn.get_database_backend(), limit, now, keep_delivered);
    let mut held: HashSet<Uuid> = HashSet::new();
    let mut batch = Vec::new();
    for row in conn.query_all(&statement).await? {
        let event = Model::from_query_result(&row, "")?;
        let previous: Option<Uuid> = row.try_get("", PREVIOUS)?;
        let publishable = event.partition_key.is_none()
            || previous.is_none_or(|previous| held.contains(&previous));
        if publishable {
            held.insert(event.id);
            batch.push(event);
        }
    }
    Ok(batch)
}

const PREVIOUS: &str = "previous_id";

fn claim_statement(
    backend: DbBackend,
    limit: usize,
    now: DateTime<Utc>,
    keep_delivered: bool,
) -> SelectStatement {
    let earlier = Alias::new("earlier");
    let mut previous = Query::select();
    previous
        .column((earlier.clone(), Column::Id))
        .from_as(Entity, earlier.clone())
        .and_where(
            Expr::col((earlier.clone(), Column::PartitionKey))
                .equals((Entity, Column::PartitionKey)),
        )
        .and_where(Expr::col((earlier.clone(), Column::Id)).lt(Expr::col((Entity, Column::Id))))
        .order_by((earlier.clone(), Column::Id), Order::Desc)
        .limit(1);
    let mut claim = Query::select();
    claim
        .columns(Column::iter().map(|c| (Entity, c)))
        .from(Entity)
        .and_where(Expr::col((Entity, Column::NextAttemptAt)).lte(now))
        .order_by((Entity, Column::Id), Order::Asc)
        .limit(u64::try_from(limit).unwrap_or(u64::MAX));
    if keep_delivered {
        previous.and_where(Expr::col((earlier, Column::DeliveredAt)).is_null());
        claim.and_where(Expr::col((Entity, Column::DeliveredAt)).is_null());
    }
    claim.expr_as(
        Expr::SubQuery(None, Box::new(previous.into())),
        Alias::new(PREVIOUS),
    );
    if backend != DbBackend::Sqlite {
        claim.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    claim
}
