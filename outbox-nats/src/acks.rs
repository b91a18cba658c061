//! JetStream's answers to the publishes of one batch, matched by reply
//! subject (`<inbox>.<batch number>.<index in the batch>`) and turned into
//! [`Delivery`]s.

use async_nats::StatusCode;
use async_nats::client::{PublishError, PublishErrorKind};
use outbox_core::relay::Delivery;
use serde::Deserialize;

/// The parts of a JetStream publish answer the relay needs: a stored message
/// has a stream sequence, a refused one an error.
#[derive(Deserialize)]
struct Answer {
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<AnswerError>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
}

/// The delivery of an event the client could not send.
pub(crate) fn failed(error: &PublishError) -> Delivery {
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => Delivery::Oversized(error.to_string()),
        PublishErrorKind::InvalidSubject => Delivery::Undeliverable(error.to_string()),
        _ => Delivery::Unavailable(error.to_string()),
    }
}

/// The event index and delivery an answer on `<inbox>.<batch>.<index>`
/// reports; `None` for an answer to another batch (a late ack) or a stray one.
pub(crate) fn received(batch: u64, reply: &async_nats::Message) -> Option<(usize, Delivery)> {
    let mut parts = reply.subject.rsplitn(3, '.');
    let index = parts.next()?.parse::<usize>().ok()?;
    let of_batch = parts.next()?.parse::<u64>().ok()?;
    (of_batch == batch).then(|| (index, answer(reply)))
}

fn answer(reply: &async_nats::Message) -> Delivery {
    if reply.status == Some(StatusCode::NO_RESPONDERS) {
        return Delivery::Rejected("no JetStream stream captures the subject".to_owned());
    }
    match serde_json::from_slice::<Answer>(&reply.payload) {
        Ok(Answer {
            error: Some(error), ..
        }) => Delivery::Rejected(format!(
            "JetStream refused the event: {} (code {})",
            error.description, error.code
        )),
        Ok(Answer {
            seq: Some(_),
            duplicate,
            ..
        }) => Delivery::Stored { duplicate },
        _ => Delivery::Rejected(format!(
            "not a JetStream acknowledgement: {}",
            String::from_utf8_lossy(&reply.payload)
        )),
    }
}

#[cfg(test)]
mod tests {
    use async_nats::{Message, StatusCode};
    use outbox_core::relay::Delivery;

    use super::received;

    fn reply(subject: &str, payload: &str, status: Option<StatusCode>) -> Message {
        Message {
            subject: subject.into(),
            reply: None,
            payload: payload.to_owned().into_bytes().into(),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    const STORED: &str = r#"{"stream":"ORDERS","seq":7}"#;

    fn delivery(subject: &str, payload: &str, status: Option<StatusCode>) -> Delivery {
        let (index, delivery) = received(3, &reply(subject, payload, status)).expect("ours");
        assert_eq!(
            Some(index),
            subject.rsplit('.').next().and_then(|i| i.parse().ok())
        );
        delivery
    }

    #[test]
    fn answers_become_deliveries_by_index() {
        assert_eq!(
            delivery("_INBOX.x.3.0", STORED, None),
            Delivery::Stored { duplicate: false }
        );
        assert_eq!(
            delivery(
                "_INBOX.x.3.1",
                r#"{"stream":"ORDERS","seq":8,"duplicate":true}"#,
                None
            ),
            Delivery::Stored { duplicate: true }
        );
        let full = delivery(
            "_INBOX.x.3.2",
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            None,
        );
        assert!(
            matches!(&full, Delivery::Rejected(e) if e.contains("maximum messages exceeded")),
            "{full:?}"
        );
        let nobody = delivery("_INBOX.x.3.3", "", Some(StatusCode::NO_RESPONDERS));
        assert!(matches!(&nobody, Delivery::Rejected(e) if e.contains("no JetStream stream")));
        let pong = delivery("_INBOX.x.3.4", "pong", None);
        assert!(matches!(&pong, Delivery::Rejected(e) if e.contains("pong")));
    }

    #[test]
    fn what_the_client_refuses_to_send_is_sorted_by_whether_a_retry_can_help() {
        use async_nats::client::{PublishError, PublishErrorKind};

        use super::failed;

        let kind = |kind| failed(&PublishError::new(kind));
        assert!(matches!(
            kind(PublishErrorKind::MaxPayloadExceeded),
            Delivery::Oversized(_)
        ));
        assert!(matches!(
            kind(PublishErrorKind::InvalidSubject),
            Delivery::Undeliverable(_)
        ));
        assert!(matches!(
            kind(PublishErrorKind::Send),
            Delivery::Unavailable(_)
        ));
    }

    #[test]
    fn answers_to_another_batch_and_stray_ones_are_not_ours() {
        assert_eq!(received(2, &reply("_INBOX.x.1.0", STORED, None)), None);
        assert_eq!(received(2, &reply("_INBOX.x.2.oops", STORED, None)), None);
        assert_eq!(received(2, &reply("stray", STORED, None)), None);
    }
}
