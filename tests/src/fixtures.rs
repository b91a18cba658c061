//! The business model, events and error type the tests share.

use outbox_core::inbox::Metadata;
use outbox_core::{OutboxEvent, emit, transactional};
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};
use serde::{Deserialize, Serialize};

/// The business table the handlers under test write.
pub mod order {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        pub total_cents: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
pub struct OrderCreated {
    pub order_id: i64,
    pub total_cents: i64,
}

/// An event of a numbered sequence per key, for ordering tests.
#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "seq.{key}", key = key)]
pub struct Sequenced {
    pub key: String,
    pub n: u32,
}

/// Emitted by a consumer's handler; its exchange has no stream in these tests,
/// so it stays in the outbox where the test reads it.
#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "stock", routing_key = "reserved", key = order_id)]
pub struct StockReserved {
    pub order_id: i64,
}

/// A consumer's handler: emits `StockReserved`, and fails for orders with a
/// negative total (so that its event is rolled back with it).
#[transactional]
pub async fn reserve_stock(
    event: OrderCreated,
    _meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    emit!(StockReserved {
        order_id: event.order_id
    });
    if event.total_cents < 0 {
        return Err(AppError::Rejected);
    }
    Ok(())
}

/// One transaction emitting `n` for each of `keys` keys (`k0`, `k1`, …), in key order.
#[transactional]
pub async fn emit_round(db: &DatabaseConnection, n: u32, keys: u32) -> Result<(), AppError> {
    for k in 0..keys {
        emit!(Sequenced {
            key: format!("k{k}"),
            n
        });
    }
    Ok(())
}

/// The error type of the handlers under test: an outbox error, or a business rejection.
#[derive(Debug)]
pub enum AppError {
    Outbox(outbox_core::Error),
    Rejected,
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Outbox(error) => error.fmt(f),
            AppError::Rejected => f.write_str("rejected by the business rule"),
        }
    }
}

impl std::error::Error for AppError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AppError::Outbox(error) => error.source(),
            AppError::Rejected => None,
        }
    }
}

impl From<outbox_core::Error> for AppError {
    fn from(error: outbox_core::Error) -> Self {
        AppError::Outbox(error)
    }
}

impl From<DbErr> for AppError {
    fn from(error: DbErr) -> Self {
        AppError::Outbox(error.into())
    }
}
