//! JetStream's answers to the publishes of one chunk, matched by reply
//! subject (`<inbox>.<chunk number>.<index in the chunk>`) and turned into
//! [`Delivery`]s.

use std::time::Duration;

use async_nats::StatusCode;
use async_nats::client::{PublishError, PublishErrorKind};
use outbox_core::relay::Delivery;
use serde::Deserialize;

/// The outcome of each event of a chunk, as its answer comes in.
pub(crate) struct Acks {
    chunk: u64,
    outcome: Vec<Option<Delivery>>,
    awaited: usize,
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
    #[serde(default)]
    description: String,
}

impl Acks {
    /// Awaits the answers to chunk number `chunk`, of `events` events.
    pub(crate) fn new(chunk: u64, events: usize) -> Self {
        Self {
            chunk,
            outcome: vec![None; events],
            awaited: events,
        }
    }

    /// Events still without an answer.
    pub(crate) fn awaited(&self) -> usize {
        self.awaited
    }

    /// The event at `index` was never sent.
    pub(crate) fn failed(&mut self, index: usize, error: &PublishError) {
        let delivery = match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => Delivery::Oversized(error.to_string()),
            PublishErrorKind::InvalidSubject => Delivery::Rejected(error.to_string()),
            _ => Delivery::Unavailable(error.to_string()),
        };
        self.settle(index, delivery);
    }

    /// Records an answer, which came on `<inbox>.<chunk>.<index>`; one for
    /// another chunk (a late ack), or a second one, is ignored.
    pub(crate) fn received(&mut self, reply: &async_nats::Message) {
        let mut parts = reply.subject.rsplitn(3, '.');
        let index = parts.next().and_then(|index| index.parse::<usize>().ok());
        let chunk = parts.next().and_then(|chunk| chunk.parse::<u64>().ok());
        if let (Some(index), Some(chunk)) = (index, chunk)
            && chunk == self.chunk
        {
            self.settle(index, answer(reply));
        }
    }

    fn settle(&mut self, index: usize, delivery: Delivery) {
        if let Some(slot @ None) = self.outcome.get_mut(index) {
            *slot = Some(delivery);
            self.awaited -= 1;
        }
    }

    /// Every event's delivery; those never answered are `Unavailable`, to be
    /// tried again without counting an attempt (JetStream drops the copy if
    /// the first one was stored after all).
    pub(crate) fn into_deliveries(self, timeout: Duration) -> Vec<Delivery> {
        self.outcome
            .into_iter()
            .map(|delivery| {
                delivery.unwrap_or_else(|| {
                    Delivery::Unavailable(format!(
                        "no JetStream acknowledgement within {timeout:?}"
                    ))
                })
            })
            .collect()
    }
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
    use std::time::Duration;

    use async_nats::{Message, StatusCode};
    use outbox_core::relay::Delivery;

    use super::Acks;

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

    #[test]
    fn answers_become_deliveries_by_index() {
        let mut acks = Acks::new(3, 5);
        acks.received(&reply("_INBOX.x.3.0", STORED, None));
        acks.received(&reply(
            "_INBOX.x.3.1",
            r#"{"stream":"ORDERS","seq":8,"duplicate":true}"#,
            None,
        ));
        acks.received(&reply(
            "_INBOX.x.3.2",
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            None,
        ));
        acks.received(&reply("_INBOX.x.3.3", "", Some(StatusCode::NO_RESPONDERS)));
        acks.received(&reply("_INBOX.x.3.4", "pong", None));
        assert_eq!(acks.awaited(), 0);
        let deliveries = acks.into_deliveries(Duration::from_secs(1));
        assert_eq!(deliveries[0], Delivery::Stored { duplicate: false });
        assert_eq!(deliveries[1], Delivery::Stored { duplicate: true });
        assert!(
            matches!(&deliveries[2], Delivery::Rejected(e) if e.contains("maximum messages exceeded")),
            "{:?}",
            deliveries[2]
        );
        assert!(
            matches!(&deliveries[3], Delivery::Rejected(e) if e.contains("no JetStream stream"))
        );
        assert!(matches!(&deliveries[4], Delivery::Rejected(e) if e.contains("pong")));
    }

    #[test]
    fn late_second_and_stray_answers_are_ignored_and_silence_is_unavailable() {
        let mut acks = Acks::new(2, 2);
        acks.received(&reply("_INBOX.x.1.0", STORED, None)); // an earlier chunk's
        acks.received(&reply("_INBOX.x.2.9", STORED, None)); // no such event
        acks.received(&reply("_INBOX.x.2.oops", STORED, None));
        acks.received(&reply(
            "_INBOX.x.2.0",
            r#"{"error":{"code":500,"description":"first"}}"#,
            None,
        ));
        acks.received(&reply("_INBOX.x.2.0", STORED, None)); // a second answer
        assert_eq!(acks.awaited(), 1);
        let deliveries = acks.into_deliveries(Duration::from_secs(5));
        assert!(matches!(&deliveries[0], Delivery::Rejected(e) if e.contains("first")));
        assert!(matches!(&deliveries[1], Delivery::Unavailable(e) if e.contains("5s")));
    }
}
