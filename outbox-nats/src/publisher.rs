//! The relay's [`Publisher`] for JetStream: one publish per event, a window
//! of acks in flight, each key's next event sent as its previous one's ack
//! comes in, `Nats-Msg-Id` set to the event id for deduplication.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, HeaderName, HeaderValue, Subscriber};
use futures::{FutureExt, StreamExt};
use outbox_core::entity::outbox_message;
use outbox_core::headers;
use outbox_core::relay::{Batch, Delivery, DeliveryError, Publisher};
use tokio::sync::Mutex;

use crate::acks::{self, Unanswered};

/// Publishes outbox events to JetStream.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let publisher = outbox_nats::JetStreamPublisher::new(client);
/// let relay = outbox_core::relay::Relay::builder(db, publisher).spawn();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct JetStreamPublisher {
    client: async_nats::Client,
    context: Context,
    namespace: Option<String>,
    ack_timeout: Duration,
    /// Acks in flight at most: a window that slides as the acks come in.
    max_in_flight: usize,
    /// Where the acks come back, opened at the first publish and kept (a
    /// subscription per chunk cost a relay round about a millisecond more).
    replies: Mutex<Option<Replies>>,
}

/// A JetStream context with the publisher's ack timeout and in-flight bound.
fn context(client: &async_nats::Client, ack_timeout: Duration, max_in_flight: usize) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(ack_timeout)
        .max_ack_inflight(max_in_flight)
        .backpressure_on_inflight(true)
        .build(client.clone())
}

/// One subscription to `<inbox>.*.*`; batch `n`'s `i`-th event asks for its
/// ack on `<inbox>.<n>.<i>`, so that a late ack of an earlier batch is told apart.
#[derive(Debug)]
struct Replies {
    inbox: String,
    subscriber: Subscriber,
    batch: u64,
}

/// A clone shares the client and settings, and opens its own ack subscription.
impl Clone for JetStreamPublisher {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            context: self.context.clone(),
            namespace: self.namespace.clone(),
            ack_timeout: self.ack_timeout,
            max_in_flight: self.max_in_flight,
            replies: Mutex::new(None),
        }
    }
}

impl JetStreamPublisher {
    /// A publisher with a 5 s acknowledgement timeout and up to 4,096 acks
    /// in flight; [`ack_timeout`](Self::ack_timeout),
    /// [`max_in_flight`](Self::max_in_flight) and
    /// [`namespace`](Self::namespace) change them.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use outbox_nats::{JetStreamPublisher, async_nats};
    ///
    /// let publisher = JetStreamPublisher::new(async_nats::connect("127.0.0.1:4222").await?)
    ///     .ack_timeout(Duration::from_secs(10))
    ///     .max_in_flight(1_024)
    ///     .namespace("staging");
    /// # Ok(()) }
    /// ```
    pub fn new(client: async_nats::Client) -> Self {
        let (ack_timeout, max_in_flight) = (Duration::from_secs(5), 4_096);
        Self {
            context: context(&client, ack_timeout, max_in_flight),
            client,
            namespace: None,
            ack_timeout,
            max_in_flight,
            replies: Mutex::new(None),
        }
    }

    /// How long to wait for each acknowledgement before the event counts as
    /// not delivered (and is tried again).
    pub fn ack_timeout(mut self, ack_timeout: Duration) -> Self {
        self.ack_timeout = ack_timeout;
        self.context = context(&self.client, ack_timeout, self.max_in_flight);
        self
    }

    /// Acknowledgements awaited at once, at least 1: a window that slides as
    /// they come in.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight.max(1);
        self.context = context(&self.client, self.ack_timeout, self.max_in_flight);
        self
    }

    /// Prefixes every subject with `namespace.` (and every provisioned stream
    /// name with `NAMESPACE_`), so that several environments or tests can
    /// share one NATS server.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// A JetStream context on the same client, with the same ack timeout and
    /// in-flight bound, for provisioning streams and publishing by hand.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The namespace set with [`namespace`](Self::namespace).
    pub fn namespace_prefix(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    fn subject(&self, subject: &str) -> String {
        crate::streams::namespaced(subject, self.namespace.as_deref())
    }
}

/// The message headers of an outbox event (DESIGN: Headers), or why NATS
/// cannot carry them.
///
/// Built once per published event, so the names are static (no copy) and
/// the id and version are written without `format!`, which took 6 % of the
/// relay's CPU together with the reply subjects. The values that come from
/// the event are checked here, because async-nats panics on a value with a
/// line break or a malformed name.
pub fn headers(event: &outbox_message::Model) -> Result<HeaderMap, InvalidHeader> {
    const MSG_ID: HeaderName = HeaderName::from_static(headers::MSG_ID);
    const EVENT_TYPE: HeaderName = HeaderName::from_static(headers::EVENT_TYPE);
    const EVENT_VERSION: HeaderName = HeaderName::from_static(headers::EVENT_VERSION);
    const PARTITION_KEY: HeaderName = HeaderName::from_static(headers::PARTITION_KEY);
    const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);
    const OCCURRED_AT: HeaderName = HeaderName::from_static(headers::OCCURRED_AT);

    let mut headers = HeaderMap::new();
    let id = event.id.hyphenated();
    headers.insert(MSG_ID, &*id.encode_lower(&mut uuid::Uuid::encode_buffer()));
    headers.insert(EVENT_TYPE, value(&EVENT_TYPE, &event.event_type)?);
    headers.insert(
        EVENT_VERSION,
        itoa::Buffer::new().format(event.event_version),
    );
    if let Some(key) = &event.partition_key {
        headers.insert(PARTITION_KEY, value(&PARTITION_KEY, key)?);
    }
    headers.insert(CONTENT_TYPE, value(&CONTENT_TYPE, &event.content_type)?);
    headers.insert(OCCURRED_AT, event.created_at.to_rfc3339());
    if let Some(json) = &event.headers {
        let extra: BTreeMap<String, String> =
            serde_json::from_str(json).map_err(InvalidHeader::Extra)?;
        for (name, text) in extra {
            let name =
                HeaderName::try_from(name.as_str()).map_err(|_| InvalidHeader::Name { name })?;
            let text = value(&name, &text)?;
            headers.insert(name, text);
        }
    }
    Ok(headers)
}

fn value(name: &HeaderName, text: &str) -> Result<HeaderValue, InvalidHeader> {
    text.parse().map_err(|_| InvalidHeader::LineBreak {
        name: name.to_string(),
    })
}

/// Why an outbox event cannot travel as a NATS message: the relay
/// dead-letters it at once with this reason ([`Delivery::Undeliverable`])
/// rather than sending it.
#[derive(Debug, thiserror::Error)]
pub enum InvalidHeader {
    /// A header value (the partition key, say) holds CR or LF.
    #[error("the {name} header cannot hold a line break (CR or LF)")]
    LineBreak {
        /// The header's name.
        name: String,
    },
    /// An extra header's name is not printable ASCII without `:`.
    #[error("{name:?} cannot be a NATS header name (printable ASCII without ':')")]
    Name {
        /// The name as stored.
        name: String,
    },
    /// The row's `headers` column is not a flat JSON object of strings.
    #[error("the extra headers are not a JSON object of strings: {0}")]
    Extra(serde_json::Error),
}

impl Publisher for JetStreamPublisher {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        let deliveries = self.publish_in_key_order(&Batch::unordered(events)).await;
        // With no event waiting on another, every one is sent or abandoned.
        (deliveries.into_iter())
            .map(|d| d.unwrap_or_else(|| Unanswered::NotSent.into()))
            .collect()
    }

    /// Sends every ready event with a reply subject of its own, up to the
    /// in-flight bound, and follows the acks on the publisher's one
    /// subscription: an event's successor goes out as soon as its ack is in,
    /// so that the broker is never left idle at the end of a wave. Per event
    /// there is neither a oneshot channel nor a timer, which is what
    /// async-nats' `send_publish` costs (a third of the relay's CPU).
    async fn publish_in_key_order(&self, batch: &Batch<'_>) -> Vec<Option<Delivery>> {
        let mut order = batch.key_order();
        if self.client.connection_state() != State::Connected {
            order.abandon(&Unanswered::NotConnected.into());
            return order.into_outcome();
        }
        let mut open = self.replies.lock().await;
        let replies = match open.as_mut() {
            Some(replies) => replies,
            None => {
                let inbox = self.client.new_inbox();
                match self.client.subscribe(format!("{inbox}.*.*")).await {
                    Ok(subscriber) => open.insert(Replies {
                        inbox,
                        subscriber,
                        batch: 0,
                    }),
                    Err(error) => {
                        order.abandon(&Unanswered::Subscribe(error).into());
                        return order.into_outcome();
                    }
                }
            }
        };
        replies.batch += 1;
        let number = replies.batch;
        let reply_prefix = format!("{}.{number}.", replies.inbox);
        let mut digits = itoa::Buffer::new();
        // An ack resets the clock by updating `answered`; the timer itself is
        // only re-armed when it fires, not once per ack.
        let mut answered = Instant::now();
        let deadline = tokio::time::sleep(self.ack_timeout);
        tokio::pin!(deadline);
        loop {
            while order.in_flight() < self.max_in_flight
                && let Some(index) = order.next_ready()
            {
                let event = batch.events()[index];
                let headers = match headers(event) {
                    Ok(headers) => headers,
                    Err(error) => {
                        order.settle(index, Delivery::Undeliverable(DeliveryError::new(error)));
                        continue;
                    }
                };
                let reply = [reply_prefix.as_str(), digits.format(index)].concat();
                let sent = self
                    .client
                    .publish_with_reply_and_headers(
                        self.subject(&event.subject),
                        reply,
                        headers,
                        event.payload.clone().into(),
                    )
                    .await;
                if let Err(error) = sent {
                    order.settle(index, acks::failed(error));
                }
                // Take the acks already in, so that they never fill the subscription's buffer.
                while let Some(Some(reply)) = replies.subscriber.next().now_or_never() {
                    if let Some((index, delivery)) = acks::received(number, &reply) {
                        order.settle(index, delivery);
                    }
                }
                answered = Instant::now();
            }
            if order.in_flight() == 0 {
                break;
            }
            tokio::select! {
                reply = replies.subscriber.next() => match reply {
                    Some(reply) => {
                        if let Some((index, delivery)) = acks::received(number, &reply)
                            && order.settle(index, delivery)
                        {
                            answered = Instant::now();
                        }
                    }
                    None => {
                        // The client is closed; a later publish subscribes anew.
                        *open = None;
                        order.abandon(&Unanswered::ClientClosed.into());
                        break;
                    }
                },
                () = &mut deadline => {
                    let silent_until = answered + self.ack_timeout;
                    if Instant::now() < silent_until {
                        deadline.as_mut().reset(silent_until.into());
                        continue;
                    }
                    order.abandon(&Unanswered::Timeout(self.ack_timeout).into());
                    break;
                }
            }
        }
        order.into_outcome()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use outbox_core::entity::outbox_message::Model;

    use super::{InvalidHeader, headers};

    fn event(key: &str, extra: Option<&str>) -> Model {
        Model {
            id: uuid::Uuid::now_v7(),
            event_type: "OrderCreated".into(),
            event_version: 2,
            exchange: "orders".into(),
            subject: "orders.created".into(),
            partition_key: Some(key.into()),
            payload: b"{}".to_vec(),
            headers: extra.map(str::to_owned),
            content_type: "application/json".into(),
            created_at: Utc::now(),
            attempts: 0,
            next_attempt_at: Utc::now(),
            last_error: None,
            delivered_at: None,
        }
    }

    #[test]
    fn extra_headers_travel_beside_the_outbox_ones() {
        let map = headers(&event("7", Some(r#"{"Trace-Id":"abc"}"#))).expect("headers");
        assert_eq!(map.get("Trace-Id").map(|v| v.as_str()), Some("abc"));
        assert_eq!(
            map.get(headers::EVENT_VERSION).map(|v| v.as_str()),
            Some("2")
        );
        assert_eq!(
            map.get(headers::PARTITION_KEY).map(|v| v.as_str()),
            Some("7")
        );
    }

    #[test]
    fn what_nats_cannot_carry_is_an_error_not_a_panic() {
        let reason =
            |key: &str, extra: Option<&str>| headers(&event(key, extra)).expect_err("refused");
        assert!(matches!(
            reason("a\r\nb", None),
            InvalidHeader::LineBreak { name } if name == headers::PARTITION_KEY
        ));
        assert!(matches!(
            reason("7", Some(r#"{"Bad:Name":"x"}"#)),
            InvalidHeader::Name { name } if name == "Bad:Name"
        ));
        assert!(matches!(
            reason("7", Some(r#"{"Trace-Id":"a\nb"}"#)),
            InvalidHeader::LineBreak { name } if name == "Trace-Id"
        ));
        assert!(matches!(
            reason("7", Some(r#"["not", "an", "object"]"#)),
            InvalidHeader::Extra(_)
        ));
    }
}
