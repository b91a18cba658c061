//! Creates `outbox_consumer_partitions` and `outbox_consumer_members`: the
//! ownership, leases and positions of consumer names run as groups.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use super::idempotent;

pub(super) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000006_create_consumer_groups"
    }
}

#[derive(DeriveIden)]
enum Tables {
    OutboxConsumerPartitions,
    OutboxConsumerMembers,
}

#[derive(DeriveIden)]
enum Col {
    Consumer,
    PartitionIndex,
    PartitionCount,
    Owner,
    Epoch,
    LeaseUntilMs,
    Position,
    Member,
    AliveUntilMs,
    StreamEnd,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Names bounded so that MySQL can index them; times as Unix
        // milliseconds, compared alike on every backend.
        idempotent::create_table(
            manager,
            Table::create()
                .table(Tables::OutboxConsumerPartitions)
                .col(string_len(Col::Consumer, 255))
                .col(integer(Col::PartitionIndex))
                .col(integer(Col::PartitionCount))
                .col(string_len_null(Col::Owner, 255))
                .col(big_integer(Col::Epoch))
                .col(big_integer_null(Col::LeaseUntilMs))
                .col(big_integer(Col::Position))
                .primary_key(Index::create().col(Col::Consumer).col(Col::PartitionIndex))
                .to_owned(),
        )
        .await?;
        idempotent::create_table(
            manager,
            Table::create()
                .table(Tables::OutboxConsumerMembers)
                .col(string_len(Col::Consumer, 255))
                .col(string_len(Col::Member, 255))
                .col(big_integer(Col::AliveUntilMs))
                .col(big_integer_null(Col::StreamEnd))
                .primary_key(Index::create().col(Col::Consumer).col(Col::Member))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Tables::OutboxConsumerMembers,
            Tables::OutboxConsumerPartitions,
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
