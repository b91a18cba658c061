//! `outbox_scheduled`: events emitted with `at` or `after`, committed but not
//! due yet. The relay moves each into `outbox_messages` when it comes due,
//! so that pending ones never lie in the claim's path.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One event waiting for its delivery time; its columns are those of
/// [`outbox_message`](super::outbox_message) that `emit!` writes.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_scheduled")]
pub struct Model {
    /// The event id `emit!` returned: what [`cancel`](crate::cancel) takes.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub event_type: String,
    pub event_version: i32,
    pub exchange: String,
    pub subject: String,
    pub partition_key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Option<String>,
    pub content_type: String,
    /// When `emit!` recorded the event.
    pub created_at: DateTimeUtc,
    /// Not to be delivered before this time.
    pub deliver_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
