//! `outbox_inbox_dead_letters`: messages a consumer gave up on, with their payload and the reason.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One message a consumer could not handle.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_inbox_dead_letters")]
pub struct Model {
    /// This row's id (UUIDv7).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The consumer's durable name.
    pub consumer: String,
    /// The stream the message came from.
    pub stream: String,
    /// Its sequence in that stream; one dead letter per consumer and sequence.
    pub stream_sequence: i64,
    /// The subject it was published to.
    pub subject: String,
    /// The event id, when the message carried a valid one.
    pub event_id: Option<Uuid>,
    /// `Outbox-Event-Type`, when present.
    pub event_type: Option<String>,
    /// `Outbox-Event-Version`, when present and numeric.
    pub event_version: Option<i32>,
    /// `Outbox-Partition-Key`, when present.
    pub partition_key: Option<String>,
    /// The message body, unchanged.
    pub payload: Vec<u8>,
    /// Every message header, as a JSON object of strings.
    pub headers: String,
    /// Why it was dead-lettered: see [`DeadLetterReason`](crate::inbox::DeadLetterReason).
    pub reason: String,
    /// The last error in words.
    pub error: String,
    /// Deliveries made, the last included.
    pub deliveries: i32,
    /// When it was dead-lettered.
    pub failed_at: DateTimeUtc,
    /// When an operator asked for it to be handled again; the consumer
    /// picks it up and deletes the row once its handler has run.
    pub replay_requested_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
