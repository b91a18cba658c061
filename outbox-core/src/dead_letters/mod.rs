//! Dead letters, for an operator: [`show`] one, [`list`], [`discard`] or
//! replay a selection, in the relay's table (`entity::outbox_dead_letter`, replayed
//! by [`relay::replay`]) and the consumers' (`entity::inbox_dead_letter`,
//! replayed by [`inbox::replay`]).
//!
//! Each action is one transaction and returns the ids it acted on, so that an
//! application can offer the same operations on its own admin API as the
//! `outbox dead-letters` command does.
//!
//! ```no_run
//! # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), outbox_core::dead_letters::DeadLetterError> {
//! use outbox_core::dead_letters::{Selection, relay};
//!
//! let replayed = relay::replay(&db, &Selection::all().event_type("OrderCreated")).await?;
//! println!("{} events back in the outbox", replayed.len());
//! # Ok(()) }
//! ```

pub mod inbox;
pub mod relay;
mod selection;
mod table;

pub use selection::Selection;
pub use table::{Table, discard, list, show};

use sea_orm::DbErr;
use uuid::Uuid;

/// Why a dead-letter action did nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// A selection by id matched no dead letter.
    #[error("no dead letter has the id {0}")]
    NotFound(Uuid),
    /// The database failed; the transaction was rolled back.
    #[error("the dead-letter action failed in the database")]
    Database(#[from] DbErr),
}
