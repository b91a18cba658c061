//! The dispatch table of a consumer, and the transaction each message is handled in.

use std::any::Any;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tracing::Instrument;
use uuid::Uuid;

use super::{DeadLetterReason, Handler, Metadata, store};
use crate::dialect::Dialect;
use crate::{Error, OutboxEvent, signal};

/// How one message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// The handler's effect and the inbox row committed: acknowledge.
    Handled,
    /// The inbox already held the event: the handler was skipped; acknowledge.
    Duplicate,
    /// The handler failed or panicked: nothing committed; deliver again later.
    Failed(HandlerFailure),
    /// The database failed around the handler (begin, inbox row, commit):
    /// nothing committed; deliver again later, without blaming the message.
    Unavailable(String),
    /// No handler can take the message; nothing ran. Redelivery would not
    /// help: dead-letter it (or skip it, if so configured).
    Unhandled {
        /// Which of the unhandled cases.
        reason: DeadLetterReason,
        /// The detail, naming the event type and version.
        error: String,
    },
}

/// Why a handler did not take effect. Its text goes to logs and dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerFailure {
    /// The handler returned an error, kept as its text with its causes
    /// (`error: cause: cause`).
    #[error("{0}")]
    Returned(String),
    /// The handler panicked; the panic's message, if it was a string.
    #[error("handler panicked: {0}")]
    Panicked(String),
}

/// Two handlers registered for one event type and version on one consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("two handlers for event `{event_type}` version {version} on one consumer")]
pub struct DuplicateHandler {
    /// The event type.
    pub event_type: &'static str,
    /// Its version.
    pub version: u16,
}

type Run = dyn for<'a> Fn(
        Box<dyn Any + Send>,
        Metadata,
        &'a DatabaseTransaction,
    ) -> BoxFuture<'a, Result<(), String>>
    + Send
    + Sync;

/// The handlers of one consumer, by event type and version.
#[derive(Default, Clone)]
pub struct Handlers {
    by_type: HashMap<(&'static str, u16), Arc<Run>>,
    streams: BTreeSet<&'static str>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.by_type.keys().collect();
        types.sort();
        f.debug_struct("Handlers")
            .field("types", &types)
            .field("streams", &self.streams)
            .finish()
    }
}

impl Handlers {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `handler` for every event type `E` carries, at `E::VERSION`.
    pub fn insert<E, H>(&mut self, handler: H) -> Result<(), DuplicateHandler>
    where
        E: OutboxEvent,
        H: Handler<E>,
    {
        if let Some(&event_type) = E::EVENT_TYPES
            .iter()
            .find(|name| self.by_type.contains_key(&(**name, E::VERSION)))
        {
            return Err(DuplicateHandler {
                event_type,
                version: E::VERSION,
            });
        }
        let handler = Arc::new(handler);
        let run: Arc<Run> = Arc::new(move |event, meta, db| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let event = event.downcast::<E>().map_err(|_| {
                    format!(
                        "the registry decodes `{}` v{} into another type than `{}`",
                        meta.event_type,
                        meta.version,
                        std::any::type_name::<E>()
                    )
                })?;
                handler.handle(*event, meta, db).await.map_err(|error| {
                    let error: super::BoxError = error.into();
                    crate::ErrorReport(&*error).to_string()
                })
            })
        });
        for name in E::EVENT_TYPES {
            self.by_type.insert((name, E::VERSION), Arc::clone(&run));
        }
        self.streams.insert(E::STREAM);
        Ok(())
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The streams of the registered event types.
    pub fn streams(&self) -> &BTreeSet<&'static str> {
        &self.streams
    }

    /// Handles one message for `consumer` in one transaction of `db`: inbox
    /// row first, then the handler, then commit.
    ///
    /// Undecodable or unhandled messages come back as [`Processed::Unhandled`]
    /// without touching the database.
    pub async fn process(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        meta: Metadata,
        payload: &[u8],
    ) -> Processed {
        let mut processed = self
            .process_batch(db, consumer, vec![Incoming { meta, payload }])
            .await;
        processed
            .pop()
            .unwrap_or(Processed::Unavailable(String::new()))
    }

    /// Handles several messages for `consumer` in one transaction of `db`,
    /// committed once: one WAL flush for the batch rather than one per
    /// message. Each message runs in a savepoint of its own with its inbox
    /// row, so that a failing handler rolls back only its own effect while
    /// the others of the batch commit. Returns one answer per message, in
    /// order.
    ///
    /// If the database fails around the handlers (begin, a savepoint, an
    /// inbox row, the commit), nothing of the batch commits: every message
    /// that was not [`Failed`](Processed::Failed) or unhandled is
    /// [`Unavailable`](Processed::Unavailable). A second copy of an event in
    /// the batch is `Unavailable` too, to be tried again once the first has
    /// ended. Messages of one partition key belong in separate batches, in
    /// order.
    pub async fn process_batch(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        messages: Vec<Incoming<'_>>,
    ) -> Vec<Processed> {
        let tagged = messages.into_iter().map(|message| ((), message)).collect();
        let answers = self.process_tagged(db, consumer, tagged).await;
        answers.into_iter().map(|((), answer)| answer).collect()
    }

    /// [`process_batch`](Self::process_batch), each message carrying a tag
    /// of the caller's (its place in a larger batch, say) that comes back
    /// with its answer: one record per message, in order.
    pub async fn process_tagged<T>(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        messages: Vec<(T, Incoming<'_>)>,
    ) -> Vec<(T, Processed)> {
        let mut ids = HashSet::with_capacity(messages.len());
        let steps: Vec<Step<T>> = (messages.into_iter())
            .map(|(tag, Incoming { meta, payload })| {
                // A second copy of one event (a redelivery that came while the
                // first is held) waits: the inbox row of the first is not
                // committed yet, and if its handler fails there is none.
                let stage = if ids.insert(meta.id) {
                    match self.decode(&meta, payload) {
                        Ok((run, event)) => Stage::Run(Decoded { run, event, meta }),
                        Err(unhandled) => Stage::Answered(unhandled),
                    }
                } else {
                    let error = format!("event {} is in this batch already", meta.id);
                    Stage::Answered(Processed::Unavailable(error))
                };
                Step { tag, stage }
            })
            .collect();
        // One message needs no savepoint: its transaction is its own.
        let to_run = steps.iter().filter(|step| step.decoded().is_some());
        let mode = match to_run.count() {
            0 => Mode::Nothing,
            1 => Mode::Alone,
            _ => Mode::Savepoints,
        };
        let counts_before = signal::Counts::now();
        let mut answers = Vec::with_capacity(steps.len());
        let mut steps = steps.into_iter();
        let ran = self
            .in_transaction(db, consumer, &mut steps, &mut answers, mode)
            .await;
        if let Err(error) = ran {
            return unavailable(&error, answers, steps);
        }
        // A #[transactional] handler signals at its savepoint, before its
        // events are visible: signal again now that they are, scheduled ones
        // included. A batch that emitted nothing wakes no relay (a concurrent
        // one's events may cause a spare wake-up, which is harmless).
        counts_before.signal_since(false, false);
        answers
    }

    fn decode(
        &self,
        meta: &Metadata,
        payload: &[u8],
    ) -> Result<(Arc<Run>, Box<dyn Any + Send>), Processed> {
        let unhandled = |reason, error| Processed::Unhandled { reason, error };
        let (name, version) = (meta.event_type.as_str(), meta.version);
        let Some(run) = self.by_type.get(&(name, version)) else {
            let versions: Vec<u16> = (self.by_type.keys())
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .collect();
            return Err(if versions.is_empty() {
                let error = format!("no handler for event type `{name}`");
                unhandled(DeadLetterReason::UnknownType, error)
            } else {
                let error = format!(
                    "event `{name}` version {version} is not handled (handled versions: {versions:?})"
                );
                unhandled(DeadLetterReason::UnsupportedVersion, error)
            });
        };
        let Some(descriptor) = crate::registry().get(name, version) else {
            let error = format!("event `{name}` version {version} is not in the registry");
            return Err(unhandled(DeadLetterReason::UnknownType, error));
        };
        let event = (descriptor.decode)(payload).map_err(|error| {
            let error = crate::ErrorReport(&error).to_string();
            unhandled(DeadLetterReason::Undecodable, error)
        })?;
        Ok((Arc::clone(run), event))
    }

    /// Takes the `steps` in order, answering each in `answers`, and runs
    /// those to run in one transaction; an error means nothing committed,
    /// and leaves the steps not taken yet in `steps`.
    ///
    /// The inbox rows go in first, in one statement where the database
    /// allows. Each handler then runs in the savepoint `outbox_message`,
    /// released and set again in one round trip before the next handler; a
    /// failing handler is rolled back to it, and its inbox row removed before
    /// the commit. (SeaORM's nested transactions would cost each message two
    /// more round trips; a `#[transactional]` handler still takes one of its
    /// own inside, which the rollback to `outbox_message` undoes as well.)
    async fn in_transaction<T>(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        steps: &mut std::vec::IntoIter<Step<T>>,
        answers: &mut Vec<(T, Processed)>,
        mode: Mode,
    ) -> Result<(), Error> {
        if mode == Mode::Nothing {
            answers.extend(steps.map(Step::into_answer));
            return Ok(());
        }
        let txn = db.begin().await?;
        let ids: Vec<Uuid> = (steps.as_slice().iter())
            .filter_map(|step| Some(step.decoded()?.meta.id))
            .collect();
        let fresh = store::record_all(&txn, consumer, &ids).await?;
        let mut savepoint = Savepoint::new(Dialect::of(&txn));
        let mut failed = Vec::new();
        let mut rolled_back = false;
        for Step { tag, stage } in steps.by_ref() {
            let Decoded { run, event, meta } = match stage {
                Stage::Run(decoded) if fresh.contains(&decoded.meta.id) => decoded,
                Stage::Run(_) => {
                    answers.push((tag, Processed::Duplicate));
                    continue;
                }
                Stage::Answered(answer) => {
                    answers.push((tag, answer));
                    continue;
                }
            };
            // Every step taken is answered, even when the database fails now.
            if mode == Mode::Savepoints
                && let Err(error) = savepoint.set(&txn).await
            {
                let error = Error::from(error);
                let answer = Processed::Unavailable(crate::ErrorReport(&error).to_string());
                answers.push((tag, answer));
                return Err(error);
            }
            let id = meta.id;
            let span = tracing::debug_span!("outbox.handler", event_type = %meta.event_type, event_id = %id);
            #[cfg(feature = "opentelemetry")]
            crate::trace::set_parent(&span, &meta.headers);
            // A panicking handler is a failed delivery, not a dead consumer.
            let outcome = AssertUnwindSafe(run(event, meta, &txn))
                .catch_unwind()
                .instrument(span)
                .await;
            let result = match outcome {
                Ok(result) => result.map_err(HandlerFailure::Returned),
                Err(panic) => Err(HandlerFailure::Panicked(panic_message(&*panic))),
            };
            let Err(failure) = result else {
                answers.push((tag, Processed::Handled));
                continue;
            };
            answers.push((tag, Processed::Failed(failure)));
            match mode {
                // Its transaction is the message's own: nothing else to keep.
                Mode::Alone => rolled_back = true,
                _ => {
                    savepoint.roll_back(&txn).await?;
                    failed.push(id);
                }
            }
        }
        if rolled_back {
            txn.rollback().await?;
            return Ok(());
        }
        if !failed.is_empty() {
            store::forget(&txn, consumer, failed).await?;
        }
        txn.commit().await?;
        Ok(())
    }
}

/// The answers of a batch whose transaction failed with `error`: what
/// committed nothing is [`Processed::Unavailable`], except the answers that
/// did not depend on the transaction (a failed handler, an unhandled
/// message). `answers` are those given before the failure, `rest` the steps
/// not taken.
fn unavailable<T>(
    error: &Error,
    answers: Vec<(T, Processed)>,
    rest: std::vec::IntoIter<Step<T>>,
) -> Vec<(T, Processed)> {
    let error = crate::ErrorReport(error).to_string();
    let lost = |(tag, answer)| match answer {
        Processed::Handled | Processed::Duplicate | Processed::Unavailable(_) => {
            (tag, Processed::Unavailable(error.clone()))
        }
        answer => (tag, answer),
    };
    let rest = rest.map(|Step { tag, stage }| match stage {
        Stage::Run(_) => (tag, Processed::Unavailable(error.clone())),
        Stage::Answered(answer) => (tag, answer),
    });
    answers.into_iter().map(lost).chain(rest).collect()
}

/// How a batch's handlers share its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No handler to run: no transaction.
    Nothing,
    /// One message: its failure rolls the transaction back.
    Alone,
    /// Each in a savepoint: a failure rolls back that handler's effect only.
    Savepoints,
}

/// The one savepoint of a batch, set before each handler.
struct Savepoint {
    /// Whether RELEASE and SAVEPOINT may go as one query.
    together: bool,
    set: bool,
}

impl Savepoint {
    fn new(dialect: Dialect) -> Self {
        Self {
            together: dialect.sends_several_statements(),
            set: false,
        }
    }

    /// Releases the savepoint if set (keeping what the last handler did), and sets it anew.
    async fn set(&mut self, txn: &DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
        const RELEASE: &str = "RELEASE SAVEPOINT outbox_message";
        const SET: &str = "SAVEPOINT outbox_message";
        match (self.set, self.together) {
            (false, _) => txn.execute_unprepared(SET).await?,
            (true, true) => txn.execute_unprepared(&format!("{RELEASE}; {SET}")).await?,
            (true, false) => {
                txn.execute_unprepared(RELEASE).await?;
                txn.execute_unprepared(SET).await?
            }
        };
        self.set = true;
        Ok(())
    }

    /// Undoes what the last handler did.
    async fn roll_back(&self, txn: &DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
        txn.execute_unprepared("ROLLBACK TO SAVEPOINT outbox_message")
            .await
            .map(drop)
    }
}

/// A message of [`Handlers::process_batch`]: its metadata and payload.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// What the transport says of the message.
    pub meta: Metadata,
    /// The event, as serialized.
    pub payload: &'a [u8],
}

/// One message of a batch on its way through it, with its caller's tag.
struct Step<T> {
    tag: T,
    stage: Stage,
}

/// How far a message of a batch has come.
enum Stage {
    /// Its handler found and its payload decoded: runs in the transaction.
    Run(Decoded),
    /// Answered before the transaction: no handler takes it, or it is a
    /// second copy of an event in the batch.
    Answered(Processed),
}

impl<T> Step<T> {
    fn decoded(&self) -> Option<&Decoded> {
        match &self.stage {
            Stage::Run(decoded) => Some(decoded),
            Stage::Answered(_) => None,
        }
    }

    /// The answer of a step in a batch with no handler to run, whose
    /// steps were all answered before any transaction.
    fn into_answer(self) -> (T, Processed) {
        let answer = match self.stage {
            Stage::Answered(answer) => answer,
            Stage::Run(decoded) => Processed::Unavailable(format!(
                "event {} was not run: its batch opened no transaction",
                decoded.meta.id
            )),
        };
        (self.tag, answer)
    }
}

/// A message whose handler was found and whose payload decoded.
struct Decoded {
    run: Arc<Run>,
    event: Box<dyn Any + Send>,
    meta: Metadata,
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload");
    text.to_owned()
}
