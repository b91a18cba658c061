use outbox_core::OutboxEvent;

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(routing_key = "order.{nope}", version = 0, colour = "red")]
struct OrderCreated {
    id: u64,
}

fn main() {}
