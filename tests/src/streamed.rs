//! Reading what reached a stream: headers, `Sequenced` events per key, and
//! the check that each event arrived once.

use std::collections::{HashMap, HashSet};

use async_nats::jetstream::message::StreamMessage;

use crate::fixtures::Sequenced;

/// The value of header `name`; panics naming it if the message lacks it.
pub fn header<'a>(message: &'a StreamMessage, name: &str) -> &'a str {
    message
        .headers
        .get(name)
        .map(|v| v.as_str())
        .unwrap_or_else(|| panic!("header {name} missing"))
}

/// The `Sequenced` events among `messages`, in stream order.
pub fn sequenced(messages: &[StreamMessage]) -> Vec<Sequenced> {
    messages
        .iter()
        .filter(|m| header(m, outbox_core::headers::EVENT_TYPE) == "Sequenced")
        .map(|m| serde_json::from_slice(&m.payload).expect("Sequenced payload"))
        .collect()
}

/// The `Sequenced` numbers in the stream, by key, in stream order.
pub fn per_key(messages: &[StreamMessage]) -> HashMap<String, Vec<u32>> {
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for event in sequenced(messages) {
        per_key.entry(event.key).or_default().push(event.n);
    }
    per_key
}

/// Asserts that `messages` are `expected` events, each once (by event id).
pub fn assert_each_once(messages: &[StreamMessage], expected: usize) {
    let ids: HashSet<&str> = messages
        .iter()
        .map(|m| header(m, outbox_core::headers::MSG_ID))
        .collect();
    assert_eq!(messages.len(), expected, "messages in the stream");
    assert_eq!(ids.len(), expected, "distinct event ids in the stream");
}
