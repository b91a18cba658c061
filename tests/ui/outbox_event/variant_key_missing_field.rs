use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", key = id)]
enum OrderEvent {
    #[outbox(routing_key = "order.created")]
    Created { id: u64 },
    #[outbox(routing_key = "order.purged")]
    Purged,
}

fn main() {}
