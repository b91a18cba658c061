//! Creates `outbox_scheduled`: events emitted for later, kept out of
//! `outbox_messages` until they are due.

use sea_orm::DbBackend;
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use super::idempotent;
use super::m20261123_000001_create_outbox_tables::payload;

pub(super) struct Migration;

/// The delivery time, to the microsecond everywhere: MySQL's `TIMESTAMP`
/// keeps whole seconds (MariaDB cuts the fraction off, so an event would go
/// out up to a second early) and ends in 2038.
fn deliver_at(backend: DbBackend) -> ColumnDef {
    match backend {
        DbBackend::MySql => ColumnDef::new(OutboxScheduled::DeliverAt)
            .custom("DATETIME(6)")
            .not_null()
            .take(),
        _ => timestamp_with_time_zone(OutboxScheduled::DeliverAt),
    }
}

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261201_000004_create_outbox_scheduled"
    }
}

#[derive(DeriveIden)]
enum OutboxScheduled {
    Table,
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
    DeliverAt,
}

const DUE_INDEX: &str = "outbox_scheduled_due";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use OutboxScheduled as Col;
        let backend = manager.get_database_backend();
        idempotent::create_table(
            manager,
            Table::create()
                .table(Col::Table)
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
                .col(deliver_at(backend))
                .to_owned(),
        )
        .await?;
        // The relay looks for due events, earliest first: one index range,
        // empty while nothing is due however many are pending.
        let due = Index::create()
            .name(DUE_INDEX)
            .table(Col::Table)
            .col(Col::DeliverAt)
            .col(Col::Id)
            .to_owned();
        idempotent::create_index(manager, DUE_INDEX, due).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(OutboxScheduled::Table).to_owned())
            .await
    }
}
