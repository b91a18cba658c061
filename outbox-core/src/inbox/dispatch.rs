//! The dispatch table of a consumer, and the transaction each message is handled in.

use std::any::Any;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait};
use tracing::Instrument;
use uuid::Uuid;

use super::{BoxError, DeadLetterReason, Handler, Metadata, store};
use crate::dialect::Dialect;
use crate::signal::{Database, Written};
use crate::{Error, OutboxEvent};

/// How one message ended.
#[derive(Debug, Clone)]
pub enum Processed {
    /// The handler's effect and the inbox row committed: acknowledge.
    Handled,
    /// The inbox already held the event: the handler was skipped; acknowledge.
    Duplicate,
    /// The handler failed or panicked: nothing committed; deliver again later.
    Failed(HandlerFailure),
    /// Not handled now, through no fault of the message's: nothing
    /// committed; deliver again later, without blaming the message.
    Unavailable(Unavailable),
    /// No handler can take the message; nothing ran. Redelivery would not
    /// help: dead-letter it (or skip it, if so configured).
    Unhandled(Unhandled),
}

/// Two answers are equal when they are the same case and their errors read
/// alike, causes included: what a test compares.
impl PartialEq for Processed {
    fn eq(&self, other: &Self) -> bool {
        let text =
            |error: &(dyn std::error::Error + 'static)| crate::ErrorReport(error).to_string();
        match (self, other) {
            (Self::Handled, Self::Handled) | (Self::Duplicate, Self::Duplicate) => true,
            (Self::Failed(a), Self::Failed(b)) => text(a) == text(b),
            (Self::Unavailable(a), Self::Unavailable(b)) => text(a) == text(b),
            (Self::Unhandled(a), Self::Unhandled(b)) => text(a) == text(b),
            _ => false,
        }
    }
}

impl Eq for Processed {}

/// Why a handler did not take effect. Its text, with its causes
/// ([`ErrorReport`](crate::ErrorReport)), goes to logs and dead letters.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerFailure {
    /// The handler returned this error.
    #[error(transparent)]
    Returned(Arc<dyn std::error::Error + Send + Sync>),
    /// The handler panicked; the panic's message, if it was a string.
    #[error("handler panicked: {0}")]
    Panicked(String),
}

/// Why a message was not handled now, through no fault of its own.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// The database failed around the handlers (begin, an inbox row, a
    /// savepoint, the commit): nothing of the batch committed.
    #[error("the database failed around the handler")]
    Database(#[source] Arc<Error>),
    /// A second copy of an event in the batch (a redelivery that came while
    /// the first is held): it waits until the first has ended.
    #[error("event {0} is in this batch already")]
    InBatch(Uuid),
    /// The batch's [`Fence`] no longer held at its commit (a consumer group
    /// member that lost the message's partition): nothing committed, and the
    /// partition's new owner handles the message.
    #[error("this consumer group member no longer owns the message's partition")]
    Fenced,
}

/// A check a batch's transaction makes just before it commits, such as a
/// consumer group's ownership of the batch's partitions
/// ([`crate::consumer::group`]). `Ok(false)` rolls the batch back, and its
/// messages are [`Unavailable::Fenced`].
pub trait Fence: Send + Sync {
    /// Whether the batch may commit, read in its transaction `txn`.
    fn holds<'a>(&'a self, txn: &'a DatabaseTransaction) -> BoxFuture<'a, Result<bool, DbErr>>;
}

/// How a batch's transaction ended, when the database did not fail.
enum Ended {
    /// Committed, or rolled back for a failed handler's sake.
    Done,
    /// Rolled back: the fence did not hold.
    Fenced,
}

/// Why no handler can take a message: its [`reason`](Self::reason) is the
/// dead letter's.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Unhandled {
    /// No handler takes the event type.
    #[error("no handler for event type `{event_type}`")]
    UnknownType {
        /// The event type the message names.
        event_type: String,
    },
    /// Handlers take the event type, but not at this version.
    #[error(
        "event `{event_type}` version {version} is not handled (handled versions: {handled:?})"
    )]
    UnsupportedVersion {
        /// The event type.
        event_type: String,
        /// The version the message names.
        version: u16,
        /// The versions handled.
        handled: Vec<u16>,
    },
    /// A handler takes it, but the registry does not know the type and
    /// version, so the payload cannot be decoded.
    #[error("event `{event_type}` version {version} is not in the registry")]
    NotRegistered {
        /// The event type.
        event_type: String,
        /// Its version.
        version: u16,
    },
    /// The payload does not decode into the event type.
    #[error("the payload does not decode")]
    Undecodable(#[source] Arc<Error>),
}

impl Unhandled {
    /// The dead letter's reason for it.
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            Self::UnknownType { .. } | Self::NotRegistered { .. } => DeadLetterReason::UnknownType,
            Self::UnsupportedVersion { .. } => DeadLetterReason::UnsupportedVersion,
            Self::Undecodable(_) => DeadLetterReason::Undecodable,
        }
    }
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
    ) -> BoxFuture<'a, Result<(), BoxError>>
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
                // The registry decoded another type for this name and
                // version: `E`'s `OutboxEvent` was not derived.
                let not_derived =
                    |_| -> BoxError { Error::NotRegistered(std::any::type_name::<E>()).into() };
                let event = event.downcast::<E>().map_err(not_derived)?;
                handler.handle(*event, meta, db).await.map_err(Into::into)
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
        // `process_batch` answers every message it is given, in order.
        processed.pop().expect("one message in, one answer out")
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
        self.process_fenced(db, consumer, messages, None).await
    }

    /// [`process_tagged`](Self::process_tagged), the transaction committing
    /// only if `fence` holds just before.
    pub async fn process_fenced<T>(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        messages: Vec<(T, Incoming<'_>)>,
        fence: Option<&dyn Fence>,
    ) -> Vec<(T, Processed)> {
        let mut ids = HashSet::with_capacity(messages.len());
        let steps: Vec<Step<T>> = (messages.into_iter())
            .map(|(tag, Incoming { meta, payload })| {
                // A second copy of one event (a redelivery that came while the
                // first is held) waits: the inbox row of the first is not
                // committed yet, and if its handler fails there is none.
                let stage = if !ids.insert(meta.id) {
                    Stage::Answered(Processed::Unavailable(Unavailable::InBatch(meta.id)))
                } else {
                    match self.decode(&meta, payload) {
                        Ok((run, event)) => Stage::Run(Decoded { run, event, meta }),
                        Err(unhandled) => Stage::Answered(Processed::Unhandled(unhandled)),
                    }
                };
                Step { tag, stage }
            })
            .collect();
        // One message needs no savepoint: its transaction is its own.
        let to_run = steps.iter().filter(|step| step.decoded().is_some());
        let mode = match to_run.count() {
            0 | 1 => Mode::Alone,
            _ => Mode::Savepoints,
        };
        let mut answers = Vec::with_capacity(steps.len());
        let mut steps = steps.into_iter();
        // What #[transactional] handlers emit in the batch's transaction.
        let written = Written::on(Database::of(db));
        let ran = self.in_transaction(db, consumer, &mut steps, &mut answers, mode, fence);
        let lost = match Written::scope(Arc::clone(&written), ran).await {
            Ok(Ended::Done) => None,
            Ok(Ended::Fenced) => Some(Unavailable::Fenced),
            Err(error) => Some(Unavailable::Database(Arc::new(error))),
        };
        if let Some(lost) = lost {
            return uncommitted(&lost, answers, steps);
        }
        // A #[transactional] handler signals at its savepoint, before its
        // events are visible: signal again now that they are, scheduled ones
        // included. A batch that emitted nothing wakes no relay.
        written.signal(written.database());
        answers
    }

    fn decode(
        &self,
        meta: &Metadata,
        payload: &[u8],
    ) -> Result<(Arc<Run>, Box<dyn Any + Send>), Unhandled> {
        let (name, version) = (meta.event_type.as_str(), meta.version);
        let Some(run) = self.by_type.get(&(name, version)) else {
            let handled: Vec<u16> = (self.by_type.keys())
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .collect();
            let event_type = name.to_owned();
            return Err(if handled.is_empty() {
                Unhandled::UnknownType { event_type }
            } else {
                Unhandled::UnsupportedVersion {
                    event_type,
                    version,
                    handled,
                }
            });
        };
        let Some(descriptor) = crate::registry().get(name, version) else {
            let event_type = name.to_owned();
            return Err(Unhandled::NotRegistered {
                event_type,
                version,
            });
        };
        let event = (descriptor.decode)(payload)
            .map_err(|error| Unhandled::Undecodable(Arc::new(error)))?;
        Ok((Arc::clone(run), event))
    }

    /// Takes the `steps` in order, answering each in `answers`, and runs
    /// those to run in one transaction, begun at the first of them; an
    /// error means nothing committed, and leaves the steps not taken yet in
    /// `steps`.
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
        fence: Option<&dyn Fence>,
    ) -> Result<Ended, Error> {
        let mut open: Option<(DatabaseTransaction, HashSet<Uuid>)> = None;
        let mut savepoint = Savepoint::new(Dialect::of(db));
        let mut failed = Vec::new();
        let mut rolled_back = false;
        // Each step is taken only once what it needs of the database is
        // done: on an error the steps not taken are answered by the caller.
        while let Some(next) = steps.as_slice().first() {
            if let Some(id) = next.decoded().map(|decoded| decoded.meta.id) {
                if open.is_none() {
                    let txn = db.begin().await?;
                    let ids: Vec<Uuid> = (steps.as_slice().iter())
                        .filter_map(|step| Some(step.decoded()?.meta.id))
                        .collect();
                    let fresh = store::record_all(&txn, consumer, &ids).await?;
                    open = Some((txn, fresh));
                }
                let fresh = open.as_ref().is_some_and(|(_, fresh)| fresh.contains(&id));
                if fresh
                    && mode == Mode::Savepoints
                    && let Some((txn, _)) = &open
                {
                    savepoint.set(txn).await?;
                }
            }
            let Some(Step { tag, stage }) = steps.next() else {
                break;
            };
            let (decoded, txn) = match (stage, &open) {
                (Stage::Run(decoded), Some((txn, fresh))) if fresh.contains(&decoded.meta.id) => {
                    (decoded, txn)
                }
                (Stage::Run(_), _) => {
                    answers.push((tag, Processed::Duplicate));
                    continue;
                }
                (Stage::Answered(answer), _) => {
                    answers.push((tag, answer));
                    continue;
                }
            };
            let Decoded { run, event, meta } = decoded;
            let id = meta.id;
            let span = tracing::debug_span!("outbox.handler", event_type = %meta.event_type, event_id = %id);
            #[cfg(feature = "opentelemetry")]
            crate::trace::set_parent(&span, &meta.headers);
            // A panicking handler is a failed delivery, not a dead consumer.
            let outcome = AssertUnwindSafe(run(event, meta, txn))
                .catch_unwind()
                .instrument(span)
                .await;
            let result = match outcome {
                Ok(result) => result.map_err(|error| HandlerFailure::Returned(Arc::from(error))),
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
                Mode::Savepoints => {
                    savepoint.roll_back(txn).await?;
                    failed.push(id);
                }
            }
        }
        let Some((txn, _)) = open else {
            return Ok(Ended::Done);
        };
        if rolled_back {
            txn.rollback().await?;
            return Ok(Ended::Done);
        }
        if !failed.is_empty() {
            store::forget(&txn, consumer, failed).await?;
        }
        if let Some(fence) = fence
            && !fence.holds(&txn).await?
        {
            txn.rollback().await?;
            return Ok(Ended::Fenced);
        }
        txn.commit().await?;
        Ok(Ended::Done)
    }
}

/// The answers of a batch whose transaction did not commit, for the reason
/// `lost`: what committed nothing is [`Processed::Unavailable`], except the
/// answers that did not depend on the transaction (a failed handler, an
/// unhandled message, a second copy). `answers` are those given before the
/// failure, `rest` the steps not taken.
fn uncommitted<T>(
    lost: &Unavailable,
    answers: Vec<(T, Processed)>,
    rest: std::vec::IntoIter<Step<T>>,
) -> Vec<(T, Processed)> {
    let lost = || Processed::Unavailable(lost.clone());
    let answers = answers.into_iter().map(|(tag, answer)| match answer {
        Processed::Handled | Processed::Duplicate => (tag, lost()),
        answer => (tag, answer),
    });
    let rest = rest.map(|Step { tag, stage }| match stage {
        Stage::Run(_) => (tag, lost()),
        Stage::Answered(answer) => (tag, answer),
    });
    answers.chain(rest).collect()
}

/// How a batch's handlers share its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One message (or none) to run: its failure rolls the transaction back.
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
