//! What a consumer runs for an event: an `async fn` or a type implementing [`Handler`].

use sea_orm::DatabaseTransaction;

use super::Metadata;

pub use crate::BoxError;

/// Handles events of type `E` inside the inbox's transaction.
///
/// Implement it on a type that holds the handler's state, or pass an
/// `async fn(E, Metadata, &DatabaseTransaction) -> Result<(), Err>` (a
/// `#[transactional]` one included), which implements it through [`HandlerFn`].
///
/// Writes made through `db` commit together with the inbox row, so they happen
/// once per event; an `Err` rolls them back and the message is redelivered.
///
/// ```
/// use outbox_core::inbox::{Handler, Metadata};
/// use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr};
///
/// # #[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
/// # #[outbox(exchange = "orders", routing_key = "created")]
/// # struct OrderCreated { order_id: i64 }
/// struct ReserveStock { warehouse: String }
///
/// impl Handler<OrderCreated> for ReserveStock {
///     type Error = DbErr;
///
///     async fn handle(&self, event: OrderCreated, _: Metadata, db: &DatabaseTransaction) -> Result<(), DbErr> {
///         db.execute_unprepared(&format!(
///             "UPDATE stock SET reserved = reserved + 1 WHERE warehouse = '{}'", self.warehouse
///         )).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<E>: Send + Sync + 'static {
    /// What the handler fails with: any error type, or a `String`. Its text
    /// and every cause under it (`source()`) go to logs and dead letters.
    type Error: Into<BoxError>;

    /// Applies the event's effect through `db`, the transaction the inbox row is in.
    fn handle(
        &self,
        event: E,
        meta: Metadata,
        db: &DatabaseTransaction,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// An `async fn(E, Metadata, &DatabaseTransaction) -> Result<(), Err>`, seen
/// for one borrow of the transaction.
///
/// Named so that a function returning a future that borrows the transaction
/// can be a [`Handler`]; implemented for every such function, not meant to be
/// implemented by hand.
pub trait HandlerFn<'a, E>: Send + Sync + 'static {
    /// The function's error type.
    type Error: Into<BoxError>;
    /// The future the function returns.
    type Future: Future<Output = Result<(), Self::Error>> + Send + 'a;

    /// Calls the function.
    fn call(&self, event: E, meta: Metadata, db: &'a DatabaseTransaction) -> Self::Future;
}

impl<'a, E, F, Fut, Err> HandlerFn<'a, E> for F
where
    F: Fn(E, Metadata, &'a DatabaseTransaction) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Err>> + Send + 'a,
    Err: Into<BoxError>,
{
    type Error = Err;
    type Future = Fut;

    fn call(&self, event: E, meta: Metadata, db: &'a DatabaseTransaction) -> Fut {
        self(event, meta, db)
    }
}

impl<E, F> Handler<E> for F
where
    F: for<'a> HandlerFn<'a, E>,
    E: Send,
{
    type Error = BoxError;

    async fn handle(
        &self,
        event: E,
        meta: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), BoxError> {
        self.call(event, meta, db).await.map_err(Into::into)
    }
}
