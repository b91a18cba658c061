//! The write path the benchmark measures: its event, the handler variants
//! compared (`#[transactional]`, by hand, no outbox), and the backlog it emits.

use std::time::Instant;

use outbox_core::entity::outbox_message;
use outbox_core::uuid::Uuid;
use outbox_core::{OutboxEvent, emit, transactional};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, Statement, TransactionTrait,
};

use super::BoxError;
use super::measure::median;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "bench", routing_key = "k.{key}", key = key)]
pub(super) struct BenchEvent {
    pub(super) key: u32,
    pub(super) seq: u64,
    pub(super) data: String,
}

impl BenchEvent {
    /// An event whose JSON is `payload` bytes long (or as near as its fields allow).
    pub(super) fn sized(seq: u64, keys: u32, payload: usize) -> Self {
        let key = u32::try_from(seq % u64::from(keys.max(1))).unwrap_or(0);
        let mut event = Self {
            key,
            seq,
            data: String::new(),
        };
        let bare = serde_json::to_vec(&event).map_or(0, |json| json.len());
        event.data = "x".repeat(payload.saturating_sub(bare));
        event
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum BenchError {
    #[error(transparent)]
    Outbox(#[from] outbox_core::Error),
}

impl From<DbErr> for BenchError {
    fn from(error: DbErr) -> Self {
        Self::Outbox(error.into())
    }
}

/// A chunk of the backlog, in one transaction.
#[transactional]
pub(super) async fn emit_backlog(
    db: &DatabaseConnection,
    from: u64,
    to: u64,
    keys: u32,
    payload: usize,
) -> Result<(), BenchError> {
    for seq in from..to {
        emit!(BenchEvent::sized(seq, keys, payload));
    }
    Ok(())
}

/// The handler measured: one business row and one event.
#[transactional]
pub(super) async fn place_order(
    db: &DatabaseConnection,
    id: i64,
    payload: usize,
) -> Result<Uuid, BenchError> {
    insert_order(db, id).await?;
    Ok(emit!(BenchEvent::sized(id.unsigned_abs(), 1_000, payload)))
}

pub(super) async fn insert_order(db: &impl ConnectionTrait, id: i64) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO bench_orders (id, total_cents) VALUES ($1, $2)",
        [id.into(), 100_i64.into()],
    ))
    .await?;
    Ok(())
}

/// The same work written by hand: the business row and the outbox row, one transaction.
pub(super) async fn place_order_by_hand(
    db: &DatabaseConnection,
    id: i64,
    payload: usize,
) -> Result<(), BenchError> {
    let txn = db.begin().await?;
    insert_order(&txn, id).await?;
    let event = BenchEvent::sized(id.unsigned_abs(), 1_000, payload);
    let now = chrono::Utc::now();
    let row = outbox_message::ActiveModel {
        id: Set(Uuid::now_v7()),
        event_type: Set("BenchEvent".into()),
        event_version: Set(1),
        exchange: Set("bench".into()),
        subject: Set(format!("bench.k.{}", event.key)),
        partition_key: Set(Some(event.key.to_string())),
        payload: Set(serde_json::to_vec(&event).map_err(|e| DbErr::Custom(e.to_string()))?),
        headers: Set(None),
        content_type: Set("application/json".into()),
        created_at: Set(now),
        next_attempt_at: Set(now),
        ..Default::default()
    };
    outbox_message::Entity::insert(row)
        .exec_without_returning(&txn)
        .await?;
    txn.commit().await?;
    Ok(())
}

/// Only the business row.
pub(super) async fn place_order_plain(db: &DatabaseConnection, id: i64) -> Result<(), BenchError> {
    let txn = db.begin().await?;
    insert_order(&txn, id).await?;
    txn.commit().await?;
    Ok(())
}

impl super::Bench {
    /// `#[transactional]` over the hand-written transaction, and over the
    /// business row alone: the median over rounds of each round's ratio. A
    /// round runs the three variants back to back, in an order that rotates,
    /// so that drift, or a checkpoint landing in one round, does not weigh on
    /// one variant (each call waits for a WAL flush, whose time varies most).
    pub(super) async fn handler_overhead(&mut self) -> Result<(f64, f64), BoxError> {
        const ROUNDS: usize = 30;
        let per_round = self.args.handler_calls.div_ceil(ROUNDS);
        let (mut over_manual, mut over_plain) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let mut took = [0.0; 3];
            for offset in 0..3 {
                let variant = (round + offset) % 3;
                let started = Instant::now();
                for _ in 0..per_round {
                    self.next_id += 1;
                    let (db, id) = (&self.db, self.next_id);
                    match variant {
                        0 => {
                            place_order(db, id, self.args.payload).await?;
                        }
                        1 => place_order_by_hand(db, id, self.args.payload).await?,
                        _ => place_order_plain(db, id).await?,
                    }
                }
                took[variant] = started.elapsed().as_secs_f64();
            }
            over_manual.push(took[0] / took[1]);
            over_plain.push(took[0] / took[2]);
        }
        Ok((median(over_manual), median(over_plain)))
    }
}
