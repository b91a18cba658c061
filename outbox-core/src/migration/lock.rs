//! The lock that lets several processes call [`migrate`](crate::migrate())
//! at once: the first migrates, the others wait and then find nothing to do.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr};

/// Held from [`acquire`](Self::acquire) to [`release`](Self::release), on
/// the transaction's connection.
#[derive(Debug)]
pub(super) struct MigrationLock {
    backend: DbBackend,
}

/// How long a MySQL process waits for another's migrations.
const MYSQL_WAIT_SECONDS: u32 = 600;

impl MigrationLock {
    /// PostgreSQL: an advisory lock of the transaction, keyed by the schema.
    /// MySQL: a named lock of the session, keyed by the database (DDL commits
    /// there, so it cannot be the transaction's). SQLite: none; it takes one
    /// writer at a time anyway.
    pub(super) async fn acquire(txn: &DatabaseTransaction) -> Result<Self, DbErr> {
        let backend = txn.get_database_backend();
        let sql = match backend {
            DbBackend::Postgres => {
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.outbox_migrations'))"
                    .to_owned()
            }
            DbBackend::MySql => format!(
                "SELECT GET_LOCK(SHA1(CONCAT(DATABASE(), '.outbox_migrations')), {MYSQL_WAIT_SECONDS})"
            ),
            _ => return Ok(Self { backend }),
        };
        let row = txn
            .query_one_raw(sea_orm::Statement::from_string(backend, sql))
            .await?;
        if backend == DbBackend::MySql {
            let got: Option<i64> = match row {
                Some(row) => row.try_get_by_index(0)?,
                None => None,
            };
            if got != Some(1) {
                return Err(DbErr::Custom(format!(
                    "another process held the outbox migration lock for {MYSQL_WAIT_SECONDS} s"
                )));
            }
        }
        Ok(Self { backend })
    }

    /// Lets the next process in (PostgreSQL's goes with the transaction).
    pub(super) async fn release(self, txn: &DatabaseTransaction) -> Result<(), DbErr> {
        if self.backend == DbBackend::MySql {
            txn.execute_unprepared(
                "DO RELEASE_LOCK(SHA1(CONCAT(DATABASE(), '.outbox_migrations')))",
            )
            .await?;
        }
        Ok(())
    }
}
