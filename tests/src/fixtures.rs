//! The business model, events and error type the tests share.

use outbox_core::OutboxEvent;
use sea_orm::DbErr;
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
