//! Signatures `#[transactional]` keeps exactly as written, compiled with warnings denied.
#![deny(warnings)]

use outbox_core::{emit, transactional, OutboxEvent};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created")]
pub struct OrderCreated {
    pub id: u64,
}

#[derive(Debug)]
pub struct AppError;

impl From<outbox_core::Error> for AppError {
    fn from(_: outbox_core::Error) -> Self {
        AppError
    }
}

/// Documented, public, with attributes kept.
#[transactional]
#[inline]
pub async fn plain(db: &DatabaseConnection, id: u64) -> Result<u64, AppError> {
    emit!(OrderCreated { id });
    Ok(id)
}

/// Lifetimes, generics and a where clause; the connection is the generic `&C`.
#[transactional]
pub(crate) async fn generic<'a, C, T>(db: &C, label: &'a str, extra: T) -> Result<&'a str, AppError>
where
    C: TransactionTrait,
    T: Into<u64> + Send,
{
    let id = extra.into();
    db.execute_unprepared("SELECT 1").await.map_err(outbox_core::Error::from)?;
    outbox_core::emit!(OrderCreated { id });
    Ok(label)
}

/// `impl Trait` arguments, an `impl TransactionTrait` connection, and `anyhow`-style `Result` aliases.
#[transactional]
async fn impl_trait(db: &impl TransactionTrait, ids: impl IntoIterator<Item = u64>) -> outbox_core::Result<usize> {
    let mut n = 0;
    for id in ids {
        emit!(OrderCreated { id });
        n += 1;
    }
    Ok(n)
}

/// Already in a transaction: runs in a savepoint.
#[transactional]
async fn in_transaction(tx: &DatabaseTransaction) -> Result<(), AppError> {
    let ids = [1, 2];
    ids.iter().for_each(|&id| {
        emit!(OrderCreated { id });
    });
    Ok(())
}

pub struct Service {
    db: DatabaseConnection,
}

impl Service {
    /// A method; the connection named by an expression.
    #[transactional(conn = self.db)]
    pub async fn place(&self, id: u64) -> Result<(), AppError> {
        self.db.execute_unprepared("SELECT 1").await.map_err(outbox_core::Error::from)?;
        emit!(OrderCreated { id });
        Ok(())
    }

    /// A method taking its connection as an argument, with `mut` bindings.
    #[transactional(conn = db)]
    pub async fn with_arg(&self, db: &DatabaseConnection, mut id: u64) -> Result<u64, AppError> {
        id += 1;
        emit!(OrderCreated { id });
        Ok(id)
    }
}

/// Prelude names shadowed in the caller's scope do not disturb the expansion.
mod shadowed {
    #![allow(dead_code)]
    use outbox_core::{emit, transactional};
    use sea_orm::DatabaseConnection;

    struct Ok;
    struct Err;
    struct Some;
    struct None;
    struct Vec;
    struct String;
    type Result<T> = core::result::Result<T, outbox_core::Error>;

    #[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
    #[outbox(exchange = "orders", routing_key = "order.{id}.noted", key = id)]
    pub struct Noted {
        pub id: u64,
    }

    #[transactional]
    pub async fn note(db: &DatabaseConnection, id: u64) -> Result<()> {
        emit!(Noted { id });
        core::result::Result::Ok(())
    }
}

fn assert_send<F: std::future::Future + Send>(_: F) {}

#[allow(dead_code)]
fn futures_are_send(db: &DatabaseConnection, tx: &DatabaseTransaction, service: &Service) {
    assert_send(plain(db, 1));
    assert_send(generic(db, "x", 1u8));
    assert_send(impl_trait(db, [1]));
    assert_send(in_transaction(tx));
    assert_send(service.place(1));
    assert_send(service.with_arg(db, 1));
    assert_send(shadowed::note(db, 1));
}

fn main() {}
