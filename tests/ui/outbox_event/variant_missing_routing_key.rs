use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders")]
enum OrderEvent {
    #[outbox(routing_key = "order.created")]
    Created { id: u64 },
    Cancelled { id: u64 },
}

fn main() {}
