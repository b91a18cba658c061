//! A mistake in an event that names its runtime through a re-export gives its
//! one error; the fallback impl names the runtime through the same path.
mod framework {
    pub use outbox_core as runtime;
}

#[derive(serde::Serialize, serde::Deserialize, framework::runtime::OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order..created", crate = "crate::framework::runtime")]
struct OrderCreated {
    id: u64,
}

fn main() {}
