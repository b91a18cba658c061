//! The consumer's task: pulls messages, starts handlers within the in-flight
//! bound and per-key order, and acknowledges, retries or dead-letters each
//! message once its transaction has ended.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{Message, consumer::pull::MessagesErrorKind};
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use outbox_core::inbox::{self, DeadLetterReason, Handlers, Processed};
use outbox_core::relay::Backoff;
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::ConsumerConfig;
use super::keys::KeyQueues;
use super::message::{self, Position};

/// Pauses between attempts to (re)open the message stream.
const RECONNECT: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// How often the task looks at held messages, overdue redeliveries and retention.
const TICK: Duration = Duration::from_millis(500);

pub(super) struct Worker {
    pub(super) client: async_nats::Client,
    pub(super) consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    pub(super) db: DatabaseConnection,
    pub(super) handlers: Handlers,
    pub(super) name: String,
    pub(super) stream: String,
    pub(super) namespace: Option<String>,
    pub(super) config: ConsumerConfig,
}

/// A handled message, back from its task.
struct Finished {
    key: Option<String>,
    sequence: u64,
    /// Set when the message was negatively acknowledged: it comes back after this delay.
    redelivery: Option<Duration>,
}

impl Worker {
    pub(super) async fn run(self, mut stopped: watch::Receiver<bool>) {
        let shared = Arc::new(self);
        let config = &shared.config;
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut keys: KeyQueues<Message> = KeyQueues::new();
        let mut messages: Option<pull::Stream> = None;
        let mut failures = 0_u32;
        let mut resume_pulling = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        let purge_every =
            (config.inbox_retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut next_purge = Instant::now();
        tracing::info!(consumer = %shared.name, stream = %shared.stream, "consumer started");
        loop {
            // While NATS fails, pulling pauses; finished handlers are still settled.
            if messages.is_none() && Instant::now() >= resume_pulling {
                match shared.open().await {
                    Ok(stream) => messages = Some(stream),
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(consumer = %shared.name, %error, "cannot pull messages; retrying");
                        resume_pulling = Instant::now() + RECONNECT.delay(failures);
                    }
                }
            }
            let room = tasks.len() < config.max_in_flight
                && keys.queued() < config.max_ack_pending
                && Instant::now() >= resume_pulling;
            tokio::select! {
                // Err: the handle was dropped, which leaves the consumer running.
                Ok(()) = stopped.changed() => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    // Tasks catch their own panics, so a join error is a cancellation.
                    let Ok(finished) = joined else { continue };
                    let Some(key) = finished.key else { continue };
                    let deadline = finished.redelivery.map(|delay| Instant::now() + delay + config.ack_wait);
                    if let Some(next) = keys.finish(&key, finished.sequence, deadline) {
                        shared.start(&mut tasks, next);
                    }
                }
                next = next_message(&mut messages), if room => match next {
                    Some(Ok(message)) => {
                        failures = 0;
                        shared.receive(&mut tasks, &mut keys, message);
                    }
                    Some(Err(error)) => {
                        failures += 1;
                        tracing::warn!(consumer = %shared.name, %error, "pulling messages failed");
                        if matches!(error.kind(), MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders) {
                            messages = None;
                        }
                        resume_pulling = Instant::now() + RECONNECT.delay(failures);
                    }
                    None => messages = None,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    for message in keys.expire(now) {
                        shared.start(&mut tasks, message);
                    }
                    if let Some(before) = now.checked_sub(config.ack_wait / 2) {
                        for message in keys.due_for_extension(before, now) {
                            let _ = message.ack_with(AckKind::Progress).await;
                        }
                    }
                    if now >= next_purge {
                        shared.purge().await;
                        next_purge = now + purge_every;
                    }
                }
            }
        }
        // Messages not started go back at once; handlers in flight finish.
        for message in keys.drain() {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        while tasks.join_next().await.is_some() {}
        if let Err(error) = shared.client.flush().await {
            tracing::warn!(consumer = %shared.name, %error, "flushing acks at shutdown failed");
        }
        tracing::info!(consumer = %shared.name, "consumer stopped");
    }

    async fn open(&self) -> Result<pull::Stream, String> {
        let batch = (self.config.max_in_flight * 2)
            .min(self.config.max_ack_pending)
            .max(1);
        (self.consumer.stream())
            .max_messages_per_batch(batch)
            .messages()
            .await
            .map_err(|e| e.to_string())
    }

    /// Starts a received message, or queues it behind its key.
    fn receive(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Finished>,
        keys: &mut KeyQueues<Message>,
        message: Message,
    ) {
        let Some(position) = message::position(&message) else {
            tracing::warn!(consumer = %self.name, subject = %message.subject, "ignoring a message without JetStream metadata");
            return;
        };
        let ready = match message::partition_key(&message).map(str::to_owned) {
            Some(key) => keys.push(&key, position.stream_sequence, message, Instant::now()),
            None => Some(message),
        };
        if let Some(message) = ready {
            self.start(tasks, message);
        }
    }

    fn start(self: &Arc<Self>, tasks: &mut JoinSet<Finished>, message: Message) {
        let shared = Arc::clone(self);
        tasks.spawn(async move {
            let key = message::partition_key(&message).map(str::to_owned);
            let position = message::position(&message);
            let sequence = position.map_or(0, |p| p.stream_sequence);
            let redelivery = match position {
                Some(position) => AssertUnwindSafe(shared.handle(&message, position))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(consumer = %shared.name, sequence, "the consumer panicked on a message; it will be redelivered");
                        None
                    }),
                None => None,
            };
            Finished { key, sequence, redelivery }
        });
    }

    /// Handles one message to its end: ack, nak with a delay (returned), or
    /// dead letter and term.
    async fn handle(&self, message: &Message, position: Position) -> Option<Duration> {
        let config = &self.config;
        let meta = match message::metadata(message, position, self.namespace.as_deref()) {
            Ok(meta) => meta,
            Err(error) => {
                return self
                    .dead_letter(message, position, DeadLetterReason::Malformed, error)
                    .await;
            }
        };
        let span = tracing::debug_span!("outbox.handle", consumer = %self.name, event_type = %meta.event_type, event_id = %meta.id, delivery = position.delivered);
        let processed = tracing::Instrument::instrument(
            self.handlers
                .process(&self.db, &self.name, meta, &message.payload),
            span,
        )
        .await;
        match processed {
            Processed::Handled | Processed::Duplicate => {
                let outcome = if processed == Processed::Handled {
                    "handled"
                } else {
                    "duplicate"
                };
                self.count(outcome);
                self.ack(message, AckKind::Ack).await;
                None
            }
            Processed::Failed(error) if position.delivered >= config.max_deliveries => {
                self.dead_letter(message, position, DeadLetterReason::HandlerFailed, error)
                    .await
            }
            Processed::Failed(error) => {
                self.count("failed");
                Some(
                    self.retry(message, position, "handler failed", &error)
                        .await,
                )
            }
            // Not the message's fault: it does not move towards a dead letter,
            // however often JetStream has delivered it.
            Processed::Unavailable(error) => {
                self.count("unavailable");
                Some(
                    self.retry(message, position, "database failed", &error)
                        .await,
                )
            }
            Processed::Unhandled { reason, error }
                if config.skip_unhandled && reason.is_unhandled_type() =>
            {
                tracing::debug!(consumer = %self.name, %reason, %error, "skipping a message no handler takes");
                self.count("skipped");
                self.ack(message, AckKind::Ack).await;
                None
            }
            Processed::Unhandled { reason, error } => {
                self.dead_letter(message, position, reason, error).await
            }
        }
    }

    /// Records the message as a dead letter (and, if it has an event id, in
    /// the inbox, so that a redelivery is skipped), then terminates it. If the
    /// database fails, the message is redelivered instead: nothing is dropped.
    async fn dead_letter(
        &self,
        message: &Message,
        position: Position,
        reason: DeadLetterReason,
        error: String,
    ) -> Option<Duration> {
        tracing::error!(consumer = %self.name, sequence = position.stream_sequence, %reason, %error, "dead-lettering a message");
        let letter =
            message::dead_letter(&self.name, &self.stream, message, position, reason, error);
        let event_id = letter.event_id;
        let stored = async {
            let txn = self.db.begin().await?;
            if let Some(id) = event_id {
                inbox::record(&txn, &self.name, id).await?;
            }
            inbox::dead_letter(&txn, letter).await?;
            txn.commit().await?;
            Ok::<_, outbox_core::Error>(())
        };
        match stored.await {
            Ok(()) => {
                metrics::counter!("outbox_inbox_dead_lettered_total", "consumer" => self.name.clone(), "reason" => reason.as_str()).increment(1);
                self.count("dead_lettered");
                self.ack(message, AckKind::Term).await;
                None
            }
            Err(error) => {
                let error = error.to_string();
                Some(
                    self.retry(message, position, "storing the dead letter failed", &error)
                        .await,
                )
            }
        }
    }

    /// Negatively acknowledges with the backoff delay of its delivery count; returns the delay.
    async fn retry(
        &self,
        message: &Message,
        position: Position,
        what: &str,
        error: &str,
    ) -> Duration {
        let failures = u32::try_from(position.delivered).unwrap_or(u32::MAX);
        let delay = self.config.retry_backoff.delay(failures);
        tracing::warn!(consumer = %self.name, sequence = position.stream_sequence, delivery = position.delivered, retry_in = ?delay, %error, "{what}; the message will be redelivered");
        self.ack(message, AckKind::Nak(Some(delay))).await;
        delay
    }

    async fn ack(&self, message: &Message, kind: AckKind) {
        if let Err(error) = message.ack_with(kind).await {
            // Not acknowledged: JetStream redelivers it, and the inbox skips it.
            tracing::warn!(consumer = %self.name, %error, "acknowledgement failed");
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("outbox_inbox_messages_total", "consumer" => self.name.clone(), "outcome" => outcome).increment(1);
    }

    async fn purge(&self) {
        let retention = chrono::Duration::from_std(self.config.inbox_retention)
            .unwrap_or(chrono::Duration::MAX);
        let before = Utc::now() - retention;
        match inbox::purge(&self.db, &self.name, before).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::debug!(consumer = %self.name, deleted, "inbox rows past retention deleted")
            }
            Err(error) => {
                tracing::warn!(consumer = %self.name, %error, "inbox retention cleanup failed")
            }
        }
    }
}

async fn next_message(
    messages: &mut Option<pull::Stream>,
) -> Option<Result<Message, pull::MessagesError>> {
    match messages {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
