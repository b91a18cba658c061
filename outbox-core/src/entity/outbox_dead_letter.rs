//! `outbox_dead_letters`: events the relay gave up on, kept with their payload and last error.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One event that could not be delivered.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_dead_letters")]
pub struct Model {
    /// The event id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// `Outbox-Event-Type`.
    pub event_type: String,
    /// `Outbox-Event-Version`.
    pub event_version: i32,
    /// The exchange (stream subject prefix).
    pub exchange: String,
    /// The subject it was to be published to.
    pub subject: String,
    /// Its partition key.
    pub partition_key: Option<String>,
    /// The serialized event.
    pub payload: Vec<u8>,
    /// Extra message headers as a JSON object, when there were any.
    pub headers: Option<String>,
    /// `Content-Type` of the payload.
    pub content_type: String,
    /// When `emit!` recorded the event.
    pub created_at: DateTimeUtc,
    /// Delivery attempts made.
    pub attempts: i32,
    /// Why it was given up on.
    pub last_error: String,
    /// When it was dead-lettered.
    pub failed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
