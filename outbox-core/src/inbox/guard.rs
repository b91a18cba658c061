//! One process per consumer name: a database lock that a second process
//! cannot take while the first holds it.
//!
//! Per-key order is kept by the one process that receives a consumer's
//! messages: two processes sharing a durable consumer would each handle some
//! of a key's events, in no common order. The guard turns that
//! misconfiguration into an error at start instead of silent reordering.
//!
//! It is a lock held by a connection, so it goes when the process dies (its
//! connections close) and a restarted process takes it at once. On
//! PostgreSQL it is a transaction-scoped advisory lock in a transaction kept
//! open (idle, with no snapshot held) for the consumer's life; on
//! MySQL/MariaDB a named lock (`GET_LOCK`) on a connection kept the same way.
//! SQLite has no such lock: there, nothing stops a second process. The
//! lock's name holds the schema (PostgreSQL) or database (MySQL) of the
//! inbox, so one consumer name in two schemas is two consumers.
//!
//! It guards against a mistake, it is not a fence: if the database restarts,
//! the lock goes with the connection, and the holder takes it again (see
//! [`ConsumerGuard::renew`]); a second process started in that moment could
//! take it first, and the holder then reports it.

use std::time::Duration;

use sea_orm::{
    ConnAcquireErr, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, Statement,
    TransactionTrait,
};

use crate::dialect::Dialect;

/// Connections a consumer needs from its pool at once on PostgreSQL and
/// MySQL: the guard's lock keeps one for the consumer's life, handlers need
/// at least one more (and run `max_in_flight` transactions at once when the
/// pool has them).
pub const CONNECTIONS_NEEDED: u32 = 2;

/// Whether `db`'s pool gives [`CONNECTIONS_NEEDED`] connections at once
/// within `wait`: checked before the guard is taken, since a consumer whose
/// lock holds the pool's only connection would start and then handle
/// nothing. Always `true` on SQLite, where the guard holds no connection.
pub async fn pool_is_large_enough(db: &DatabaseConnection, wait: Duration) -> Result<bool, DbErr> {
    if !Dialect::of(db).has_consumer_lock() {
        return Ok(true);
    }
    let held = db.begin().await?;
    let second = tokio::time::timeout(wait, db.ping()).await;
    held.rollback().await?;
    match second {
        Err(_) | Ok(Err(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))) => Ok(false),
        Ok(pinged) => pinged.map(|()| true),
    }
}

/// The lock that makes a process the only one running a consumer name.
#[derive(Debug)]
pub struct ConsumerGuard {
    db: DatabaseConnection,
    consumer: String,
    /// The transaction that holds the lock; `None` on SQLite or while lost.
    held: Option<DatabaseTransaction>,
}

/// What taking the guard found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// This process holds it now (or the database has no such lock).
    Held,
    /// Another process holds it.
    Elsewhere,
    /// The application closed the pool: the lock was let go, so that the
    /// pool's `close` does not wait for its connection forever.
    PoolClosed,
}

impl ConsumerGuard {
    /// Takes the guard of `consumer`, if no other process holds it.
    pub async fn take(db: &DatabaseConnection, consumer: &str) -> Result<(Self, Taken), DbErr> {
        let mut guard = Self {
            db: db.clone(),
            consumer: consumer.to_owned(),
            held: None,
        };
        let taken = guard.acquire().await?;
        Ok((guard, taken))
    }

    /// Checks that the lock is still held, and takes it again if its
    /// connection was lost (a database restart): [`Taken::Elsewhere`] means
    /// another process took it meanwhile.
    pub async fn renew(&mut self) -> Result<Taken, DbErr> {
        if let Err(DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)) =
            self.db.ping().await
        {
            if let Some(txn) = self.held.take() {
                let _ = txn.rollback().await;
            }
            return Ok(Taken::PoolClosed);
        }
        if let Some(txn) = &self.held {
            let backend = txn.get_database_backend();
            match txn
                .execute_raw(Statement::from_string(backend, "SELECT 1"))
                .await
            {
                Ok(_) => return Ok(Taken::Held),
                Err(_) => self.held = None,
            }
        }
        self.acquire().await
    }

    /// Lets the lock go (at shutdown).
    pub async fn release(mut self) {
        if let Some(txn) = self.held.take() {
            if let Some(release) = Dialect::of(&txn).release_consumer_lock(&self.consumer) {
                let _ = txn.execute_raw(release).await;
            }
            let _ = txn.rollback().await;
        }
    }

    async fn acquire(&mut self) -> Result<Taken, DbErr> {
        let dialect = Dialect::of(&self.db);
        let Some(take) = dialect.take_consumer_lock(&self.consumer) else {
            return Ok(Taken::Held);
        };
        let txn = self.db.begin().await?;
        let got = dialect.took_consumer_lock(txn.query_one_raw(take).await?)?;
        if got {
            self.held = Some(txn);
            Ok(Taken::Held)
        } else {
            txn.rollback().await?;
            Ok(Taken::Elsewhere)
        }
    }
}
