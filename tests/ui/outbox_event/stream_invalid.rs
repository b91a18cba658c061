use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created", stream = "ORDERS/V1")]
struct OrderCreated {
    id: u64,
}

fn main() {}
