//! Migrations creating the outbox, dead-letter and inbox tables.
//!
//! Use them from your own `sea-orm-migration` migrator by appending
//! [`migrations()`] to its list, or run them on their own with
//! [`migrate`](crate::migrate()), which records them in a table of their own
//! (`outbox_migrations`) so that they never mix with your migrator's.

mod m20261123_000001_create_outbox_tables;
mod m20261123_000002_create_inbox_tables;
mod m20261201_000003_inbox_dead_letter_replay;
mod m20261201_000004_create_outbox_scheduled;
mod m20261201_000005_mysql_timestamp_precision;

use sea_orm::DatabaseConnection;
use sea_orm_migration::prelude::*;

/// The outbox's migrations, oldest first, for an application's own migrator.
///
/// ```no_run
/// use sea_orm_migration::prelude::*;
///
/// struct Migrator;
///
/// impl MigratorTrait for Migrator {
///     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
///         let mut migrations: Vec<Box<dyn MigrationTrait>> = vec![/* your own */];
///         migrations.extend(outbox_core::migrations());
///         migrations
///     }
/// }
/// ```
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20261123_000001_create_outbox_tables::Migration),
        Box::new(m20261123_000002_create_inbox_tables::Migration),
        Box::new(m20261201_000003_inbox_dead_letter_replay::Migration),
        Box::new(m20261201_000004_create_outbox_scheduled::Migration),
        Box::new(m20261201_000005_mysql_timestamp_precision::Migration),
    ]
}

/// Applies every outbox migration not applied yet; safe to call at each start.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), outbox_core::Error> {
/// outbox_core::migrate(&db).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(db: &DatabaseConnection) -> Result<(), crate::Error> {
    OutboxMigrator::up(db, None).await?;
    Ok(())
}

/// Runs [`migrations()`] with its own bookkeeping table.
struct OutboxMigrator;

impl MigratorTrait for OutboxMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations()
    }

    fn migration_table_name() -> DynIden {
        "outbox_migrations".into_iden()
    }
}
