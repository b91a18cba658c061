//! What the consumer tests share: counts of the tables they check, and
//! handlers that record what they saw.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::entity::{inbox_dead_letter, inbox_message};
use outbox_core::inbox::{Handler, Metadata};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, PaginatorTrait, QueryFilter,
};

use crate::Setup;
use crate::fixtures::{AppError, OrderCreated, Sequenced, order};

/// Rows of the `orders` table.
pub async fn orders(db: &DatabaseConnection) -> u64 {
    order::Entity::find().count(db).await.expect("count orders")
}

/// Rows of the inbox.
pub async fn inbox_rows(db: &DatabaseConnection) -> u64 {
    inbox_message::Entity::find()
        .count(db)
        .await
        .expect("count inbox rows")
}

/// The dead letters of `consumer`.
pub async fn dead_letters(
    db: &DatabaseConnection,
    consumer: &str,
) -> Vec<inbox_dead_letter::Model> {
    inbox_dead_letter::Entity::find()
        .filter(inbox_dead_letter::Column::Consumer.eq(consumer))
        .all(db)
        .await
        .expect("read dead letters")
}

/// Publishes an `OrderCreated` per `(order id, total cents)`, in order.
pub async fn publish_orders(setup: &Setup, orders: &[(i64, i64)]) {
    for &(order_id, total_cents) in orders {
        let order = OrderCreated {
            order_id,
            total_cents,
        };
        setup.publish(order).await;
    }
}

/// Inserts the order; counts its calls and the delivery counts it saw.
#[derive(Debug, Default, Clone)]
pub struct InsertOrder {
    /// Calls so far.
    pub calls: Arc<AtomicU32>,
    /// The delivery count of each call.
    pub deliveries: Arc<Mutex<Vec<u64>>>,
    /// Fails while the delivery count is below this.
    pub succeed_from_delivery: u64,
    /// Always fails for this order.
    pub poison: Option<i64>,
}

impl Handler<OrderCreated> for InsertOrder {
    type Error = AppError;

    async fn handle(
        &self,
        event: OrderCreated,
        meta: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), AppError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.deliveries
            .lock()
            .expect("lock")
            .push(meta.delivery_count);
        if meta.delivery_count < self.succeed_from_delivery || self.poison == Some(event.order_id) {
            return Err(AppError::Rejected);
        }
        order::ActiveModel {
            id: Set(event.order_id),
            total_cents: Set(event.total_cents),
        }
        .insert(db)
        .await?;
        Ok(())
    }
}

/// Records each key's handled events; fails the first delivery of some;
/// tracks how many handlers ran at once.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    /// The numbers handled, by key, in the order handled.
    pub handled: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    /// Handlers running now.
    pub running: Arc<AtomicUsize>,
    /// The most that ran at once.
    pub most_running: Arc<AtomicUsize>,
}

impl Handler<Sequenced> for Recorder {
    type Error = String;

    async fn handle(
        &self,
        event: Sequenced,
        meta: Metadata,
        _db: &DatabaseTransaction,
    ) -> Result<(), String> {
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(running, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(u64::from(event.n % 4) * 2)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if event.n % 7 == 3 && meta.delivery_count == 1 {
            return Err(format!("{} #{} fails once", event.key, event.n));
        }
        let mut handled = self.handled.lock().expect("lock");
        handled.entry(event.key).or_default().push(event.n);
        Ok(())
    }
}
