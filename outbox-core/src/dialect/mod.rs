//! Every way PostgreSQL, MySQL and SQLite differ for the outbox's own
//! statements, in one place: the relay's claim and settle (`relay`), the
//! inbox's rows and the consumer's lock (`inbox`). The migrations' catalogue
//! queries keep theirs in `migration::catalog`, as they run before any of
//! this exists.

mod inbox;
mod relay;

use sea_orm::{ConnectionTrait, DbBackend};

/// A database backend, as the outbox's statements need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dialect(DbBackend);

impl Dialect {
    pub(crate) fn of(db: &impl ConnectionTrait) -> Self {
        Self(db.get_database_backend())
    }
}
