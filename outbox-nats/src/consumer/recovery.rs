//! Deliveries this process never saw, read back from the stream.
//!
//! JetStream hands a durable consumer's new messages out in stream order,
//! but a message delivered to a process that then died (or lost on the wire
//! when a connection dropped) comes back only after `ack_wait`, by which time
//! later messages of its key have been delivered. So before the consumer
//! handles anything it has not seen in order, it reads the durable's *unsure
//! span* — from just above its ack floor to the last message it delivered —
//! straight from the stream, in stream order, and queues those messages by
//! key ahead of anything newer. This runs at start and whenever the consumer
//! sequence of a delivery skips one (a delivery went elsewhere). Messages of
//! the span already in the inbox are skipped as duplicates; their
//! redeliveries later are duplicates too.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;

use outbox_core::consumer::Span;

use super::transport::Delivery;

/// How long reading the span may take before the consumer gives up and tries again.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why recovery failed; the consumer retries it, pulling nothing meanwhile.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecoveryError {
    /// The durable consumer's state could not be read.
    #[error("cannot read the state of the durable consumer")]
    Info(#[source] async_nats::jetstream::context::ConsumerInfoError),
    /// The span could not be read from the stream.
    #[error("cannot read stream sequences {from}..={to} back from the stream")]
    Read {
        /// The first sequence of the span.
        from: u64,
        /// The last.
        to: u64,
        /// What failed.
        #[source]
        source: async_nats::Error,
    },
    /// Reading the span took longer than allowed.
    #[error("reading stream sequences {from}..={to} back timed out")]
    Timeout {
        /// The first sequence of the span.
        from: u64,
        /// The last.
        to: u64,
    },
}

/// Reads the durable consumer's unsure span from `stream`, with `filters`.
pub(super) async fn recover(
    durable: &async_nats::jetstream::consumer::Consumer<pull::Config>,
    stream: &Stream,
    filters: &[String],
) -> Result<Span<Delivery>, RecoveryError> {
    let info = durable.get_info().await.map_err(RecoveryError::Info)?;
    // Nothing below where the durable started (see `StartAt`): a durable
    // that has acked nothing yet reports an ack floor of 0.
    let start = match info.config.deliver_policy {
        DeliverPolicy::ByStartSequence { start_sequence } => start_sequence,
        _ => 1,
    };
    let from = (info.ack_floor.stream_sequence + 1).max(start);
    let to = info.delivered.stream_sequence;
    let delivered_consumer_sequence = info.delivered.consumer_sequence;
    let mut messages = Vec::new();
    if from <= to {
        let read = read_span(stream, filters, from, to, &mut messages);
        match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(RecoveryError::Read { from, to, source }),
            Err(_) => return Err(RecoveryError::Timeout { from, to }),
        }
    }
    Ok(Span {
        messages,
        delivered_consumer_sequence,
    })
}

/// Appends the messages of `from..=to` that pass `filters`, through an
/// ephemeral ordered consumer.
async fn read_span(
    stream: &Stream,
    filters: &[String],
    from: u64,
    to: u64,
    messages: &mut Vec<(Delivery, u64)>,
) -> Result<(), async_nats::Error> {
    let (filter_subject, filter_subjects) = super::filter_fields(filters);
    let config = pull::OrderedConfig {
        filter_subject,
        filter_subjects,
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
        ..Default::default()
    };
    let reader = stream.create_consumer(config).await?;
    if reader.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut span = reader.messages().await?;
    while let Some(message) = span.next().await {
        let message = message?;
        let info = message.info()?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence > to {
            break;
        }
        messages.push((Delivery(message), sequence));
        if sequence == to || pending == 0 {
            break;
        }
    }
    Ok(())
}
