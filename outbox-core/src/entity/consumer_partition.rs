//! `outbox_consumer_partitions`: who owns each partition of a consumer group,
//! since when (its epoch), and how far its messages are settled.
// SeaORM's derives generate public items that carry no docs of their own.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One partition of a consumer name that runs as a group.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_consumer_partitions")]
pub struct Model {
    /// The consumer's name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub consumer: String,
    /// The partition, `0..count`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub partition_index: i32,
    /// How many partitions the consumer name has, as chosen when its group
    /// first started: the same on every row of the name.
    pub partition_count: i32,
    /// The member that owns it; `None` while free.
    pub owner: Option<String>,
    /// Bumped at every change of owner: a member commits an effect for the
    /// partition only while the epoch it took is still the row's (the fence).
    pub epoch: i64,
    /// When the owner's lease ends unless renewed (Unix milliseconds); past
    /// it, another member may take the partition.
    pub lease_until_ms: Option<i64>,
    /// The stream sequence through which every message of the partition is
    /// settled: where a new owner starts reading.
    pub position: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
