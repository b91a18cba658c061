use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created", topic = "x")]
struct OrderCreated {
    id: u64,
}

fn main() {}
