//! The consumer's transport over a JetStream durable pull consumer: what
//! `outbox_core::consumer`'s loop asks of a broker, done the JetStream way.

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::pull::{MessagesErrorKind, OrderedErrorKind};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use outbox_core::consumer::{Message, Pull, PullError, Pulled, Settle, Span, Transport};
use outbox_core::inbox::BoxError;

use super::recovery;

/// A JetStream message, as the consumer reads and settles it.
#[derive(Debug)]
pub(super) struct Delivery(pub(super) async_nats::jetstream::Message);

impl Message for Delivery {
    fn subject(&self) -> &str {
        self.0.subject.as_str()
    }

    fn header(&self, name: &str) -> Option<&str> {
        Some(self.0.headers.as_ref()?.get(name)?.as_str())
    }

    fn for_each_header(&self, each: &mut dyn FnMut(&str, &str)) {
        for (name, values) in self.0.headers.iter().flat_map(|map| map.iter()) {
            if let Some(value) = values.first() {
                each(name.as_ref(), value.as_str());
            }
        }
    }

    fn payload(&self) -> &[u8] {
        &self.0.payload
    }
}

/// A durable pull consumer (none for a group member, which reads the stream
/// with ordered consumers), its stream (read directly at recovery) and its
/// subject filters (namespaced), applied at recovery too.
pub(super) struct JetStream {
    pub(super) client: async_nats::Client,
    pub(super) consumer: Option<async_nats::jetstream::consumer::Consumer<pull::Config>>,
    pub(super) stream: Stream,
    pub(super) filters: Vec<String>,
    /// The consumer's name, for the log line of a message JetStream did not describe.
    pub(super) name: String,
}

impl Transport for JetStream {
    type Message = Delivery;

    async fn open(&self, batch: usize) -> Result<Pull<Delivery>, BoxError> {
        let consumer = self.durable()?;
        let messages = (consumer.stream())
            .max_messages_per_batch(batch)
            .messages()
            .await?;
        let name = self.name.clone();
        let pulled = messages.filter_map(move |next| {
            let pulled = match next {
                Ok(message) => pulled(message, &name).map(Ok),
                Err(error) => Some(Err(match error.kind() {
                    MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders => {
                        PullError::Closed(error.into())
                    }
                    _ => PullError::Failed(error.into()),
                })),
            };
            std::future::ready(pulled)
        });
        Ok(pulled.boxed())
    }

    async fn settle(&self, message: &Delivery, how: Settle) -> Result<(), BoxError> {
        let kind = match how {
            Settle::Redeliver => AckKind::Nak(None),
            Settle::Extend => AckKind::Progress,
            Settle::Terminate => AckKind::Term,
            // `Settle` may grow; what is not known here is acknowledged.
            _ => AckKind::Ack,
        };
        message.0.ack_with(kind).await
    }

    async fn unsure_span(&self) -> Result<Span<Delivery>, BoxError> {
        let span = recovery::recover(self.durable()?, &self.stream, &self.filters).await?;
        Ok(span)
    }

    async fn read_from(&self, sequence: u64) -> Result<Pull<Delivery>, BoxError> {
        let (filter_subject, filter_subjects) = super::filter_fields(&self.filters);
        let config = pull::OrderedConfig {
            filter_subject,
            filter_subjects,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: sequence,
            },
            ..Default::default()
        };
        let reader = self.stream.create_consumer(config).await?;
        let messages = reader.messages().await?;
        let name = self.name.clone();
        let read = messages.filter_map(move |next| {
            let read = match next {
                Ok(message) => pulled(message, &name).map(Ok),
                Err(error) => Some(Err(match error.kind() {
                    OrderedErrorKind::ConsumerDeleted | OrderedErrorKind::NoResponders => {
                        PullError::Closed(error.into())
                    }
                    _ => PullError::Failed(error.into()),
                })),
            };
            std::future::ready(read)
        });
        Ok(read.boxed())
    }

    async fn flush(&self) -> Result<(), BoxError> {
        Ok(self.client.flush().await?)
    }

    fn reachable(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl JetStream {
    /// The durable consumer, which a group member has not.
    fn durable(
        &self,
    ) -> Result<&async_nats::jetstream::consumer::Consumer<pull::Config>, BoxError> {
        (self.consumer.as_ref())
            .ok_or_else(|| "a consumer group member reads without a durable consumer".into())
    }
}

/// A delivery with its place, or `None` (logged) for a message without
/// JetStream's metadata, which cannot be settled.
fn pulled(message: async_nats::jetstream::Message, consumer: &str) -> Option<Pulled<Delivery>> {
    let Ok(info) = message.info() else {
        tracing::warn!(%consumer, "ignoring a message without JetStream metadata");
        return None;
    };
    let (stream_sequence, consumer_sequence) = (info.stream_sequence, info.consumer_sequence);
    let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
    let pending = info.pending;
    Some(Pulled {
        message: Delivery(message),
        stream_sequence,
        delivered,
        consumer_sequence,
        pending,
    })
}
