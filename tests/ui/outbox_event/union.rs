use outbox_core::OutboxEvent;

#[derive(OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.created")]
union OrderId {
    small: u32,
    large: u64,
}

fn main() {}
