//! Creates `outbox_inbox` and `outbox_inbox_dead_letters`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use super::idempotent;
use super::m20261123_000001_create_outbox_tables::payload;

pub(super) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261123_000002_create_inbox_tables"
    }
}

#[derive(DeriveIden)]
enum Tables {
    OutboxInbox,
    OutboxInboxDeadLetters,
}

#[derive(DeriveIden)]
enum Col {
    Id,
    Consumer,
    EventId,
    ProcessedAt,
    Stream,
    StreamSequence,
    Subject,
    EventType,
    EventVersion,
    PartitionKey,
    Payload,
    Headers,
    Reason,
    Error,
    Deliveries,
    FailedAt,
}

const PROCESSED_INDEX: &str = "outbox_inbox_processed";
const MESSAGE_INDEX: &str = "outbox_inbox_dead_letters_message";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        idempotent::create_table(
            manager,
            Table::create()
                .table(Tables::OutboxInbox)
                // Bounded so that MySQL can index it.
                .col(string_len(Col::Consumer, 255))
                .col(uuid(Col::EventId))
                .col(timestamp_with_time_zone(Col::ProcessedAt))
                .primary_key(Index::create().col(Col::Consumer).col(Col::EventId))
                .to_owned(),
        )
        .await?;
        // Retention deletes each consumer's oldest rows.
        let processed = Index::create()
            .name(PROCESSED_INDEX)
            .table(Tables::OutboxInbox)
            .col(Col::Consumer)
            .col(Col::ProcessedAt)
            .to_owned();
        idempotent::create_index(manager, PROCESSED_INDEX, processed).await?;
        idempotent::create_table(
            manager,
            Table::create()
                .table(Tables::OutboxInboxDeadLetters)
                .col(pk_uuid(Col::Id))
                .col(string_len(Col::Consumer, 255))
                .col(string_len(Col::Stream, 255))
                .col(big_integer(Col::StreamSequence))
                .col(string(Col::Subject))
                .col(uuid_null(Col::EventId))
                .col(string_null(Col::EventType))
                .col(integer_null(Col::EventVersion))
                .col(string_null(Col::PartitionKey))
                .col(payload(backend, Col::Payload))
                .col(text(Col::Headers))
                .col(string(Col::Reason))
                .col(text(Col::Error))
                .col(integer(Col::Deliveries))
                .col(timestamp_with_time_zone(Col::FailedAt))
                .to_owned(),
        )
        .await?;
        // A redelivery of a message already dead-lettered adds no second row.
        let message = Index::create()
            .name(MESSAGE_INDEX)
            .table(Tables::OutboxInboxDeadLetters)
            .col(Col::Consumer)
            .col(Col::Stream)
            .col(Col::StreamSequence)
            .unique()
            .to_owned();
        idempotent::create_index(manager, MESSAGE_INDEX, message).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(Tables::OutboxInboxDeadLetters)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(Tables::OutboxInbox).to_owned())
            .await
    }
}
