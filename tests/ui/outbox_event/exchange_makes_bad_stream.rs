use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "shop/orders", routing_key = "order.created")]
struct OrderCreated {
    id: u64,
}

fn main() {}
