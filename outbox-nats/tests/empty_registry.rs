//! A program that links no `#[derive(OutboxEvent)]` type (this test names
//! nothing of the crate of test events it could use) has an empty registry:
//! provisioning from it is an error naming the cause, not a silent no-op.

use outbox_nats::{RegistryStreamsError, streams_from_registry};

#[test]
fn streams_from_an_empty_registry_is_an_error_that_explains_the_linking_rule() {
    assert_eq!(
        outbox_core::registry().iter().count(),
        0,
        "nothing is linked"
    );
    let error = streams_from_registry(None).expect_err("nothing to provision");
    assert!(matches!(error, RegistryStreamsError::Empty), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("the event registry is empty") && text.contains("extern crate"),
        "{text}"
    );
}
