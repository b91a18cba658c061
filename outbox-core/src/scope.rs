//! The transaction a `#[transactional]` function body runs in.
//!
//! The macro expands to, roughly:
//!
//! ```ignore
//! let conn = &db;
//! let outcome: Result<Result<T, E>, outbox_core::Error> =
//!     match Scope::begin(conn.begin(), (&Probe(conn)).database()).await {
//!     Ok(scope) => {
//!         let result = { let db = scope.transaction(); scope.run(async move { /* body */ }).await };
//!         scope.finish(result).await
//!     }
//!     Err(error) => Err(error),
//! };
//! match outcome { Ok(result) => result, Err(error) => Err(E::from(error)) }
//! ```

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DbErr, TransactionSession};

use crate::Error;
use crate::capture;
use crate::emit::{Emitter, Rows};
use crate::entity::outbox_message;
use crate::insert::insert_all;
use crate::signal::{Database, Written};

/// What a `#[transactional]` body returns: a `Result`, whose `Ok` commits.
#[doc(hidden)]
pub trait Outcome {
    /// Whether the transaction should commit.
    fn is_ok(&self) -> bool;
}

impl<T, E> Outcome for Result<T, E> {
    fn is_ok(&self) -> bool {
        Result::is_ok(self)
    }
}

/// An open transaction plus the events emitted in it.
#[doc(hidden)]
#[derive(Debug)]
pub struct Scope<T> {
    transaction: T,
    emitter: Emitter,
    /// What this transaction and the calls nested in it wrote, shared with
    /// the transaction this one is nested in, if any.
    written: Arc<Written>,
    /// The database whose relays its commit wakes: its connection's, or, on a
    /// connection that cannot tell (a transaction passed in), the outermost
    /// transaction's.
    database: Option<Database>,
}

impl<T> Scope<T>
where
    T: ConnectionTrait + TransactionSession + Send,
{
    /// Waits for `begin` (a `TransactionTrait::begin` call: a transaction, or
    /// a savepoint when the connection is itself a transaction) on a
    /// connection to `database`, if known.
    pub async fn begin(
        begin: impl Future<Output = Result<T, DbErr>>,
        database: Option<Database>,
    ) -> Result<Self, Error> {
        let transaction = begin.await?;
        let written = Written::current_or(database.clone());
        let database = database.or_else(|| written.database().cloned());
        Ok(Self {
            transaction,
            emitter: Emitter::default(),
            written,
            database,
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

    /// Runs the function body, with this transaction as its task's, so that
    /// `#[transactional]` calls nested in it report to it what they wrote.
    pub async fn run<F: Future>(&self, body: F) -> F::Output {
        Written::scope(Arc::clone(&self.written), body).await
    }

    /// Commits the body's writes and its events if it returned `Ok`; rolls
    /// back otherwise. The body's result comes back unchanged, or the error
    /// that kept it from committing.
    pub async fn finish<R: Outcome>(self, result: R) -> Result<R, Error> {
        if result.is_ok() {
            self.commit().await?;
        } else if let Err(rollback) = self.transaction.rollback().await {
            tracing::warn!(error = %rollback, "rollback after a failed #[transactional] call failed");
        }
        Ok(result)
    }

    /// Inserts the events and commits, then wakes the relays of its database
    /// if the transaction wrote events, its own or a nested call's. Nested, it
    /// wakes them too (its connection may be another than the outer one's,
    /// and its commit its own), and the outer commit wakes them again.
    async fn commit(self) -> Result<(), Error> {
        let Self {
            transaction,
            emitter,
            written,
            database,
        } = self;
        // On an error the transaction is dropped here, which rolls it back.
        let Rows { events, scheduled } = emitter.into_rows()?;
        let (wrote_events, wrote_scheduled) = (!events.is_empty(), !scheduled.is_empty());
        // As one logical message where this process writes them so (`capture`), else as rows.
        if !capture::write(&transaction, &events).await? {
            let rows = events.into_iter().map(outbox_message::ActiveModel::from);
            insert_all(&transaction, rows.collect()).await?;
        }
        insert_all(&transaction, scheduled).await?;
        transaction.commit().await?;
        written.note(wrote_events, wrote_scheduled);
        written.signal(database.as_ref());
        Ok(())
    }
}
