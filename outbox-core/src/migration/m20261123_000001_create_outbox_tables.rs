//! Creates `outbox_messages` and `outbox_dead_letters`.

use sea_orm::DbBackend;
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use super::idempotent;

pub(super) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261123_000001_create_outbox_tables"
    }
}

#[derive(DeriveIden)]
enum Tables {
    OutboxMessages,
    OutboxDeadLetters,
}

#[derive(DeriveIden)]
enum Col {
    Id,
    EventType,
    EventVersion,
    Exchange,
    Subject,
    PartitionKey,
    Payload,
    Headers,
    ContentType,
    CreatedAt,
    Attempts,
    NextAttemptAt,
    LastError,
    DeliveredAt,
    FailedAt,
}

/// The columns describing an event, shared by the outbox and its dead letters.
fn event_table(backend: DbBackend, table: Tables) -> TableCreateStatement {
    Table::create()
        .table(table)
        .col(pk_uuid(Col::Id))
        .col(string(Col::EventType))
        .col(integer(Col::EventVersion))
        .col(string(Col::Exchange))
        .col(string(Col::Subject))
        .col(string_null(Col::PartitionKey))
        .col(payload(backend, Col::Payload))
        .col(text_null(Col::Headers))
        .col(string(Col::ContentType))
        .col(timestamp_with_time_zone(Col::CreatedAt))
        .col(integer(Col::Attempts).default(0))
        .to_owned()
}

/// A payload column that holds large events on every backend (MySQL's `BLOB` stops at 64 KiB).
pub(super) fn payload(backend: DbBackend, col: impl IntoIden) -> ColumnDef {
    match backend {
        DbBackend::MySql => ColumnDef::new(col).custom("LONGBLOB").not_null().take(),
        _ => blob(col),
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        idempotent::create_table(
            manager,
            event_table(backend, Tables::OutboxMessages)
                .col(timestamp_with_time_zone(Col::NextAttemptAt))
                .col(text_null(Col::LastError))
                .col(timestamp_with_time_zone_null(Col::DeliveredAt))
                .to_owned(),
        )
        .await?;
        // The relay claims due rows oldest first, and walks each partition key in order.
        for (name, first) in [
            ("outbox_messages_due", Col::NextAttemptAt),
            ("outbox_messages_partition", Col::PartitionKey),
        ] {
            let index = Index::create()
                .name(name)
                .table(Tables::OutboxMessages)
                .col(first)
                .col(Col::Id)
                .to_owned();
            idempotent::create_index(manager, name, index).await?;
        }
        idempotent::create_table(
            manager,
            event_table(backend, Tables::OutboxDeadLetters)
                .col(text(Col::LastError))
                .col(timestamp_with_time_zone(Col::FailedAt))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Tables::OutboxDeadLetters).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Tables::OutboxMessages).to_owned())
            .await
    }
}
