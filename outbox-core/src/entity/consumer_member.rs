//! `outbox_consumer_members`: the processes running a consumer group, each
//! alive while it renews its lease.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One process running a consumer name as a group.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_consumer_members")]
pub struct Model {
    /// The consumer's name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub consumer: String,
    /// The member's id, new at each start of a process.
    #[sea_orm(primary_key, auto_increment = false)]
    pub member: String,
    /// When it counts as gone unless it renews (Unix milliseconds).
    pub alive_until_ms: i64,
    /// The stream's last sequence as the member's reading last saw it.
    pub stream_end: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
