use outbox_core::{emit, OutboxEvent};

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created")]
struct OrderCreated {
    id: u64,
}

async fn place_order() {
    emit!(OrderCreated { id: 1 });
}

fn main() {
    let _ = place_order();
}
