use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.{id}.created")]
struct OrderCreated {
    id: Vec<u64>,
}

fn main() {}
