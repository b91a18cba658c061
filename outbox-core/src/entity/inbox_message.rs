//! `outbox_inbox`: the events each consumer has handled, so that a redelivery is skipped.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One event one consumer has handled (or dead-lettered): its effect is committed.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_inbox")]
pub struct Model {
    /// The consumer's durable name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub consumer: String,
    /// The event id (`Nats-Msg-Id`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: Uuid,
    /// When the handler's transaction committed; rows older than the retention window are deleted.
    pub processed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
