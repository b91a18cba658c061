//! The transaction a `#[transactional]` function body runs in.
//!
//! The macro expands to, roughly:
//!
//! ```ignore
//! let scope = Scope::begin(db.begin()).await?;
//! let result = { let db = scope.transaction(); async move { /* body */ }.await };
//! scope.finish(result).await
//! ```

use sea_orm::{ConnectionTrait, DbErr, EntityTrait, TransactionSession};

use crate::emit::Emitter;
use crate::entity::outbox_message;
use crate::{Error, signal};

/// Rows per `INSERT`: keeps a statement under every backend's bind-parameter
/// limit (SQLite's 32,766 is the lowest) with the 11 columns written per event.
const ROWS_PER_INSERT: usize = 2_500;

/// An open transaction plus the events emitted in it.
#[doc(hidden)]
#[derive(Debug)]
pub struct Scope<T> {
    transaction: T,
    emitter: Emitter,
}

impl<T> Scope<T>
where
    T: ConnectionTrait + TransactionSession + Send,
{
    /// Waits for `begin` (a `TransactionTrait::begin` call: a transaction, or
    /// a savepoint when the connection is itself a transaction).
    pub async fn begin(begin: impl Future<Output = Result<T, DbErr>>) -> Result<Self, Error> {
        Ok(Self {
            transaction: begin.await?,
            emitter: Emitter::default(),
        })
    }

    /// The transaction, which the function body sees in place of its connection.
    pub fn transaction(&self) -> &T {
        &self.transaction
    }

    /// Where `emit!` records events.
    pub fn emitter(&self) -> &Emitter {
        &self.emitter
    }

    /// Commits the body's writes and its events if it returned `Ok`; rolls back otherwise.
    pub async fn finish<R, E>(self, result: Result<R, E>) -> Result<R, E>
    where
        E: From<Error>,
    {
        match result {
            Ok(value) => match self.commit().await {
                Ok(()) => Ok(value),
                Err(error) => Err(E::from(error)),
            },
            Err(error) => {
                if let Err(rollback) = self.transaction.rollback().await {
                    tracing::warn!(error = %rollback, "rollback after a failed #[transactional] call failed");
                }
                Err(error)
            }
        }
    }

    async fn commit(self) -> Result<(), Error> {
        let Self {
            transaction,
            emitter,
        } = self;
        // On an error the transaction is dropped here, which rolls it back.
        let mut rows = emitter.into_rows()?;
        let wrote_events = !rows.is_empty();
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(ROWS_PER_INSERT));
            outbox_message::Entity::insert_many(rows)
                .exec_without_returning(&transaction)
                .await?;
            rows = rest;
        }
        transaction.commit().await?;
        if wrote_events {
            signal::committed();
        }
        Ok(())
    }
}
