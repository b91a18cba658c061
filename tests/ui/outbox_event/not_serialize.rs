use outbox_core::OutboxEvent;

#[derive(serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created")]
struct OrderCreated {
    id: u64,
}

fn main() {}
