//! Adds `outbox_inbox_dead_letters.replay_requested_at`: a dead letter an
//! operator handed back to its consumer, which the consumer picks up.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use super::idempotent;

pub(super) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261201_000003_inbox_dead_letter_replay"
    }
}

#[derive(DeriveIden)]
enum OutboxInboxDeadLetters {
    Table,
    Consumer,
    ReplayRequestedAt,
}

const INDEX: &str = "outbox_inbox_dead_letters_replay";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let column = timestamp_with_time_zone_null(OutboxInboxDeadLetters::ReplayRequestedAt);
        idempotent::add_column(manager, "outbox_inbox_dead_letters", column).await?;
        // Each consumer looks for its requested replays every second.
        let index = Index::create()
            .name(INDEX)
            .table(OutboxInboxDeadLetters::Table)
            .col(OutboxInboxDeadLetters::Consumer)
            .col(OutboxInboxDeadLetters::ReplayRequestedAt)
            .to_owned();
        idempotent::create_index(manager, INDEX, index).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(INDEX)
                    .table(OutboxInboxDeadLetters::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxInboxDeadLetters::Table)
                    .drop_column(OutboxInboxDeadLetters::ReplayRequestedAt)
                    .to_owned(),
            )
            .await
    }
}
