//! Schema changes that do nothing when already made.
//!
//! The outbox's migrations run from two bookkeepings that know nothing of
//! each other: an application's own migrator (`seaql_migrations`) and
//! [`migrate`](crate::migrate()) (`outbox_migrations`, used by the `outbox`
//! binary). Whichever runs second finds the tables there and must only
//! record the migration, so every step checks first.

use sea_orm_migration::prelude::*;

use super::catalog;

/// Creates a table unless one of its name exists.
pub(super) async fn create_table(
    manager: &SchemaManager<'_>,
    mut table: TableCreateStatement,
) -> Result<(), DbErr> {
    manager.create_table(table.if_not_exists().take()).await
}

/// Creates the index `name` (which `index` must carry) unless it exists.
pub(super) async fn create_index(
    manager: &SchemaManager<'_>,
    name: &str,
    index: IndexCreateStatement,
) -> Result<(), DbErr> {
    if !catalog::has_index(manager.get_connection(), name).await? {
        manager.create_index(index).await?;
    }
    Ok(())
}

/// Adds `column` to `table` unless the table has a column of its name.
pub(super) async fn add_column(
    manager: &SchemaManager<'_>,
    table: &str,
    mut column: ColumnDef,
) -> Result<(), DbErr> {
    let name = column.get_column_name();
    if !catalog::has_column(manager.get_connection(), table, &name).await? {
        let alter = Table::alter()
            .table(Alias::new(table))
            .add_column(&mut column)
            .to_owned();
        manager.alter_table(alter).await?;
    }
    Ok(())
}
