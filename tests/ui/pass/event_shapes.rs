//! Every shape `#[derive(OutboxEvent)]` accepts, compiled with warnings denied.
#![deny(warnings)]

use outbox_core::OutboxEvent;

/// A named struct with a placeholder, a partition key, a name, a version and a stream.
#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(
    exchange = "orders",
    routing_key = "order.{order_id}.created",
    key = order_id,
    name = "OrderPlaced",
    version = 2,
    stream = "ORDER_EVENTS"
)]
pub struct OrderCreated {
    pub order_id: u64,
}

/// A tuple struct addresses its fields by index.
#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.{0}.paid", key = 0)]
pub struct OrderPaid(pub u64, pub i64);

/// A unit struct.
#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "system", routing_key = "heartbeat")]
pub struct Heartbeat;

/// Raw identifiers are written without `r#` in placeholders and keys.
#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "catalog", routing_key = "item.{type}.changed", key = r#type)]
pub struct r#ItemChanged {
    pub r#type: String,
}

/// An enum: one event type per variant, sharing the exchange, key and version.
#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", key = order_id, routing_key = "order.{order_id}.other")]
pub enum OrderEvent {
    #[outbox(routing_key = "order.{order_id}.shipped", name = "OrderShipped")]
    Shipped { order_id: u64, carrier: String },
    Cancelled { order_id: u64 },
    #[outbox(routing_key = "order.{0}.refunded", key = 0)]
    Refunded(u64),
}

/// Keys may differ per variant, and a variant may have none.
#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "stock", routing_key = "stock.changed")]
pub enum StockEvent {
    #[outbox(key = sku)]
    Reserved { sku: String },
    Recounted,
}

/// Through a re-export, with `crate = "..."`.
pub mod reexported {
    pub use outbox_core as framework;

    #[derive(serde::Serialize, serde::Deserialize, framework::OutboxEvent)]
    #[outbox(exchange = "audit", routing_key = "entry", crate = "crate::reexported::framework")]
    pub struct AuditEntry {
        pub text: String,
    }
}

fn main() {
    let shipped = OrderEvent::Shipped { order_id: 1, carrier: "ups".into() };
    assert_eq!(shipped.event_type(), "OrderShipped");
    assert_eq!(shipped.subject().ok().as_deref(), Some("orders.order.1.shipped"));
    assert_eq!(OrderEvent::Cancelled { order_id: 2 }.event_type(), "Cancelled");
    assert_eq!(OrderEvent::Refunded(3).partition_key().as_deref(), Some("3"));
    assert_eq!(StockEvent::Recounted.partition_key(), None);
    assert_eq!(OrderPaid(4, 5).subject().ok().as_deref(), Some("orders.order.4.paid"));
    assert_eq!(Heartbeat.subject().ok().as_deref(), Some("system.heartbeat"));
    assert_eq!(<OrderCreated as OutboxEvent>::STREAM, "ORDER_EVENTS");
    assert_eq!(<OrderCreated as OutboxEvent>::VERSION, 2);
    let item = ItemChanged { r#type: "book".into() };
    assert_eq!(item.subject().ok().as_deref(), Some("catalog.item.book.changed"));
    assert_eq!(item.event_type(), "ItemChanged");
    let _ = reexported::AuditEntry { text: String::new() };
}
