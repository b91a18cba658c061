//! Migrations creating the outbox, dead-letter and inbox tables.
//!
//! Use them from your own `sea-orm-migration` migrator by appending
//! [`migrations()`] to its list, or run them on their own with
//! [`migrate`](crate::migrate()), which records them in a table of their own
//! (`outbox_migrations`) so that they never mix with your migrator's.
//!
//! Both routes may meet on one database, in either order: each migration
//! checks before it changes anything ([`idempotent`]), so the second
//! bookkeeping to see it only records it. A migration added here must do
//! the same.

mod catalog;
mod idempotent;
mod lock;
mod m20261123_000001_create_outbox_tables;
mod m20261123_000002_create_inbox_tables;
mod m20261201_000003_inbox_dead_letter_replay;
mod m20261201_000004_create_outbox_scheduled;
mod m20261201_000005_mysql_timestamp_precision;
mod m20261204_000006_create_consumer_groups;

use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
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
        Box::new(m20261204_000006_create_consumer_groups::Migration),
    ]
}

/// Applies every outbox migration not applied yet; safe to call at each
/// start, from any number of processes at once (PostgreSQL and MySQL take a
/// lock per schema while they migrate), and after the application's own
/// migrator applied [`migrations()`].
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), outbox_core::Error> {
/// outbox_core::migrate(&db).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(db: &DatabaseConnection) -> Result<(), crate::Error> {
    // One transaction: on PostgreSQL it holds the lock and makes the
    // migrations all-or-nothing; elsewhere it keeps the lock's connection.
    let txn = db.begin().await?;
    let lock = lock::MigrationLock::acquire(&txn).await?;
    let applied = OutboxMigrator::up(&txn, None).await;
    lock.release(&txn).await?;
    applied?;
    txn.commit().await?;
    Ok(())
}

/// The tables [`migrations()`] create.
const TABLES: [&str; 7] = [
    "outbox_messages",
    "outbox_dead_letters",
    "outbox_inbox",
    "outbox_inbox_dead_letters",
    "outbox_scheduled",
    "outbox_consumer_partitions",
    "outbox_consumer_members",
];

/// Checks that the outbox's tables exist, for a program that does not
/// migrate them itself: [`Error::MissingTables`](crate::Error::MissingTables)
/// names the fix, where the first query would fail with the database's
/// own words.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), outbox_core::Error> {
/// outbox_core::check_schema(&db).await?;
/// # Ok(()) }
/// ```
pub async fn check_schema(db: &impl ConnectionTrait) -> Result<(), crate::Error> {
    let mut tables = Vec::new();
    for table in TABLES {
        if !catalog::has_table(db, table).await? {
            tables.push(table);
        }
    }
    match tables.is_empty() {
        true => Ok(()),
        false => Err(crate::Error::MissingTables { tables }),
    }
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
