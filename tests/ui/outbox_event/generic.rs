use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created")]
struct Envelope<T> {
    body: T,
}

fn main() {}
