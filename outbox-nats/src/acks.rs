//! JetStream's answers to the publishes of one batch, matched by reply
//! subject (`<inbox>.<batch number>.<index in the batch>`) and turned into
//! [`Delivery`]s.

use std::time::Duration;

use async_nats::StatusCode;
use async_nats::client::{PublishError, PublishErrorKind};
use outbox_core::relay::{Delivery, DeliveryError};
use serde::Deserialize;

/// Why JetStream did not store an event it was sent: what
/// [`Delivery::Rejected`] holds (`DeliveryError::get_ref()` downcasts to it).
/// The relay retries the event with backoff, then dead-letters it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No stream captures the event's subject (NATS answered "no responders").
    #[error("no JetStream stream captures the subject")]
    NoStream,
    /// JetStream answered with an error.
    #[error("JetStream refused the event: {description} (code {code})")]
    Refused {
        /// The status code, as HTTP's (503: a limit reached, say).
        code: u16,
        /// JetStream's own error code (10077: maximum messages exceeded), if given.
        err_code: Option<u16>,
        /// What JetStream said.
        description: String,
    },
    /// The answer was not a JetStream acknowledgement.
    #[error("not a JetStream acknowledgement: {0}")]
    NotAnAck(String),
}

/// Why the publisher has no answer for an event: what
/// [`Delivery::Unavailable`] holds. Not the event's fault; the relay backs
/// off as a whole and tries again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unanswered {
    /// The client is not connected to NATS.
    #[error("not connected to NATS")]
    NotConnected,
    /// The subscription for acknowledgements could not be made.
    #[error("cannot subscribe to JetStream acks")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// The client closed while acknowledgements were awaited.
    #[error("the NATS client closed")]
    ClientClosed,
    /// No acknowledgement came in for this long.
    #[error("no JetStream acknowledgement within {0:?}")]
    Timeout(Duration),
    /// The event was not sent: an event before it of its key was not stored.
    #[error("not sent")]
    NotSent,
}

impl From<Unanswered> for Delivery {
    fn from(error: Unanswered) -> Self {
        Delivery::Unavailable(DeliveryError::new(error))
    }
}

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
    err_code: Option<u16>,
    #[serde(default)]
    description: String,
}

/// The delivery of an event the client could not send: the client's error
/// of its kind.
pub(crate) fn failed(error: PublishError) -> Delivery {
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => Delivery::Oversized(DeliveryError::new(error)),
        PublishErrorKind::InvalidSubject => Delivery::Undeliverable(DeliveryError::new(error)),
        _ => Delivery::Unavailable(DeliveryError::new(error)),
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
    let refusal = if reply.status == Some(StatusCode::NO_RESPONDERS) {
        Refusal::NoStream
    } else {
        match serde_json::from_slice::<Answer>(&reply.payload) {
            Ok(Answer {
                error: Some(error), ..
            }) => Refusal::Refused {
                code: error.code,
                err_code: error.err_code,
                description: error.description,
            },
            Ok(Answer {
                seq: Some(_),
                duplicate,
                ..
            }) => return Delivery::Stored { duplicate },
            _ => Refusal::NotAnAck(String::from_utf8_lossy(&reply.payload).into_owned()),
        }
    };
    Delivery::Rejected(DeliveryError::new(refusal))
}

#[cfg(test)]
mod tests {
    use async_nats::{Message, StatusCode};
    use outbox_core::relay::Delivery;

    use super::{Refusal, received};

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

    /// The refusal a rejected delivery holds.
    fn refusal(delivery: &Delivery) -> Option<&Refusal> {
        match delivery {
            Delivery::Rejected(error) => error.get_ref().downcast_ref::<Refusal>(),
            _ => None,
        }
    }

    #[test]
    fn answers_become_deliveries_by_index() {
        assert!(matches!(
            delivery("_INBOX.x.3.0", STORED, None),
            Delivery::Stored { duplicate: false }
        ));
        assert!(matches!(
            delivery(
                "_INBOX.x.3.1",
                r#"{"stream":"ORDERS","seq":8,"duplicate":true}"#,
                None
            ),
            Delivery::Stored { duplicate: true }
        ));
        let full = delivery(
            "_INBOX.x.3.2",
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            None,
        );
        assert_eq!(
            refusal(&full),
            Some(&Refusal::Refused {
                code: 503,
                err_code: Some(10077),
                description: "maximum messages exceeded".to_owned()
            }),
            "{full:?}"
        );
        let Delivery::Rejected(error) = &full else {
            unreachable!()
        };
        assert_eq!(
            error.to_string(),
            "JetStream refused the event: maximum messages exceeded (code 503)"
        );
        let nobody = delivery("_INBOX.x.3.3", "", Some(StatusCode::NO_RESPONDERS));
        assert_eq!(refusal(&nobody), Some(&Refusal::NoStream));
        let pong = delivery("_INBOX.x.3.4", "pong", None);
        assert_eq!(refusal(&pong), Some(&Refusal::NotAnAck("pong".to_owned())));
    }

    #[test]
    fn what_the_client_refuses_to_send_is_sorted_by_whether_a_retry_can_help() {
        use async_nats::client::{PublishError, PublishErrorKind};

        use super::failed;

        let kind = |kind| failed(PublishError::new(kind));
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
        for subject in ["_INBOX.x.1.0", "_INBOX.x.2.oops", "stray"] {
            let answer = received(2, &reply(subject, STORED, None));
            assert!(answer.is_none(), "{subject}: {answer:?}");
        }
    }
}
