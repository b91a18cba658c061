//! The consumer's task: recovers deliveries it never saw, pulls messages,
//! starts handlers within the in-flight bound and per-key order, and
//! acknowledges, retries or dead-letters each message once its transaction
//! has ended.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{FutureExt, StreamExt};
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use super::ConsumerConfig;
use super::group::{GroupFence, Member, Rebalanced};
use super::held::{self, Held, Origin};
use super::pending::Pending;
use super::transport::{Pull, PullError, Pulled, Settle, Span, Transport};
use crate::inbox::{
    self, ConsumerGuard, DeadLetterReason, Fence, Handlers, Incoming, Processed, Taken, Unavailable,
};
use crate::{Backoff, ErrorReport, dead_letters};

/// Pauses between attempts to (re)open the pull or to recover.
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

/// What entitles this process to a consumer name's messages.
pub(super) enum Ownership {
    /// The one process running it: its lock; messages come from a durable
    /// consumer and are settled with the broker.
    Sole(ConsumerGuard),
    /// A member of its group: the partitions it owns; messages are read
    /// from the stream, and progress is kept per partition in the database.
    Group(Member),
}

/// What a running consumer shares with its handler tasks.
pub(super) struct Worker<T> {
    pub(super) transport: T,
    pub(super) db: DatabaseConnection,
    pub(super) handlers: Handlers,
    pub(super) name: String,
    pub(super) stream_name: String,
    pub(super) namespace: Option<String>,
    pub(super) config: ConsumerConfig,
    /// Whether deliveries are settled with the broker: not a group member's.
    pub(super) settles: bool,
}

/// How one attempt at a message ended.
enum Outcome {
    /// Acknowledged, skipped or dead-lettered: the key's next message may run.
    Resolved,
    /// Not committed: this group member lost the message's partition, whose
    /// new owner handles it.
    Fenced,
    /// Failed: run it again after the delay, its key held meanwhile.
    Retry(Duration),
}

/// Whether the unsure span must be read back before anything new is handled.
enum Recovery<M> {
    Done,
    /// Owed; `trigger` is the delivery that revealed a skipped one, with its
    /// consumer sequence, handled after the span.
    Owed {
        trigger: Option<Box<(Held<M>, u64)>>,
    },
}

/// A batch's messages, each with how its attempt ended.
type Settled<M> = Vec<(Held<M>, Outcome)>;

/// The loop's state: what it holds, what runs, and when it next does each
/// periodic chore. Each method is one step of [`Worker::run`].
struct Loop<T: Transport> {
    shared: Arc<Worker<T>>,
    ownership: Ownership,
    tasks: JoinSet<Settled<T::Message>>,
    pending: Pending<T::Message>,
    recovery: Recovery<T::Message>,
    /// The consumer sequence of the last delivery seen: a delivery that
    /// does not follow it means one went elsewhere.
    last_delivery: Option<u64>,
    pull: Option<Pull<T::Message>>,
    /// Failures in a row of recovery, opening or pulling, and when to try again.
    failures: u32,
    resume: Instant,
    purge_every: Duration,
    next_purge: Instant,
    next_renewal: Instant,
    next_replay_poll: Instant,
    /// The dead letters being replayed, not to be picked up twice.
    replaying: HashSet<Uuid>,
    /// Since when the broker has been out of reach, as a group member's
    /// looks found it.
    unreachable_since: Option<Instant>,
    /// The lag the last delivery reported, for the gauge the chores set
    /// (not set per message: only its latest value is read).
    lag: Option<u64>,
}

impl<T: Transport> Worker<T> {
    pub(super) async fn run(self, ownership: Ownership, mut stopped: watch::Receiver<bool>) {
        let mut state = Loop::new(self, ownership);
        let config = state.shared.config.clone();
        let mut tick = tokio::time::interval(TICK);
        tracing::info!(consumer = %state.shared.name, stream = %state.shared.stream_name, "consumer started");
        loop {
            // While the broker fails, pulling pauses; handlers in flight are still settled.
            state.recover_if_owed().await;
            state.open_if_closed().await;
            state.start_ready();
            // Pull while the next batch is not full, so that one is ready
            // when a transaction ends.
            let room = state.has_room();
            let next_retry = state.pending.next_retry();
            tokio::select! {
                // Err: the handle was dropped, which leaves the consumer running.
                Ok(()) = stopped.changed() => break,
                Some(joined) = state.tasks.join_next(), if !state.tasks.is_empty() => {
                    // Tasks catch their own panics, so a join error is a cancellation.
                    if let Ok(settled) = joined {
                        state.settled(settled);
                    }
                }
                () = sleep_until(next_retry), if next_retry.is_some() => {
                    state.pending.due(Instant::now());
                }
                next = next_delivery(&mut state.pull), if room => state.pulled(next),
                _ = tick.tick() => {
                    if !state.chores(&config).await {
                        break;
                    }
                }
            }
        }
        state.shut_down().await;
        match state.ownership {
            Ownership::Sole(guard) => guard.release().await,
            Ownership::Group(member) => {
                if let Err(error) = member.leave().await {
                    tracing::warn!(consumer = %state.shared.name, error = %ErrorReport(&error), "cannot hand the group's partitions over; they go once this member's lease ends");
                }
            }
        }
        tracing::info!(consumer = %state.shared.name, "consumer stopped");
    }

    /// Drops from what recovery read back the events the inbox holds
    /// already, with one look-up per 1,000: most of a long span is handled
    /// and only waits for its acknowledgement. If the look-up fails, each
    /// message finds out in its own transaction.
    async fn unhandled(&self, span: Span<T::Message>) -> (Vec<Held<T::Message>>, u64) {
        let mut found: Vec<Held<T::Message>> = (span.messages.into_iter())
            .map(|(message, sequence)| Held::recovered(message, sequence))
            .collect();
        let ids: Vec<_> = found.iter().filter_map(Held::event_id).collect();
        match inbox::recorded(&self.db, &self.name, &ids).await {
            Ok(handled) => {
                found.retain(|held| !held.event_id().is_some_and(|id| handled.contains(&id)));
                tracing::debug!(consumer = %self.name, read = ids.len(), handled = handled.len(), "unsure span read back");
            }
            Err(error) => {
                tracing::warn!(consumer = %self.name, error = %ErrorReport(&error), "cannot look the unsure span up in the inbox; handling it message by message")
            }
        }
        (found, span.delivered_consumer_sequence)
    }

    /// Looks for the dead letters an operator asked to replay, but those
    /// being replayed now.
    async fn replays(&self, replaying: &HashSet<Uuid>) -> Vec<Held<T::Message>> {
        let busy: Vec<Uuid> = replaying.iter().copied().collect();
        match dead_letters::inbox::requested(&self.db, &self.name, &busy, REPLAY_BATCH).await {
            Ok(letters) => (letters.into_iter())
                .map(|letter| {
                    tracing::info!(consumer = %self.name, dead_letter = %letter.id, "replaying a dead letter");
                    Held::replayed(letter)
                })
                .collect(),
            Err(error) => {
                let error = ErrorReport(&error);
                tracing::warn!(consumer = %self.name, %error, "cannot look for dead letters to replay; will try again");
                Vec::new()
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Settled<T::Message>>,
        batch: Vec<Held<T::Message>>,
        fence: Option<GroupFence>,
    ) {
        let shared = Arc::clone(self);
        tasks.spawn(async move {
            let handled = shared.handle(&batch, fence.as_ref());
            match AssertUnwindSafe(handled).catch_unwind().await {
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
    /// later (with its key held), or dead letter and terminate. One outcome
    /// per message, in order.
    async fn handle(&self, batch: &[Held<T::Message>], fence: Option<&GroupFence>) -> Vec<Outcome> {
        // Each message with its place in the batch, as one record through
        // the transaction and back.
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut incoming = Vec::with_capacity(batch.len());
        for (at, held) in batch.iter().enumerate() {
            match held::metadata(held, self.namespace.as_deref()) {
                Ok(meta) => {
                    let payload = held.message().payload();
                    incoming.push((at, Incoming { meta, payload }));
                }
                // The broker's own copy is dead-lettered when it comes back.
                Err(_) if matches!(held.origin, Origin::Recovered(_)) => {
                    outcomes.push((at, Outcome::Resolved));
                }
                Err(malformed) => {
                    let error = ErrorReport(&malformed).to_string();
                    let outcome = self
                        .dead_letter(held, DeadLetterReason::Malformed, error, fence)
                        .await;
                    outcomes.push((at, outcome));
                }
            }
        }
        let span =
            tracing::debug_span!("outbox.handle", consumer = %self.name, messages = incoming.len());
        let processed = tracing::Instrument::instrument(
            (self.handlers).process_fenced(
                &self.db,
                &self.name,
                incoming,
                fence.map(|f| f as &dyn Fence),
            ),
            span,
        )
        .await;
        for (at, processed) in processed {
            outcomes.push((at, self.settle(&batch[at], processed, fence).await));
        }
        outcomes.sort_unstable_by_key(|&(at, _)| at);
        outcomes.into_iter().map(|(_, outcome)| outcome).collect()
    }

    /// Ends one message by what its transaction did.
    async fn settle(
        &self,
        held: &Held<T::Message>,
        processed: Processed,
        fence: Option<&GroupFence>,
    ) -> Outcome {
        let config = &self.config;
        match processed {
            Processed::Handled | Processed::Duplicate => {
                let outcome = if processed == Processed::Handled {
                    "handled"
                } else {
                    "duplicate"
                };
                self.count(outcome);
                self.ack(held, Settle::Ack).await;
                Outcome::Resolved
            }
            Processed::Failed(error) if held.delivery_count() >= config.max_deliveries => {
                let error = ErrorReport(&error).to_string();
                self.dead_letter(held, DeadLetterReason::HandlerFailed, error, fence)
                    .await
            }
            Processed::Unavailable(Unavailable::Fenced) => {
                self.count("fenced");
                Outcome::Fenced
            }
            Processed::Failed(error) => {
                self.count("failed");
                self.retry(held, "handler failed", &ErrorReport(&error).to_string())
            }
            // Not the message's fault: it does not move towards a dead letter,
            // however often it is retried.
            Processed::Unavailable(error) => {
                self.count("unavailable");
                self.retry(held, "database failed", &ErrorReport(&error).to_string())
            }
            Processed::Unhandled(unhandled)
                if config.skip_unhandled && unhandled.reason().is_unhandled_type() =>
            {
                let error = ErrorReport(&unhandled).to_string();
                tracing::debug!(consumer = %self.name, reason = %unhandled.reason(), %error, "skipping a message no handler takes");
                self.count("skipped");
                self.ack(held, Settle::Ack).await;
                Outcome::Resolved
            }
            Processed::Unhandled(unhandled) => {
                let error = ErrorReport(&unhandled).to_string();
                self.dead_letter(held, unhandled.reason(), error, fence)
                    .await
            }
        }
    }

    /// Records the message as a dead letter (and, if it has an event id, in
    /// the inbox, so that a redelivery is skipped), then terminates it. If the
    /// database fails, the message is retried instead: nothing is dropped.
    async fn dead_letter(
        &self,
        held: &Held<T::Message>,
        reason: DeadLetterReason,
        error: String,
        fence: Option<&GroupFence>,
    ) -> Outcome {
        let sequence = held.position.stream_sequence;
        let (event_id, event_type) = (held.event_id(), held.event_type());
        tracing::error!(consumer = %self.name, sequence, event_id = event_id.as_ref().map(tracing::field::display), event_type, %reason, %error, "dead-lettering a message");
        let letter = held::dead_letter(&self.name, &self.stream_name, held, reason, error);
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
            if let Some(fence) = fence
                && !fence.holds(&txn).await?
            {
                txn.rollback().await?;
                return Ok(false);
            }
            txn.commit().await?;
            Ok::<_, inbox::BoxError>(true)
        };
        match stored.await {
            Ok(false) => {
                self.count("fenced");
                Outcome::Fenced
            }
            Ok(true) => {
                metrics::counter!("outbox_inbox_dead_lettered_total", "consumer" => self.name.clone(), "reason" => reason.as_str()).increment(1);
                self.count("dead_lettered");
                self.ack(held, Settle::Terminate).await;
                Outcome::Resolved
            }
            Err(error) => {
                let error = ErrorReport(&*error).to_string();
                self.retry(held, "storing the dead letter failed", &error)
            }
        }
    }

    /// Schedules another attempt after the backoff delay of the delivery
    /// count. The message is not handed back to the broker: this process
    /// keeps it, and its key, until it is resolved.
    fn retry(&self, held: &Held<T::Message>, what: &str, error: &str) -> Outcome {
        let delay = self.retry_delay(held);
        let (sequence, delivery) = (held.position.stream_sequence, held.delivery_count());
        let (event_id, event_type) = (held.event_id(), held.event_type());
        tracing::warn!(consumer = %self.name, sequence, event_id = event_id.as_ref().map(tracing::field::display), event_type, delivery, retry_in = ?delay, %error, "{what}; the message will be retried");
        Outcome::Retry(delay)
    }

    fn retry_delay(&self, held: &Held<T::Message>) -> Duration {
        let failures = u32::try_from(held.delivery_count()).unwrap_or(u32::MAX);
        self.config.retry_backoff.delay(failures)
    }

    /// Ends a message: a replayed one's dead letter goes once it is
    /// handled, a delivered one is settled with the broker.
    async fn ack(&self, held: &Held<T::Message>, how: Settle) {
        if let (Some(replayed), Settle::Ack) = (held.replays(), how) {
            // If this fails, the next poll replays it again, and the inbox
            // finds it handled.
            if let Err(error) = dead_letters::inbox::replayed(&self.db, replayed).await {
                let error = ErrorReport(&error);
                tracing::warn!(consumer = %self.name, %error, "cannot delete a replayed dead letter");
            }
        }
        if let Err(error) = self.settle_delivery(held, how).await {
            // Not acknowledged: the broker redelivers it, and the inbox skips it.
            let error = ErrorReport(&*error);
            tracing::warn!(consumer = %self.name, %error, "acknowledgement failed");
        }
    }

    /// Settles the broker's copy, if the message is one (a group member's
    /// reading has none to settle).
    async fn settle_delivery(
        &self,
        held: &Held<T::Message>,
        how: Settle,
    ) -> Result<(), inbox::BoxError> {
        match held.delivery() {
            Some(message) if self.settles => self.transport.settle(message, how).await,
            _ => Ok(()),
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
                tracing::warn!(consumer = %self.name, error = %ErrorReport(&error), "cannot check the consumer's lock; will try again")
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
                tracing::warn!(consumer = %self.name, error = %ErrorReport(&error), "inbox retention cleanup failed")
            }
        }
    }
}

impl<T: Transport> Loop<T> {
    fn new(worker: Worker<T>, ownership: Ownership) -> Self {
        let retention = worker.config.inbox_retention;
        let now = Instant::now();
        // A group member reads from its partitions' positions: nothing is unsure.
        let recovery = match ownership {
            Ownership::Sole(_) => Recovery::Owed { trigger: None },
            Ownership::Group(_) => Recovery::Done,
        };
        Self {
            shared: Arc::new(worker),
            ownership,
            tasks: JoinSet::new(),
            pending: Pending::new(),
            recovery,
            last_delivery: None,
            pull: None,
            failures: 0,
            resume: now,
            purge_every: (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600)),
            next_purge: now,
            next_renewal: now,
            next_replay_poll: now,
            replaying: HashSet::new(),
            unreachable_since: None,
            lag: None,
        }
    }

    /// Notes a failure of the broker and pauses pulling for the backoff.
    fn failed(&mut self) {
        self.failures += 1;
        self.resume = Instant::now() + RECONNECT.delay(self.failures);
    }

    /// Reads the unsure span back, if owed and not pausing: queues what
    /// the inbox does not hold yet, then the delivery that revealed it.
    async fn recover_if_owed(&mut self) {
        let Recovery::Owed { trigger } = &mut self.recovery else {
            return;
        };
        if Instant::now() < self.resume {
            return;
        }
        let shared = &self.shared;
        match shared.transport.unsure_span().await {
            Ok(span) => {
                self.failures = 0;
                let (found, delivered) = shared.unhandled(span).await;
                if !found.is_empty() {
                    tracing::info!(consumer = %shared.name, messages = found.len(), "handling deliveries this process did not see, in stream order");
                }
                for held in found {
                    self.pending.recovered(held);
                }
                self.last_delivery = Some(match trigger.take().map(|trigger| *trigger) {
                    Some((held, delivery)) => {
                        self.pending.receive(held);
                        delivery
                    }
                    None => delivered,
                });
                self.recovery = Recovery::Done;
            }
            Err(error) => {
                let error = ErrorReport(&*error);
                tracing::warn!(consumer = %shared.name, %error, "recovery failed; retrying");
                self.failed();
            }
        }
    }

    /// Opens a pull, once recovered, if there is none and not pausing.
    async fn open_if_closed(&mut self) {
        if !matches!(self.recovery, Recovery::Done)
            || self.pull.is_some()
            || Instant::now() < self.resume
        {
            return;
        }
        let config = &self.shared.config;
        let batch = (config.max_in_flight * config.batch_size * 2)
            .min(config.max_ack_pending)
            .max(1);
        let transport = &self.shared.transport;
        let opened = match &mut self.ownership {
            Ownership::Sole(_) => transport.open(batch).await,
            Ownership::Group(member) if member.owns_any() => {
                transport.read_from(member.start()).await
            }
            Ownership::Group(_) => return,
        };
        match opened {
            Ok(pull) => self.pull = Some(pull),
            Err(error) => {
                let error = ErrorReport(&*error);
                tracing::warn!(consumer = %self.shared.name, %error, "cannot pull messages; retrying");
                self.failed();
            }
        }
    }

    /// Starts batches of what is ready, within the in-flight bound. A batch
    /// is what is ready now: it never waits to fill up.
    fn start_ready(&mut self) {
        let config = &self.shared.config;
        while self.tasks.len() < config.max_in_flight && self.pending.has_ready() {
            let batch = std::iter::from_fn(|| self.pending.pop_ready());
            let batch: Vec<_> = batch.take(config.batch_size).collect();
            let fence = match &self.ownership {
                Ownership::Sole(_) => None,
                Ownership::Group(member) => {
                    Some(member.fence(batch.iter().map(|held| partition(member, held))))
                }
            };
            self.shared.start(&mut self.tasks, batch, fence);
        }
    }

    /// Whether to pull: recovered, not pausing, the next batch not full and
    /// fewer held than the broker lets out unacknowledged.
    fn has_room(&self) -> bool {
        let config = &self.shared.config;
        matches!(self.recovery, Recovery::Done)
            && self.pending.ready() < config.batch_size
            && self.pending.len() < config.max_ack_pending
            && Instant::now() >= self.resume
    }

    /// Takes back a finished batch: resolved messages free their keys,
    /// failed ones wait out their delay with their keys held.
    fn settled(&mut self, settled: Settled<T::Message>) {
        for (mut held, outcome) in settled {
            match outcome {
                Outcome::Resolved => {
                    if let Some(id) = held.replays() {
                        self.replaying.remove(&id);
                    }
                    if let (Ownership::Group(member), Some(_)) =
                        (&mut self.ownership, held.delivery())
                    {
                        member.settled(partition(member, &held), held.position.stream_sequence);
                    }
                    self.pending.resolve(&held);
                }
                // Left unsettled: the partition's position stays below it,
                // and its new owner reads it again.
                Outcome::Fenced => {
                    if let Some(id) = held.replays() {
                        self.replaying.remove(&id);
                    }
                    self.pending.resolve(&held);
                }
                Outcome::Retry(delay) => {
                    held.failures += 1;
                    self.pending.retry(held, Instant::now() + delay);
                }
            }
        }
    }

    /// Takes what the pull yielded: a delivery in sequence is queued; one
    /// after a gap owes a recovery first.
    fn pulled(&mut self, next: Option<Result<Pulled<T::Message>, PullError>>) {
        let name = &self.shared.name;
        match next {
            Some(Ok(pulled)) => {
                self.failures = 0;
                let stream_end = pulled.stream_sequence.saturating_add(pulled.pending);
                self.lag = Some(pulled.pending);
                let (held, delivery) = Held::delivered(pulled);
                if let Ownership::Group(member) = &mut self.ownership {
                    member.saw(stream_end);
                    // Another member's partition, or read again after a take.
                    let sequence = held.position.stream_sequence;
                    if member.accepts(partition(member, &held), sequence) {
                        self.pending.receive(held);
                    }
                } else if self.last_delivery.is_some_and(|last| delivery != last + 1) {
                    tracing::info!(consumer = %name, delivery, last = ?self.last_delivery, "a delivery went elsewhere; reading the unsure span back from the stream");
                    let trigger = Some(Box::new((held, delivery)));
                    self.recovery = Recovery::Owed { trigger };
                } else {
                    self.last_delivery = Some(delivery);
                    self.pending.receive(held);
                }
            }
            Some(Err(error)) => {
                tracing::warn!(consumer = %name, error = %ErrorReport(&error), "pulling messages failed");
                if matches!(error, PullError::Closed(_)) {
                    self.pull = None;
                }
                self.failed();
            }
            None => self.pull = None,
        }
    }

    /// The periodic chores: extend ack deadlines, check the lock or look at
    /// the group, purge the inbox, look for replays. `false` when the
    /// consumer must stop.
    async fn chores(&mut self, config: &ConsumerConfig) -> bool {
        let shared = Arc::clone(&self.shared);
        let now = Instant::now();
        if let Some(lag) = self.lag.take() {
            metrics::gauge!("outbox_consumer_pending", "consumer" => shared.name.clone())
                .set(lag as f64);
        }
        if let Some(before) = now.checked_sub(config.ack_wait / 2) {
            for held in self.pending.due_for_extension(before, now) {
                let _ = shared.settle_delivery(held, Settle::Extend).await;
            }
        }
        if now >= self.next_renewal {
            let next = match &mut self.ownership {
                Ownership::Sole(guard) => {
                    if !shared.renew(guard).await {
                        return false;
                    }
                    GUARD_RENEWAL
                }
                Ownership::Group(member) => {
                    let renewal = member.renewal();
                    self.rebalance().await;
                    renewal
                }
            };
            self.next_renewal = now + next;
        }
        if now >= self.next_purge {
            shared.purge().await;
            self.next_purge = now + self.purge_every;
        }
        if now >= self.next_replay_poll && matches!(self.recovery, Recovery::Done) {
            for held in shared.replays(&self.replaying).await {
                // A group member replays the dead letters of its partitions.
                if let Ownership::Group(member) = &self.ownership
                    && !member.owns(partition(member, &held))
                {
                    continue;
                }
                self.replaying.extend(held.replays());
                self.pending.recovered(held);
            }
            self.next_replay_poll = now + REPLAY_POLL;
        }
        true
    }

    /// A group member's look at its group: partitions taken restart the
    /// reading from the lowest position it owns. A member cut off from the
    /// broker for a lease stands down instead, until it can read again.
    async fn rebalance(&mut self) {
        let Ownership::Group(member) = &mut self.ownership else {
            return;
        };
        let name = &self.shared.name;
        let now = Instant::now();
        self.unreachable_since = match self.shared.transport.reachable() {
            true => None,
            false => Some(self.unreachable_since.unwrap_or(now)),
        };
        if self
            .unreachable_since
            .is_some_and(|since| now - since >= member.lease())
        {
            match member.stand_down().await {
                Ok(handed) if !handed.is_empty() => {
                    self.pull = None;
                    forget(&mut self.pending, member, &handed);
                    tracing::warn!(consumer = %name, member = %member.id(), "the broker has been out of reach for a lease: this member hands its partitions over and stays out of the group until it can read again");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(consumer = %name, error = %ErrorReport(&error), "cannot hand the partitions over; they go once this member's lease ends");
                }
            }
            return;
        }
        match member.rebalance().await {
            Ok(changed) => {
                metrics::gauge!("outbox_consumer_group_partitions", "consumer" => name.clone())
                    .set(member.owned_count() as f64);
                if !changed.taken.is_empty() || !member.owns_any() {
                    self.pull = None;
                }
                if changed != Rebalanced::default() {
                    let (taken, released, lost) =
                        (&changed.taken, &changed.released, &changed.lost);
                    tracing::info!(consumer = %name, member = %member.id(), ?taken, ?released, ?lost, "the group's partitions moved");
                }
                if !changed.lost.is_empty() {
                    forget(&mut self.pending, member, &changed.lost);
                    tracing::warn!(consumer = %name, member = %member.id(), lost = ?changed.lost, "partitions were taken by another member after this one's lease ended; what it held of them is not committed");
                }
            }
            Err(error) => {
                tracing::warn!(consumer = %name, error = %ErrorReport(&error), "cannot renew this member's lease or look at the group; will try again");
            }
        }
    }

    /// Messages not started go back at once; handlers in flight finish,
    /// and those that failed go back too.
    async fn shut_down(&mut self) {
        let shared = &self.shared;
        for held in self.pending.drain() {
            let _ = shared.settle_delivery(&held, Settle::Redeliver).await;
        }
        while let Some(joined) = self.tasks.join_next().await {
            for (held, outcome) in joined.unwrap_or_default() {
                match (outcome, &mut self.ownership) {
                    (Outcome::Retry(_), _) => {
                        let _ = shared.settle_delivery(&held, Settle::Redeliver).await;
                    }
                    // Settled: the partition's next owner starts after it.
                    (Outcome::Resolved, Ownership::Group(member)) if held.delivery().is_some() => {
                        member.settled(partition(member, &held), held.position.stream_sequence);
                    }
                    _ => {}
                }
            }
        }
        if let Err(error) = shared.transport.flush().await {
            let error = ErrorReport(&*error);
            tracing::warn!(consumer = %shared.name, %error, "flushing acks at shutdown failed");
        }
    }
}

/// The partition of a held message: by its partition key, or its event id
/// if it has none (unkeyed events go to any member).
fn partition<M: super::Message>(member: &Member, held: &Held<M>) -> u32 {
    match (&held.key, held.event_id()) {
        (Some(key), _) => member.partition_of(key.as_bytes()),
        (None, Some(id)) => member.partition_of(id.as_bytes()),
        (None, None) => 0,
    }
}

/// Forgets the held messages of `partitions`, and their keys: another
/// member handles them now.
fn forget<M: super::Message>(pending: &mut Pending<M>, member: &Member, partitions: &[u32]) {
    let gone = |index| partitions.contains(&index);
    pending.forget(
        |key| gone(member.partition_of(key.as_bytes())),
        |held| gone(partition(member, held)),
    );
}

async fn next_delivery<M>(pull: &mut Option<Pull<M>>) -> Option<Result<Pulled<M>, PullError>> {
    match pull {
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
