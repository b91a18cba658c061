//! The consumer's task: recovers deliveries it never saw, pulls messages,
//! starts handlers within the in-flight bound and per-key order, and
//! acknowledges, retries or dead-letters each message once its transaction
//! has ended.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::Stream;
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use outbox_core::Backoff;
use outbox_core::dead_letters;
use outbox_core::inbox::{
    self, ConsumerGuard, DeadLetterReason, Handlers, Incoming, Processed, Taken,
};
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use super::ConsumerConfig;
use super::message::{self, Held, Origin};
use super::pending::Pending;
use super::recovery::{self, Recovered};

/// Pauses between attempts to (re)open the message stream or to recover.
const RECONNECT: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// How often the task extends held messages' ack deadlines and purges the inbox.
const TICK: Duration = Duration::from_millis(500);

/// How often the task checks that it still holds the consumer's lock (and
/// that the application has not closed the pool).
const GUARD_RENEWAL: Duration = Duration::from_secs(2);

/// How often the task looks for dead letters an operator asked to replay,
/// and how many it takes at a time.
const REPLAY_POLL: Duration = Duration::from_secs(1);
const REPLAY_BATCH: u64 = 100;

pub(super) struct Worker {
    pub(super) client: async_nats::Client,
    pub(super) consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    /// The stream, read directly at recovery.
    pub(super) stream: Stream,
    /// The durable's subject filters (namespaced), applied at recovery too.
    pub(super) filters: Vec<String>,
    pub(super) db: DatabaseConnection,
    pub(super) handlers: Handlers,
    pub(super) name: String,
    pub(super) stream_name: String,
    pub(super) namespace: Option<String>,
    pub(super) config: ConsumerConfig,
}

/// How one attempt at a message ended.
enum Outcome {
    /// Acknowledged, skipped or dead-lettered: the key's next message may run.
    Resolved,
    /// Failed: run it again after the delay, its key held meanwhile.
    Retry(Duration),
}

/// Whether the unsure span must be read back before anything new is handled.
enum Recovery {
    Done,
    /// Owed; `trigger` is the delivery that revealed a skipped one, with its
    /// consumer sequence, handled after the span.
    Owed {
        trigger: Option<Box<(Held, u64)>>,
    },
}

impl Worker {
    pub(super) async fn run(self, mut guard: ConsumerGuard, mut stopped: watch::Receiver<bool>) {
        let shared = Arc::new(self);
        let config = &shared.config;
        let mut tasks: JoinSet<Vec<(Held, Outcome)>> = JoinSet::new();
        let mut pending = Pending::new();
        let mut recovery = Recovery::Owed { trigger: None };
        // The consumer sequence of the last delivery seen: a delivery that
        // does not follow it means one went elsewhere.
        let mut last_delivery: Option<u64> = None;
        let mut messages: Option<pull::Stream> = None;
        let mut failures = 0_u32;
        let mut resume = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        let purge_every =
            (config.inbox_retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut next_purge = Instant::now();
        let mut next_renewal = Instant::now() + GUARD_RENEWAL;
        let mut next_replay_poll = Instant::now();
        // The dead letters being replayed, not to be picked up twice.
        let mut replaying: HashSet<Uuid> = HashSet::new();
        tracing::info!(consumer = %shared.name, stream = %shared.stream_name, "consumer started");
        loop {
            // While NATS fails, pulling pauses; handlers in flight are still settled.
            if let Recovery::Owed { trigger } = &mut recovery
                && Instant::now() >= resume
            {
                match recovery::recover(&shared.consumer, &shared.stream, &shared.filters).await {
                    Ok(found) => {
                        failures = 0;
                        let found = shared.unhandled(found).await;
                        last_delivery = Some(shared.recovered(&mut pending, found, trigger.take()));
                        recovery = Recovery::Done;
                    }
                    Err(error) => {
                        failures += 1;
                        let error = outbox_core::ErrorReport(&error);
                        tracing::warn!(consumer = %shared.name, %error, "recovery failed; retrying");
                        resume = Instant::now() + RECONNECT.delay(failures);
                    }
                }
            }
            if matches!(recovery, Recovery::Done) && messages.is_none() && Instant::now() >= resume
            {
                match shared.open().await {
                    Ok(stream) => messages = Some(stream),
                    Err(error) => {
                        failures += 1;
                        let error = outbox_core::ErrorReport(&error);
                        tracing::warn!(consumer = %shared.name, %error, "cannot pull messages; retrying");
                        resume = Instant::now() + RECONNECT.delay(failures);
                    }
                }
            }
            // A batch is what is ready now: it never waits to fill up.
            while tasks.len() < config.max_in_flight && pending.has_ready() {
                let batch = std::iter::from_fn(|| pending.pop_ready());
                shared.start(&mut tasks, batch.take(config.batch_size).collect());
            }
            // Pull while the next batch is not full, so that one is ready
            // when a transaction ends.
            let room = matches!(recovery, Recovery::Done)
                && pending.ready() < config.batch_size
                && pending.len() < config.max_ack_pending
                && Instant::now() >= resume;
            let next_retry = pending.next_retry();
            tokio::select! {
                // Err: the handle was dropped, which leaves the consumer running.
                Ok(()) = stopped.changed() => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    // Tasks catch their own panics, so a join error is a cancellation.
                    let Ok(settled) = joined else { continue };
                    for (mut held, outcome) in settled {
                        match outcome {
                            Outcome::Resolved => {
                                if let Some(id) = held.replays() {
                                    replaying.remove(&id);
                                }
                                pending.resolve(&held);
                            }
                            Outcome::Retry(delay) => {
                                held.failures += 1;
                                pending.retry(held, Instant::now() + delay);
                            }
                        }
                    }
                }
                () = sleep_until(next_retry), if next_retry.is_some() => {
                    pending.due(Instant::now());
                }
                next = next_message(&mut messages), if room => match next {
                    Some(Ok(message)) => {
                        failures = 0;
                        let Some((held, delivery)) = Held::delivered(message) else {
                            tracing::warn!(consumer = %shared.name, "ignoring a message without JetStream metadata");
                            continue;
                        };
                        if last_delivery.is_some_and(|last| delivery != last + 1) {
                            tracing::info!(consumer = %shared.name, delivery, last = ?last_delivery, "a delivery went elsewhere; reading the unsure span back from the stream");
                            recovery = Recovery::Owed { trigger: Some(Box::new((held, delivery))) };
                        } else {
                            last_delivery = Some(delivery);
                            pending.receive(held);
                        }
                    }
                    Some(Err(error)) => {
                        failures += 1;
                        tracing::warn!(consumer = %shared.name, %error, "pulling messages failed");
                        if matches!(error.kind(), MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders) {
                            messages = None;
                        }
                        resume = Instant::now() + RECONNECT.delay(failures);
                    }
                    None => messages = None,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Some(before) = now.checked_sub(config.ack_wait / 2) {
                        for held in pending.due_for_extension(before, now) {
                            let _ = held.ack(AckKind::Progress).await;
                        }
                    }
                    if now >= next_renewal {
                        if !shared.renew(&mut guard).await {
                            break;
                        }
                        next_renewal = now + GUARD_RENEWAL;
                    }
                    if now >= next_purge {
                        shared.purge().await;
                        next_purge = now + purge_every;
                    }
                    if now >= next_replay_poll && matches!(recovery, Recovery::Done) {
                        shared.replays(&mut pending, &mut replaying).await;
                        next_replay_poll = now + REPLAY_POLL;
                    }
                }
            }
        }
        // Messages not started go back at once; handlers in flight finish,
        // and those that failed go back too.
        for held in pending.drain() {
            let _ = held.ack(AckKind::Nak(None)).await;
        }
        while let Some(joined) = tasks.join_next().await {
            for (held, outcome) in joined.unwrap_or_default() {
                if let Outcome::Retry(_) = outcome {
                    let _ = held.ack(AckKind::Nak(None)).await;
                }
            }
        }
        if let Err(error) = shared.client.flush().await {
            tracing::warn!(consumer = %shared.name, %error, "flushing acks at shutdown failed");
        }
        guard.release().await;
        tracing::info!(consumer = %shared.name, "consumer stopped");
    }

    /// Drops from what recovery read back the events the inbox holds
    /// already, with one look-up per 1,000: most of a long span is handled
    /// and only waits for its acknowledgement. If the look-up fails, each
    /// message finds out in its own transaction.
    async fn unhandled(&self, mut found: Recovered) -> Recovered {
        let ids: Vec<_> = found.messages.iter().filter_map(Held::event_id).collect();
        match inbox::recorded(&self.db, &self.name, &ids).await {
            Ok(handled) => {
                (found.messages)
                    .retain(|held| !held.event_id().is_some_and(|id| handled.contains(&id)));
                tracing::debug!(consumer = %self.name, read = ids.len(), handled = handled.len(), "unsure span read back");
            }
            Err(error) => {
                tracing::warn!(consumer = %self.name, error = %outbox_core::ErrorReport(&error), "cannot look the unsure span up in the inbox; handling it message by message")
            }
        }
        found
    }

    /// Queues what recovery read back, then the delivery that triggered it;
    /// returns the consumer sequence the next delivery must follow.
    fn recovered(
        &self,
        pending: &mut Pending,
        found: Recovered,
        trigger: Option<Box<(Held, u64)>>,
    ) -> u64 {
        if !found.messages.is_empty() {
            tracing::info!(consumer = %self.name, messages = found.messages.len(), "handling deliveries this process did not see, in stream order");
        }
        for held in found.messages {
            pending.recovered(held);
        }
        match trigger.map(|trigger| *trigger) {
            Some((held, delivery)) => {
                pending.receive(held);
                delivery
            }
            None => found.delivered_consumer_sequence,
        }
    }

    /// Queues the dead letters an operator asked to replay, each behind the
    /// messages of its key held now.
    async fn replays(&self, pending: &mut Pending, replaying: &mut HashSet<Uuid>) {
        let busy: Vec<Uuid> = replaying.iter().copied().collect();
        match dead_letters::inbox::requested(&self.db, &self.name, &busy, REPLAY_BATCH).await {
            Ok(letters) => {
                for letter in letters {
                    tracing::info!(consumer = %self.name, dead_letter = %letter.id, "replaying a dead letter");
                    replaying.insert(letter.id);
                    pending.recovered(Held::replayed(letter));
                }
            }
            Err(error) => {
                let error = outbox_core::ErrorReport(&error);
                tracing::warn!(consumer = %self.name, %error, "cannot look for dead letters to replay; will try again");
            }
        }
    }

    async fn open(&self) -> Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
        let batch = (self.config.max_in_flight * self.config.batch_size * 2)
            .min(self.config.max_ack_pending)
            .max(1);
        (self.consumer.stream())
            .max_messages_per_batch(batch)
            .messages()
            .await
    }

    fn start(self: &Arc<Self>, tasks: &mut JoinSet<Vec<(Held, Outcome)>>, batch: Vec<Held>) {
        let shared = Arc::clone(self);
        tasks.spawn(async move {
            match AssertUnwindSafe(shared.handle(&batch)).catch_unwind().await {
                Ok(outcomes) => batch.into_iter().zip(outcomes).collect(),
                Err(_) => {
                    tracing::error!(consumer = %shared.name, messages = batch.len(), "the consumer panicked on a batch; its messages will be retried");
                    (batch.into_iter())
                        .map(|held| {
                            let delay = shared.retry_delay(&held);
                            (held, Outcome::Retry(delay))
                        })
                        .collect()
                }
            }
        });
    }

    /// Handles a batch of messages, of distinct keys, in one transaction
    /// (see [`Handlers::process_batch`]), then each to its end: ack, retry
    /// later (with its key held), or dead letter and term. One outcome per
    /// message, in order.
    async fn handle(&self, batch: &[Held]) -> Vec<Outcome> {
        // Each message with its place in the batch, as one record through
        // the transaction and back.
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut incoming = Vec::with_capacity(batch.len());
        for (at, held) in batch.iter().enumerate() {
            match message::metadata(held, self.namespace.as_deref()) {
                Ok(meta) => {
                    let payload = &held.message().payload;
                    incoming.push((at, Incoming { meta, payload }));
                }
                // The durable's own copy is dead-lettered when it comes back.
                Err(_) if matches!(held.origin, Origin::Recovered(_)) => {
                    outcomes.push((at, Outcome::Resolved));
                }
                Err(malformed) => {
                    let error = outbox_core::ErrorReport(&malformed).to_string();
                    let outcome = self
                        .dead_letter(held, DeadLetterReason::Malformed, error)
                        .await;
                    outcomes.push((at, outcome));
                }
            }
        }
        let span =
            tracing::debug_span!("outbox.handle", consumer = %self.name, messages = incoming.len());
        let processed = tracing::Instrument::instrument(
            self.handlers.process_tagged(&self.db, &self.name, incoming),
            span,
        )
        .await;
        for (at, processed) in processed {
            outcomes.push((at, self.settle(&batch[at], processed).await));
        }
        outcomes.sort_unstable_by_key(|&(at, _)| at);
        outcomes.into_iter().map(|(_, outcome)| outcome).collect()
    }

    /// Ends one message by what its transaction did.
    async fn settle(&self, held: &Held, processed: Processed) -> Outcome {
        let config = &self.config;
        match processed {
            Processed::Handled | Processed::Duplicate => {
                let outcome = if processed == Processed::Handled {
                    "handled"
                } else {
                    "duplicate"
                };
                self.count(outcome);
                self.ack(held, AckKind::Ack).await;
                Outcome::Resolved
            }
            Processed::Failed(error) if held.delivery_count() >= config.max_deliveries => {
                let error = error.to_string();
                self.dead_letter(held, DeadLetterReason::HandlerFailed, error)
                    .await
            }
            Processed::Failed(error) => {
                self.count("failed");
                self.retry(held, "handler failed", &error.to_string())
            }
            // Not the message's fault: it does not move towards a dead letter,
            // however often it is retried.
            Processed::Unavailable(error) => {
                self.count("unavailable");
                self.retry(held, "database failed", &error)
            }
            Processed::Unhandled { reason, error }
                if config.skip_unhandled && reason.is_unhandled_type() =>
            {
                tracing::debug!(consumer = %self.name, %reason, %error, "skipping a message no handler takes");
                self.count("skipped");
                self.ack(held, AckKind::Ack).await;
                Outcome::Resolved
            }
            Processed::Unhandled { reason, error } => self.dead_letter(held, reason, error).await,
        }
    }

    /// Records the message as a dead letter (and, if it has an event id, in
    /// the inbox, so that a redelivery is skipped), then terminates it. If the
    /// database fails, the message is retried instead: nothing is dropped.
    async fn dead_letter(&self, held: &Held, reason: DeadLetterReason, error: String) -> Outcome {
        let sequence = held.position.stream_sequence;
        let (event_id, event_type) = (held.event_id(), held.event_type());
        tracing::error!(consumer = %self.name, sequence, event_id = event_id.as_ref().map(tracing::field::display), event_type, %reason, %error, "dead-lettering a message");
        let letter = message::dead_letter(&self.name, &self.stream_name, held, reason, error);
        let event_id = letter.event_id;
        let stored = async {
            let txn = self.db.begin().await?;
            if let Some(id) = event_id {
                inbox::record(&txn, &self.name, id).await?;
            }
            // A replay that failed again replaces its dead letter.
            if let Some(replayed) = held.replays() {
                dead_letters::inbox::replayed(&txn, replayed).await?;
            }
            inbox::dead_letter(&txn, letter).await?;
            txn.commit().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        match stored.await {
            Ok(()) => {
                metrics::counter!("outbox_inbox_dead_lettered_total", "consumer" => self.name.clone(), "reason" => reason.as_str()).increment(1);
                self.count("dead_lettered");
                self.ack(held, AckKind::Term).await;
                Outcome::Resolved
            }
            Err(error) => {
                let error = outbox_core::ErrorReport(&*error).to_string();
                self.retry(held, "storing the dead letter failed", &error)
            }
        }
    }

    /// Schedules another attempt after the backoff delay of the delivery
    /// count. The message is not handed back to JetStream: this process keeps
    /// it, and its key, until it is resolved.
    fn retry(&self, held: &Held, what: &str, error: &str) -> Outcome {
        let delay = self.retry_delay(held);
        let (sequence, delivery) = (held.position.stream_sequence, held.delivery_count());
        let (event_id, event_type) = (held.event_id(), held.event_type());
        tracing::warn!(consumer = %self.name, sequence, event_id = event_id.as_ref().map(tracing::field::display), event_type, delivery, retry_in = ?delay, %error, "{what}; the message will be retried");
        Outcome::Retry(delay)
    }

    fn retry_delay(&self, held: &Held) -> Duration {
        let failures = u32::try_from(held.delivery_count()).unwrap_or(u32::MAX);
        self.config.retry_backoff.delay(failures)
    }

    async fn ack(&self, held: &Held, kind: AckKind) {
        if let (Some(replayed), AckKind::Ack) = (held.replays(), kind) {
            // If this fails, the next poll replays it again, and the inbox
            // finds it handled.
            if let Err(error) = dead_letters::inbox::replayed(&self.db, replayed).await {
                let error = outbox_core::ErrorReport(&error);
                tracing::warn!(consumer = %self.name, %error, "cannot delete a replayed dead letter");
            }
        }
        if let Err(error) = held.ack(kind).await {
            // Not acknowledged: JetStream redelivers it, and the inbox skips it.
            tracing::warn!(consumer = %self.name, %error, "acknowledgement failed");
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("outbox_inbox_messages_total", "consumer" => self.name.clone(), "outcome" => outcome).increment(1);
    }

    /// Checks the consumer's lock, taking it again after a database restart;
    /// `false` if the application closed the pool, which stops the consumer.
    async fn renew(&self, guard: &mut ConsumerGuard) -> bool {
        match guard.renew().await {
            Ok(Taken::Held) => {}
            Ok(Taken::PoolClosed) => {
                tracing::warn!(consumer = %self.name, "the database pool was closed; the consumer stops");
                return false;
            }
            Ok(Taken::Elsewhere) => {
                tracing::error!(consumer = %self.name, "another process took this consumer's lock while the database restarted: two processes now run it, and per-key order does not hold while they do; stop one")
            }
            Err(error) => {
                tracing::warn!(consumer = %self.name, error = %outbox_core::ErrorReport(&error), "cannot check the consumer's lock; will try again")
            }
        }
        true
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
                tracing::warn!(consumer = %self.name, error = %outbox_core::ErrorReport(&error), "inbox retention cleanup failed")
            }
        }
    }
}

async fn next_message(
    messages: &mut Option<pull::Stream>,
) -> Option<Result<async_nats::jetstream::Message, pull::MessagesError>> {
    match messages {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
