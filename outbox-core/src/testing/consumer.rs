//! A consumer's handlers, run through the inbox without a broker.

use std::collections::HashMap;
use std::sync::Mutex;

use sea_orm::DatabaseConnection;
use uuid::Uuid;

use crate::inbox::{DuplicateHandler, Handler, Handlers, Metadata, Processed};
use crate::{Error, OutboxEvent};

/// Runs a consumer's handlers on events given by the test, each through the
/// inbox in a transaction of its own, as `outbox_nats::Consumer` runs them
/// on messages from JetStream: the same event id given twice is handled
/// once.
///
/// It answers with what became of the event; what the transport does next
/// is the consumer's policy: [`Processed::Failed`] is retried (and
/// dead-lettered after `max_deliveries`), [`Processed::Unhandled`] is
/// dead-lettered at once.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// # #[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
/// # #[outbox(exchange = "orders", routing_key = "created")]
/// # struct OrderCreated { order_id: i64 }
/// # async fn reserve_stock(_: OrderCreated, _: outbox_core::inbox::Metadata, _: &sea_orm::DatabaseTransaction) -> Result<(), sea_orm::DbErr> { Ok(()) }
/// use outbox_core::inbox::Processed;
/// use outbox_core::testing::TestConsumer;
///
/// let inventory = TestConsumer::new(db, "inventory").on::<OrderCreated, _>(reserve_stock)?;
/// let id = uuid::Uuid::now_v7();
/// let order = OrderCreated { order_id: 7 };
/// assert_eq!(inventory.deliver(id, &order).await?, Processed::Handled);
/// assert_eq!(inventory.deliver(id, &order).await?, Processed::Duplicate);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestConsumer {
    db: DatabaseConnection,
    name: String,
    handlers: Handlers,
    /// Deliveries so far, by event id, for `Metadata::delivery_count`.
    deliveries: Mutex<HashMap<Uuid, u64>>,
}

impl TestConsumer {
    /// A consumer called `name` (its inbox key) over `db`'s inbox, without handlers yet.
    pub fn new(db: DatabaseConnection, name: impl Into<String>) -> Self {
        Self {
            db,
            name: name.into(),
            handlers: Handlers::new(),
            deliveries: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `handler` for every event type `E` carries, at `E::VERSION`.
    ///
    /// Fails if a handler for one of them is registered already.
    pub fn on<E: OutboxEvent, H: Handler<E>>(
        mut self,
        handler: H,
    ) -> Result<Self, DuplicateHandler> {
        self.handlers.insert::<E, H>(handler)?;
        Ok(self)
    }

    /// Delivers `event` as the message the relay would have published for
    /// event id `id` (the inbox key: give the same id to deliver it again).
    ///
    /// Fails when `event` has no valid subject or cannot be serialized, as
    /// `emit!` would.
    pub async fn deliver<E: OutboxEvent>(&self, id: Uuid, event: &E) -> Result<Processed, Error> {
        let meta = Metadata {
            id,
            // Counted by `deliver_raw`.
            delivery_count: 0,
            stream_sequence: 0,
            ..Metadata::for_event(event)?
        };
        let payload = event.to_payload()?;
        Ok(self.deliver_raw(meta, &payload).await)
    }

    /// Delivers a message as received: its metadata (a delivery count and
    /// stream sequence of 0 are filled in) and payload, for testing what
    /// the consumer does with a payload or type it cannot handle.
    pub async fn deliver_raw(&self, mut meta: Metadata, payload: &[u8]) -> Processed {
        let (count, sequence) = {
            let mut deliveries = self
                .deliveries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let sequence = deliveries.values().sum::<u64>() + 1;
            let count = deliveries.entry(meta.id).or_default();
            *count += 1;
            (*count, sequence)
        };
        if meta.delivery_count == 0 {
            meta.delivery_count = count;
        }
        if meta.stream_sequence == 0 {
            meta.stream_sequence = sequence;
        }
        (self.handlers)
            .process(&self.db, &self.name, meta, payload)
            .await
    }
}
