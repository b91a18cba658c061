//! The message headers an application may add to an event
//! (`emit!(event, headers = [...])`), and those the framework keeps for
//! itself, named once here for every crate that writes or reads them.

/// The event id, as `emit!` gave it: JetStream's deduplication key and the
/// inbox's key.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The event type consumers dispatch on (`#[outbox(name = ...)]`).
pub const EVENT_TYPE: &str = "Outbox-Event-Type";
/// The event's schema version.
pub const EVENT_VERSION: &str = "Outbox-Event-Version";
/// The partition key, on keyed events only.
pub const PARTITION_KEY: &str = "Outbox-Partition-Key";
/// When `emit!` recorded the event (RFC 3339).
pub const OCCURRED_AT: &str = "Outbox-Occurred-At";
/// The payload's format (`application/json`).
pub const CONTENT_TYPE: &str = "Content-Type";

/// Why a header cannot be added to an event; `None` if it can.
///
/// A name is printable ASCII without `:` (what NATS carries) and is not one
/// of the framework's own: `Nats-*` and `Outbox-*` (any case), `Content-Type`.
/// A value holds no line break. The value is never part of the answer, so
/// that an error carrying it cannot leak a secret into a log line.
pub fn invalid(name: &str, value: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("a header name cannot be empty")
    } else if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        Some("a header name is printable ASCII without spaces or ':'")
    } else if is_reserved(name) {
        Some("`Nats-*`, `Outbox-*` and `Content-Type` are the framework's own headers")
    } else if value.contains(['\r', '\n']) {
        Some("a header value cannot hold a line break (CR or LF)")
    } else {
        None
    }
}

/// Whether the framework sets header `name` itself: consumers hand every
/// other header of a message to handlers as the event's own
/// ([`Metadata::headers`](crate::inbox::Metadata::headers)).
pub fn is_reserved(name: &str) -> bool {
    let starts = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    starts("Nats-") || starts("Outbox-") || name.eq_ignore_ascii_case("Content-Type")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_an_applications_headers_and_refuses_the_frameworks() {
        assert_eq!(invalid("Tenant-Id", "acme"), None);
        assert_eq!(invalid("x-correlation-id", ""), None);
        for name in ["nats-msg-id", "Outbox-Event-Type", "content-type"] {
            assert!(
                invalid(name, "v").is_some_and(|why| why.contains("own")),
                "{name}"
            );
        }
        assert!(invalid("", "v").is_some());
        assert!(invalid("Tenant Id", "v").is_some());
        assert!(invalid("Tenant:Id", "v").is_some());
        assert!(invalid("Tenant-Id", "a\r\nNats-Msg-Id: x").is_some());
        assert!(!is_reserved("Natsy"));
    }
}
