//! The relay's [`Publisher`] for JetStream: one publish per event, all acks
//! awaited together, `Nats-Msg-Id` set to the event id for deduplication.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Context};
use futures::future::join_all;
use outbox_core::entity::outbox_message;
use outbox_core::relay::{Delivery, Publisher};

/// Publishes outbox events to JetStream.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let publisher = outbox_nats::JetStreamPublisher::new(client);
/// let relay = outbox_core::relay::Relay::builder(db, publisher).spawn();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    client: async_nats::Client,
    context: Context,
    namespace: Option<String>,
    /// Acks in flight at most; a batch is published in chunks of this many, since
    /// a send waits for a free slot and slots free up only as acks are awaited.
    max_in_flight: usize,
}

impl JetStreamPublisher {
    /// A publisher with a 5 s acknowledgement timeout and up to 4,096 acks in flight.
    pub fn new(client: async_nats::Client) -> Self {
        Self::with_options(client, Duration::from_secs(5), 4_096)
    }

    /// A publisher with the given ack timeout and in-flight bound.
    pub fn with_options(
        client: async_nats::Client,
        ack_timeout: Duration,
        max_in_flight: usize,
    ) -> Self {
        let context = jetstream::ContextBuilder::new()
            .timeout(ack_timeout)
            .max_ack_inflight(max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Self {
            client,
            context,
            namespace: None,
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// Prefixes every subject with `namespace.` (and every provisioned stream
    /// name with `NAMESPACE_`), so that several environments or tests can
    /// share one NATS server.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The JetStream context publishes go through.
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

/// The message headers of an outbox event (DESIGN: Headers).
pub fn headers(event: &outbox_message::Model) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
    headers.insert("Outbox-Event-Type", event.event_type.as_str());
    headers.insert(
        "Outbox-Event-Version",
        event.event_version.to_string().as_str(),
    );
    if let Some(key) = &event.partition_key {
        headers.insert("Outbox-Partition-Key", key.as_str());
    }
    headers.insert("Content-Type", event.content_type.as_str());
    headers.insert("Outbox-Occurred-At", event.created_at.to_rfc3339().as_str());
    for (name, value) in event
        .headers
        .as_deref()
        .map(extra_headers)
        .unwrap_or_default()
    {
        headers.insert(name.as_str(), value.as_str());
    }
    headers
}

/// Extra headers are stored as a flat JSON object of strings; anything else is ignored.
fn extra_headers(json: &str) -> std::collections::BTreeMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

impl Publisher for JetStreamPublisher {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        if self.client.connection_state() != State::Connected {
            let error = "not connected to NATS".to_owned();
            return vec![Delivery::Unavailable(error); events.len()];
        }
        let mut deliveries = Vec::with_capacity(events.len());
        for chunk in events.chunks(self.max_in_flight) {
            deliveries.extend(self.publish_chunk(chunk).await);
        }
        deliveries
    }
}

impl JetStreamPublisher {
    /// Sends every event of `chunk`, then awaits their acks together: one round trip.
    async fn publish_chunk(&self, chunk: &[&outbox_message::Model]) -> Vec<Delivery> {
        let mut pending = Vec::with_capacity(chunk.len());
        for event in chunk {
            let publish = PublishMessage::build()
                .payload(event.payload.clone().into())
                .headers(headers(event));
            pending.push(
                self.context
                    .send_publish(self.subject(&event.subject), publish)
                    .await,
            );
        }
        let acks = pending.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => ack.await.map(|ack| ack.duplicate),
                Err(error) => Err(error),
            }
        });
        join_all(acks).await.into_iter().map(delivery).collect()
    }
}

fn delivery(ack: Result<bool, async_nats::jetstream::context::PublishError>) -> Delivery {
    match ack {
        Ok(duplicate) => Delivery::Stored { duplicate },
        Err(error) => match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => Delivery::Oversized(error.to_string()),
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                Delivery::Unavailable(error.to_string())
            }
            _ => Delivery::Rejected(error.to_string()),
        },
    }
}
