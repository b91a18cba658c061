//! `outbox_messages`: events committed by `#[transactional]` functions, waiting for the relay.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One event waiting to be delivered.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_messages")]
pub struct Model {
    /// The event id (UUIDv7, assigned at `emit!`): also `Nats-Msg-Id` and the inbox key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// `Outbox-Event-Type`.
    pub event_type: String,
    /// `Outbox-Event-Version`.
    pub event_version: i32,
    /// The exchange (stream subject prefix).
    pub exchange: String,
    /// The full subject the event is published to.
    pub subject: String,
    /// The partition key; events sharing one are delivered in order.
    pub partition_key: Option<String>,
    /// The serialized event.
    pub payload: Vec<u8>,
    /// Extra message headers as a JSON object, when there are any.
    pub headers: Option<String>,
    /// `Content-Type` of the payload.
    pub content_type: String,
    /// When `emit!` recorded the event (`Outbox-Occurred-At`).
    pub created_at: DateTimeUtc,
    /// Failed delivery attempts so far.
    pub attempts: i32,
    /// Not to be tried before this time (backoff after failures).
    pub next_attempt_at: DateTimeUtc,
    /// The last delivery error, if any.
    pub last_error: Option<String>,
    /// Set when delivered, if the relay keeps delivered rows for a while instead of deleting them.
    pub delivered_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
