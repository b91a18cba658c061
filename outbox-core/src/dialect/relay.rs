//! How the relay's statements differ between PostgreSQL, MySQL and SQLite.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{
    Expr, ExprTrait, LockBehavior, LockType, PgFunc, SelectStatement, SimpleExpr,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, IdenStatic, IsolationLevel, QueryFilter, Statement, TransactionTrait,
};
use uuid::Uuid;

use super::Dialect;

impl Dialect {
    /// Whether claimed rows stay locked until settled (`FOR UPDATE SKIP
    /// LOCKED`): everywhere but on SQLite, which runs one relay and keeps no
    /// write lock while publishing.
    pub(crate) fn locks_rows(self) -> bool {
        self.0 != DbBackend::Sqlite
    }

    /// Whether consecutive rounds may overlap: PostgreSQL only. Not on MySQL:
    /// a round's rows stay locked until its settle, and InnoDB's claim can
    /// lock more due rows than it takes (see `store::claim`), so the next
    /// round would claim little while the one in flight holds the rest.
    pub(crate) fn overlaps_rounds(self) -> bool {
        self.0 == DbBackend::Postgres
    }

    /// Whether the relay vacuums the outbox during a long drain: PostgreSQL,
    /// whose deleted rows' index entries the claim otherwise steps over
    /// until autovacuum comes (`store::vacuum`).
    pub(crate) fn vacuums(self) -> bool {
        self.0 == DbBackend::Postgres
    }

    /// Whether the claim reads each row's locator (PostgreSQL's `ctid`),
    /// which the settle then deletes by (see [`settle_located`](Self::settle_located)).
    pub(crate) fn locates_rows(self) -> bool {
        self.0 == DbBackend::Postgres
    }

    /// Adds the row locator after the entity's columns, and the row lock:
    /// the `ctid`, then the table the row lives in if it is not
    /// `outbox_messages` itself (see [`settle_located`](Self::settle_located)),
    /// so that the common case reads a NULL instead of a name per row.
    pub(crate) fn finish_claim(self, claim: &mut SelectStatement) {
        if self.locates_rows() {
            claim.expr(Expr::cust("ctid::text"));
            claim.expr(Expr::cust(
                "CASE WHEN tableoid = CAST('outbox_messages' AS regclass) \
                 THEN NULL ELSE CAST(CAST(tableoid AS regclass) AS text) END",
            ));
        }
        self.lock_skipping(claim);
    }

    /// Locks the selected rows until the transaction ends, passing over rows
    /// another transaction holds (`FOR UPDATE SKIP LOCKED`), where rows lock.
    pub(crate) fn lock_skipping(self, select: &mut SelectStatement) {
        if self.locks_rows() {
            select.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
    }

    /// Begins one of the relay's transactions.
    ///
    /// On MySQL at READ COMMITTED: under InnoDB's default REPEATABLE READ the
    /// claim's locking read also locks the gaps of the index ranges it scans,
    /// and handlers inserting events into those gaps deadlock with it. With
    /// `async_commit`, on PostgreSQL, without waiting for the WAL flush.
    pub(crate) async fn begin(
        self,
        db: &DatabaseConnection,
        async_commit: bool,
    ) -> Result<DatabaseTransaction, DbErr> {
        let txn = match self.0 {
            DbBackend::MySql => {
                db.begin_with_config(Some(IsolationLevel::ReadCommitted), None)
                    .await?
            }
            _ => db.begin().await?,
        };
        if async_commit && self.0 == DbBackend::Postgres {
            txn.execute_unprepared("SET LOCAL synchronous_commit = off")
                .await?;
        }
        Ok(txn)
    }

    /// The statement that deletes (or, with `delivered_at`, marks) stored
    /// rows of one table by position: `table` as the claim named it, `None`
    /// for `outbox_messages` itself. A row locked by this transaction stays
    /// where the claim found it, and fetching 2,000 rows by position took
    /// PostgreSQL a quarter of the time that looking each id up in the
    /// primary key did (0.5 ms against 2.6, `EXPLAIN ANALYZE` in `psql`).
    /// The array goes through a subquery so that the planner cannot see its
    /// length: it costs a fetch by `ctid` as a random page read, and for a
    /// few thousand would rather read the whole table.
    ///
    /// A `ctid` names a row within one table only: in a partitioned
    /// `outbox_messages`, or one other tables inherit from, the same `ctid`
    /// is a row in each. So each table gets its own statement, `ONLY` that
    /// table; a delete by id on a partitioned outbox, which the planner
    /// cannot narrow to one partition when the ids are a parameter, took
    /// 10.8 ms a round of 2,000 against 1.5 by position.
    ///
    /// The ctids go as one array literal, `{"(0,1)","(0,2)"}`: a single text
    /// value to bind, where SeaORM copied a `text[]` of 2,000 string by string.
    pub(crate) fn settle_located(
        self,
        table: Option<&str>,
        ctids: &[&str],
        delivered_at: Option<DateTime<Utc>>,
    ) -> Statement {
        let mut literal = String::with_capacity(ctids.len() * 16 + 2);
        literal.push('{');
        for (index, ctid) in ctids.iter().enumerate() {
            if index > 0 {
                literal.push(',');
            }
            literal.push('"');
            literal.push_str(ctid);
            literal.push('"');
        }
        literal.push('}');
        // The name is PostgreSQL's own rendering of a table's oid, quoted
        // where it needs to be.
        let table = table.unwrap_or("outbox_messages");
        let rows = "ctid = ANY(ARRAY(SELECT unnest(CAST($1 AS tid[]))))";
        let (sql, values) = match delivered_at {
            Some(at) => (
                format!("UPDATE ONLY {table} SET delivered_at = $2 WHERE {rows}"),
                vec![literal.into(), at.into()],
            ),
            None => (
                format!("DELETE FROM ONLY {table} WHERE {rows}"),
                vec![literal.into()],
            ),
        };
        Statement::from_sql_and_values(self.0, sql, values)
    }

    /// Deletes the rows of `E` whose primary key `column` holds one of these
    /// ids; returns how many there were.
    ///
    /// On MySQL the delete is held to the primary key (`FORCE INDEX
    /// (PRIMARY)`, which only the multi-table form takes). `DELETE ... WHERE
    /// id IN (...)` over much of a small table is planned as a table scan,
    /// and a scanning delete waits on every row it reads that another
    /// transaction locked (unlike an `UPDATE`, it gets no semi-consistent
    /// read): two relays' settles waited on each other's claimed rows and
    /// InnoDB failed one with 1213. By primary key a delete reads only its
    /// own rows, which the claim locked. Elsewhere [`ids_in`](Self::ids_in).
    pub(crate) async fn delete_ids<E: EntityTrait>(
        self,
        conn: &impl ConnectionTrait,
        column: E::Column,
        ids: Vec<Uuid>,
    ) -> Result<u64, DbErr> {
        if self.0 != DbBackend::MySql {
            let rows = self.ids_in(column, ids);
            let deleted = E::delete_many().filter(rows).exec(conn).await?;
            return Ok(deleted.rows_affected);
        }
        let (table, column) = (E::default().table_name(), column.as_str());
        let marks = vec!["?"; ids.len()].join(",");
        let sql = format!(
            "DELETE t FROM `{table}` AS t FORCE INDEX (PRIMARY) WHERE t.`{column}` IN ({marks})"
        );
        let statement =
            Statement::from_sql_and_values(self.0, sql, ids.into_iter().map(Into::into));
        Ok(conn.execute_raw(statement).await?.rows_affected())
    }

    /// The rows whose `column` holds one of these ids. On PostgreSQL one
    /// array parameter (`= ANY($1)`) rather than a list of a parameter per
    /// id: the statement's text is the same whatever the count, so it is
    /// parsed once per connection, and the relay binds one value instead of
    /// thousands.
    pub(crate) fn ids_in(self, column: impl ColumnTrait, ids: Vec<Uuid>) -> SimpleExpr {
        if self.0 == DbBackend::Postgres {
            Expr::col(column).eq(PgFunc::any(Expr::val(ids)))
        } else {
            column.is_in(ids)
        }
    }
}
