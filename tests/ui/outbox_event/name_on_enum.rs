use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created", name = "OrderEvent")]
enum OrderEvent {
    Created { id: u64 },
}

fn main() {}
