//! The database's side of the relay: the claim, the decoding of claimed
//! rows, the settle, scheduled events coming due, vacuuming during a long
//! drain. The differences between PostgreSQL, MySQL and SQLite are the
//! crate's [`Dialect`]'s. Imports of the relay only the leaf types
//! (`Delivery`, `RelayConfig`, `BatchReport`).

mod claim;
mod decode;
mod schedule;
mod settle;
mod vacuum;

use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};

pub(super) use crate::dialect::Dialect;
pub(super) use claim::{InFlight, claim};
pub(super) use decode::Claimed;
pub(super) use schedule::promote_due;
pub(super) use settle::{Settled, settle};
#[cfg(feature = "logical")]
pub(super) use settle::{dead_letter, stored_text};

/// An event on its way to `outbox_dead_letters`.
#[cfg(feature = "logical")]
pub(super) type DeadLetter = crate::entity::outbox_dead_letter::ActiveModel;

/// The outbox's database and its dialect.
#[derive(Debug)]
pub(super) struct Store {
    db: DatabaseConnection,
    dialect: Dialect,
    vacuum: vacuum::Vacuum,
}

impl Store {
    pub(super) fn new(db: DatabaseConnection) -> Self {
        let dialect = Dialect::of(&db);
        Self {
            db,
            dialect,
            vacuum: vacuum::Vacuum::default(),
        }
    }

    /// Counts events a settle deleted, vacuuming the table after every
    /// `every` of them where the dialect wants it (see `vacuum`).
    pub(super) fn deleted(&self, count: usize, every: Option<u64>) {
        if let Some(every) = every.filter(|_| self.dialect.vacuums())
            && count > 0
        {
            self.vacuum.deleted(&self.db, count as u64, every);
        }
    }

    pub(super) fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub(super) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Begins one of the relay's transactions; see [`Dialect::begin`].
    pub(super) async fn begin(&self, async_commit: bool) -> Result<DatabaseTransaction, DbErr> {
        self.dialect.begin(&self.db, async_commit).await
    }
}
