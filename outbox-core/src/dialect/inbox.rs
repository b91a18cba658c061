//! How the inbox's statements and the consumer's lock differ between
//! PostgreSQL, MySQL and SQLite.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, DbBackend, EntityTrait, Insert, QueryResult, QueryTrait, Statement,
};

use super::Dialect;

impl Dialect {
    /// `insert`, doing nothing if a row with the same `key` exists; it
    /// affects one row exactly when it inserted one.
    ///
    /// MySQL has no `ON CONFLICT DO NOTHING`, and its no-op `ON DUPLICATE KEY
    /// UPDATE` reports a found row as affected, so it gets `INSERT IGNORE`,
    /// which SeaQuery does not write: the one statement edited as text.
    pub(crate) fn insert_once<A, const N: usize>(
        self,
        mut insert: Insert<A>,
        key: [<A::Entity as EntityTrait>::Column; N],
    ) -> Statement
    where
        A: ActiveModelTrait,
    {
        if self.0 != DbBackend::MySql {
            insert = insert.on_conflict(OnConflict::columns(key).do_nothing().to_owned());
        }
        let mut statement = insert.build(self.0);
        if self.0 == DbBackend::MySql {
            statement.sql = statement.sql.replacen("INSERT ", "INSERT IGNORE ", 1);
        }
        statement
    }

    /// Whether an insert that skips existing rows can say which it
    /// inserted (`RETURNING`): not on MySQL, whose `INSERT IGNORE` returns
    /// nothing.
    pub(crate) fn returns_inserted(self) -> bool {
        self.0 != DbBackend::MySql
    }

    /// Whether several statements may go as one query: not on MySQL, whose
    /// driver sends one statement at a time.
    pub(crate) fn sends_several_statements(self) -> bool {
        self.0 != DbBackend::MySql
    }

    /// Whether the consumer's lock holds a connection: on PostgreSQL and
    /// MySQL; SQLite has no such lock.
    pub(crate) fn has_consumer_lock(self) -> bool {
        self.0 != DbBackend::Sqlite
    }

    /// Tries to take the lock of `consumer`, without waiting: a
    /// transaction-scoped advisory lock on PostgreSQL, `GET_LOCK` on MySQL
    /// (`None` on SQLite). [`took_consumer_lock`](Self::took_consumer_lock)
    /// reads its answer.
    pub(crate) fn take_consumer_lock(self, consumer: &str) -> Option<Statement> {
        match self.0 {
            DbBackend::Postgres => Some(self.consumer_lock("pg_try_advisory_xact_lock", consumer)),
            DbBackend::MySql => Some(self.consumer_lock("GET_LOCK", consumer)),
            _ => None,
        }
    }

    /// Whether the answer of [`take_consumer_lock`](Self::take_consumer_lock) says it took the lock.
    pub(crate) fn took_consumer_lock(
        self,
        row: Option<QueryResult>,
    ) -> Result<bool, sea_orm::DbErr> {
        Ok(match (self.0, row) {
            (DbBackend::Postgres, Some(row)) => row.try_get_by_index::<bool>(0)?,
            (_, Some(row)) => row.try_get_by_index::<Option<i64>>(0)? == Some(1),
            (_, None) => false,
        })
    }

    /// Lets the lock of `consumer` go before its transaction ends, where
    /// the transaction's end does not (MySQL's `GET_LOCK` belongs to the
    /// connection, which goes back to the pool).
    pub(crate) fn release_consumer_lock(self, consumer: &str) -> Option<Statement> {
        (self.0 == DbBackend::MySql).then(|| self.consumer_lock("RELEASE_LOCK", consumer))
    }

    /// `function` applied to the lock's name for `consumer` in the current
    /// schema (PostgreSQL) or database (MySQL), whose inbox the consumer
    /// uses: PostgreSQL's advisory locks take a number (a hash of the name),
    /// MySQL's names are server-wide and at most 64 characters (`outbox:`
    /// and a hash).
    fn consumer_lock(self, function: &str, consumer: &str) -> Statement {
        let name = format!("outbox-consumer:{consumer}");
        let sql = match self.0 {
            DbBackend::Postgres => {
                format!("SELECT {function}(hashtextextended(current_schema() || ':' || $1, 0))")
            }
            _ => {
                let lock = "CONCAT('outbox:', LEFT(SHA2(CONCAT(DATABASE(), ':', ?), 256), 56))";
                let wait = if function == "GET_LOCK" { ", 0" } else { "" };
                format!("SELECT {function}({lock}{wait})")
            }
        };
        Statement::from_sql_and_values(self.0, sql, [name.into()])
    }
}
