//! Outbox rows for the relay's unit tests.

use uuid::Uuid;

use crate::entity::outbox_message::Model;

/// A due, undelivered event with id `id`, under `key` if given.
pub(crate) fn event(id: u128, key: Option<&str>) -> Model {
    let now = chrono::Utc::now();
    Model {
        id: Uuid::from_u128(id),
        event_type: "E".into(),
        event_version: 1,
        exchange: "x".into(),
        subject: "x.e".into(),
        partition_key: key.map(Into::into),
        payload: Vec::new(),
        headers: None,
        content_type: "application/json".into(),
        created_at: now,
        attempts: 0,
        next_attempt_at: now,
        last_error: None,
        delivered_at: None,
    }
}
