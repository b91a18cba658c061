//! MySQL and MariaDB: the timestamp columns to microseconds (`TIMESTAMP(6)`),
//! and never updated by the server.
//!
//! They were created as `TIMESTAMP`, whole seconds. MariaDB truncates the
//! fraction of a stored time and MySQL rounds it: there, an event emitted in
//! the second half of a second got a `next_attempt_at` up to half a second
//! ahead of its commit, so the relay its commit woke did not claim it, and
//! it waited for the relay's next poll. PostgreSQL and SQLite keep
//! microseconds already, and `outbox_scheduled.deliver_at` was created with
//! them; nothing to do there.
//!
//! Each `NOT NULL` column also gets an explicit `DEFAULT CURRENT_TIMESTAMP(6)`
//! (the framework always writes them). Where `explicit_defaults_for_timestamp`
//! is off (MySQL 5.7, MariaDB before 10.10), the server gave the first
//! `TIMESTAMP NOT NULL` column of a table without one `ON UPDATE
//! CURRENT_TIMESTAMP`: an event's `created_at` moved to the time of every
//! retry, and an inbox dead letter's `failed_at` to the time its replay was
//! requested. An explicit default keeps the server from adding that clause.
//!
//! On MySQL each `ALTER TABLE` copies its table: on a large inbox, run the
//! migration when a pause of the consumers is acceptable.

use sea_orm::DbBackend;
use sea_orm_migration::prelude::*;

pub(super) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261201_000005_mysql_timestamp_precision"
    }
}

/// The whole-second columns of each table, and whether each may be NULL.
const COLUMNS: [(&str, &[(&str, bool)]); 5] = [
    (
        "outbox_messages",
        &[
            ("created_at", false),
            ("next_attempt_at", false),
            ("delivered_at", true),
        ],
    ),
    (
        "outbox_dead_letters",
        &[("created_at", false), ("failed_at", false)],
    ),
    ("outbox_inbox", &[("processed_at", false)]),
    (
        "outbox_inbox_dead_letters",
        &[("failed_at", false), ("replay_requested_at", true)],
    ),
    ("outbox_scheduled", &[("created_at", false)]),
];

/// Sets every column of [`COLUMNS`] to `column_type`, a table at a time,
/// with `default` as the default of those that are `NOT NULL`.
async fn retype(
    manager: &SchemaManager<'_>,
    column_type: &str,
    default: Option<&'static str>,
) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::MySql {
        return Ok(());
    }
    for (table, columns) in COLUMNS {
        let mut alter = Table::alter();
        alter.table(Alias::new(table));
        for &(column, nullable) in columns {
            let mut column = ColumnDef::new(Alias::new(column));
            column.custom(Alias::new(column_type));
            if nullable {
                column.null();
            } else {
                column.not_null();
                if let Some(default) = default {
                    column.default(Expr::cust(default));
                }
            }
            alter.modify_column(column);
        }
        manager.alter_table(alter).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        retype(manager, "TIMESTAMP(6)", Some("CURRENT_TIMESTAMP(6)")).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        retype(manager, "TIMESTAMP", None).await
    }
}
