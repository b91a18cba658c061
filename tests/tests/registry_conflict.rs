//! Conflicting registrations through the real derive and `inventory` path,
//! in a test binary of their own so that they do not disturb the others.

use outbox_core::OutboxEvent;
use outbox_core::registry::ConflictKind;
use serde::{Deserialize, Serialize};

mod billing {
    use super::*;

    /// Claims the same event type and version as `shipping::Charged`.
    #[derive(Serialize, Deserialize, OutboxEvent)]
    #[outbox(exchange = "billing", routing_key = "charged", name = "Charged")]
    pub(crate) struct Charged {
        pub(crate) cents: i64,
    }
}

mod shipping {
    use super::*;

    #[derive(Serialize, Deserialize, OutboxEvent)]
    #[outbox(exchange = "shipping", routing_key = "charged", name = "Charged")]
    pub(crate) struct Charged {
        pub(crate) cents: i64,
    }
}

#[test]
fn duplicate_event_types_are_reported_naming_both_rust_types() {
    let error = outbox_core::registry().validate().expect_err("a conflict");
    let kinds: Vec<_> = error.conflicts.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [ConflictKind::DuplicateType]);
    let text = error.to_string();
    assert!(
        text.contains("billing::Charged") && text.contains("shipping::Charged"),
        "{text}"
    );
}

#[test]
fn the_relay_refuses_to_provision_a_conflicting_registry() {
    let error = outbox_nats::streams_from_registry(None).expect_err("a conflict");
    assert!(
        error.to_string().contains("event type `Charged` version 1"),
        "{error}"
    );
}
