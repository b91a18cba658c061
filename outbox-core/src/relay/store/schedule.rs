//! Scheduled events coming due: moved from `outbox_scheduled` into the
//! outbox, where the claim finds them.
//!
//! Pending scheduled events cost the claim nothing because they are not in
//! its table. The relay's only look at them is one `MIN(deliver_at)`, the
//! first entry of the `(deliver_at, id)` index, and its worker looks only
//! when one may have come due or been added (`relay/worker.rs`).
//!
//! A moved event keeps its id, which is older than the events committed
//! since it was emitted: to the claim it is an event committed late, which
//! step 1 of the ordering argument (`relay/pipeline.rs`) already orders. Its
//! key's events still waiting go after it; those delivered went before.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, IntoIden, Order, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, Iterable, QuerySelect};
use uuid::Uuid;

use super::Store;
use crate::dialect::Dialect;
use crate::entity::{outbox_message, outbox_scheduled};

/// Moves every event due at `now` into the outbox, `limit` to a
/// transaction; returns how many it moved, and when the next one is due.
///
/// While nothing is due, which is nearly always, this is one statement
/// outside any transaction. When another relay holds the due events (and
/// moves them), this one leaves them to it and answers that nothing is due.
pub(in crate::relay) async fn promote_due(
    store: &Store,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<(usize, Option<DateTime<Utc>>), DbErr> {
    let mut moved = 0;
    loop {
        let next_due = next_due(store.db()).await?;
        if next_due.is_none_or(|at| at > now) {
            return Ok((moved, next_due));
        }
        let txn = store.begin(false).await?;
        let batch = move_due(&txn, store.dialect(), now, limit).await?;
        txn.commit().await?;
        if batch == 0 {
            return Ok((moved, None));
        }
        moved += batch;
    }
}

/// When the earliest scheduled event is due: the first entry of the
/// `(deliver_at, id)` index.
async fn next_due<C: ConnectionTrait>(conn: &C) -> Result<Option<DateTime<Utc>>, DbErr> {
    let next_due = outbox_scheduled::Entity::find()
        .select_only()
        .column_as(outbox_scheduled::Column::DeliverAt.min(), "next_due")
        .into_tuple::<Option<DateTime<Utc>>>()
        .one(conn)
        .await?;
    Ok(next_due.flatten())
}

/// Moves up to `limit` due events, earliest first, passing over those
/// another relay is moving.
async fn move_due<C: ConnectionTrait>(
    txn: &C,
    dialect: Dialect,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<usize, DbErr> {
    use outbox_scheduled::Column;
    let mut due = Query::select();
    due.column(Column::Id)
        .from(outbox_scheduled::Entity)
        .and_where(Expr::col(Column::DeliverAt).lte(now))
        .order_by(Column::DeliverAt, Order::Asc)
        .order_by(Column::Id, Order::Asc)
        .limit(u64::try_from(limit).unwrap_or(u64::MAX));
    dialect.lock_skipping(&mut due);
    let ids = txn
        .query_all(&due)
        .await?
        .iter()
        .map(|row| row.try_get_by_index::<Uuid>(0))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    // The outbox row: the scheduled one's columns (same names), due since `deliver_at`.
    let columns = Column::iter().map(|column| match column {
        Column::DeliverAt => outbox_message::Column::NextAttemptAt.into_iden(),
        column => column.into_iden(),
    });
    let mut source = Query::select();
    source
        .columns(Column::iter())
        .from(outbox_scheduled::Entity)
        .and_where(dialect.ids_in(Column::Id, ids.clone()));
    let insert = Query::insert()
        .into_table(outbox_message::Entity)
        .columns(columns)
        .select_from(source)
        .map_err(|error| DbErr::Custom(error.to_string()))?
        .to_owned();
    txn.execute(&insert).await?;
    let count = ids.len();
    dialect
        .delete_ids::<outbox_scheduled::Entity>(txn, Column::Id, ids)
        .await?;
    Ok(count)
}
