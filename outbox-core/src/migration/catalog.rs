//! What the database's catalogue says exists, in the connection's own
//! schema (PostgreSQL's `current_schema()`, MySQL's `DATABASE()`).
//!
//! SeaORM's own checks (`SchemaManager::has_index`) need its driver
//! features, which would bring every database driver into every
//! application; these ask with plain SQL instead.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

/// Whether a table (or view) of this name exists.
pub(crate) async fn has_table(db: &impl ConnectionTrait, table: &str) -> Result<bool, DbErr> {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
        _ => "SELECT COUNT(*) FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?",
    };
    count_above_zero(db, sql, &[table]).await
}

/// Whether an index of this name exists.
pub(super) async fn has_index(db: &impl ConnectionTrait, index: &str) -> Result<bool, DbErr> {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname = $1"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND index_name = ?"
        }
        _ => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?",
    };
    count_above_zero(db, sql, &[index]).await
}

/// Whether `table` has a column of this name.
pub(super) async fn has_column(
    db: &impl ConnectionTrait,
    table: &str,
    column: &str,
) -> Result<bool, DbErr> {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?"
        }
        _ => "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?",
    };
    count_above_zero(db, sql, &[table, column]).await
}

/// Whether the count `sql` reads with `values` is above zero.
async fn count_above_zero(
    db: &impl ConnectionTrait,
    sql: &str,
    values: &[&str],
) -> Result<bool, DbErr> {
    let values = values.iter().map(|&value| value.into());
    let statement = Statement::from_sql_and_values(db.get_database_backend(), sql, values);
    let row = (db.query_one_raw(statement).await?)
        .ok_or_else(|| DbErr::Custom(format!("no row from `{sql}`")))?;
    Ok(row.try_get_by_index::<i64>(0)? > 0)
}
