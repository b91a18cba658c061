//! The trait every event type implements, normally through `#[derive(OutboxEvent)]`.

use crate::Error;

/// An event that can be written to the outbox and routed to a NATS JetStream subject.
///
/// Derive it rather than implementing it by hand: the derive validates the
/// routing metadata at compile time and registers the type in the
/// [registry](crate::registry()).
///
/// ```
/// use outbox_core::OutboxEvent;
///
/// #[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
/// #[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
/// struct OrderCreated {
///     order_id: u64,
///     total_cents: i64,
/// }
///
/// let event = OrderCreated { order_id: 7, total_cents: 1250 };
/// assert_eq!(event.subject().unwrap(), "orders.order.7.created");
/// assert_eq!(event.partition_key().as_deref(), Some("7"));
/// assert_eq!(event.event_type(), "OrderCreated");
/// assert_eq!(OrderCreated::STREAM, "ORDERS");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox event",
    label = "`emit!` takes a value whose type derives `OutboxEvent`",
    note = "add `#[derive(OutboxEvent)]` and `#[outbox(exchange = \"...\", routing_key = \"...\")]` to the type"
)]
pub trait OutboxEvent: serde::Serialize + Send + 'static {
    /// The exchange: the first token of every subject of this type.
    const EXCHANGE: &'static str;
    /// The JetStream stream that captures `<EXCHANGE>.>`.
    const STREAM: &'static str;
    /// The schema version consumers dispatch on, together with the event type.
    const VERSION: u16;
    /// Every event type name this Rust type can carry (one per enum variant).
    const EVENT_TYPES: &'static [&'static str];
    /// The MIME type of [`to_payload`](Self::to_payload)'s bytes.
    const CONTENT_TYPE: &'static str = "application/json";

    /// The event type of this value (`Outbox-Event-Type`).
    fn event_type(&self) -> &'static str;

    /// The full subject, `<exchange>.<routing key>` with placeholders filled in.
    ///
    /// Fails when a placeholder's value is not a valid subject token.
    fn subject(&self) -> Result<String, Error>;

    /// The partition key (`#[outbox(key = field)]`): events sharing one are delivered in commit order.
    fn partition_key(&self) -> Option<String>;

    /// The serialized payload; JSON unless the implementation says otherwise.
    fn to_payload(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self).map_err(|source| Error::Serialize {
            event_type: self.event_type(),
            source,
        })
    }
}
