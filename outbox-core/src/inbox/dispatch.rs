//! The dispatch table of a consumer, and the transaction each message is handled in.

use std::any::Any;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, TransactionTrait,
};
use tracing::Instrument;
use uuid::Uuid;

use super::{DeadLetterReason, Handler, Metadata, store};
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
        let mut answers = Vec::with_capacity(messages.len());
        let mut decoded = Vec::with_capacity(messages.len());
        let mut ids = HashSet::with_capacity(messages.len());
        for Incoming { meta, payload } in messages {
            // A second copy of one event (a redelivery that came while the
            // first is held) waits: the inbox row of the first is not
            // committed yet, and if its handler fails there is none.
            if !ids.insert(meta.id) {
                let error = format!("event {} is in this batch already", meta.id);
                answers.push(Processed::Unavailable(error));
                continue;
            }
            match self.decode(&meta, payload) {
                Ok((run, event)) => {
                    answers.push(Processed::Unavailable(String::new()));
                    decoded.push(Decoded {
                        index: answers.len() - 1,
                        run,
                        event,
                        meta,
                    });
                }
                Err(unhandled) => answers.push(unhandled),
            }
        }
        let counts_before = signal::Counts::now();
        // One message needs no savepoint: its transaction is its own.
        let mode = match decoded.len() {
            0 => return answers,
            1 => Mode::Alone,
            _ => Mode::Savepoints,
        };
        let ran = (self.in_transaction(db, consumer, decoded, &mut answers, mode)).await;
        if let Err(error) = ran {
            let error = crate::ErrorReport(&error).to_string();
            for answer in &mut answers {
                if matches!(answer, Processed::Handled | Processed::Duplicate) {
                    *answer = Processed::Unavailable(error.clone());
                } else if let Processed::Unavailable(reason) = answer {
                    reason.clone_from(&error);
                }
            }
            return answers;
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

    /// Runs `decoded` in one transaction, writing each one's answer; an
    /// error means nothing committed.
    ///
    /// The inbox rows go in first, in one statement where the database
    /// allows. Each handler then runs in the savepoint `outbox_message`,
    /// released and set again in one round trip before the next handler; a
    /// failing handler is rolled back to it, and its inbox row removed before
    /// the commit. (SeaORM's nested transactions would cost each message two
    /// more round trips; a `#[transactional]` handler still takes one of its
    /// own inside, which the rollback to `outbox_message` undoes as well.)
    async fn in_transaction(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        decoded: Vec<Decoded>,
        answers: &mut [Processed],
        mode: Mode,
    ) -> Result<(), Error> {
        let txn = db.begin().await?;
        let ids: Vec<Uuid> = decoded.iter().map(|d| d.meta.id).collect();
        let fresh = store::record_all(&txn, consumer, &ids).await?;
        let mut savepoint = Savepoint::new(txn.get_database_backend());
        let mut failed = Vec::new();
        for Decoded {
            index,
            run,
            event,
            meta,
        } in decoded
        {
            if !fresh.contains(&meta.id) {
                answers[index] = Processed::Duplicate;
                continue;
            }
            if mode == Mode::Savepoints {
                savepoint.set(&txn).await?;
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
            answers[index] = match result {
                Ok(()) => Processed::Handled,
                Err(failure) if mode == Mode::Alone => {
                    txn.rollback().await?;
                    answers[index] = Processed::Failed(failure);
                    return Ok(());
                }
                Err(failure) => {
                    savepoint.roll_back(&txn).await?;
                    failed.push(id);
                    Processed::Failed(failure)
                }
            };
        }
        if !failed.is_empty() {
            store::forget(&txn, consumer, failed).await?;
        }
        txn.commit().await?;
        Ok(())
    }
}

/// How a batch's handlers share its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One message: its failure rolls the transaction back.
    Alone,
    /// Each in a savepoint: a failure rolls back that handler's effect only.
    Savepoints,
}

/// The one savepoint of a batch, set before each handler.
struct Savepoint {
    /// Whether RELEASE and SAVEPOINT may go as one query (not on MySQL,
    /// whose driver sends one statement at a time).
    together: bool,
    set: bool,
}

impl Savepoint {
    fn new(backend: DbBackend) -> Self {
        Self {
            together: backend != DbBackend::MySql,
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

/// A message whose handler was found and whose payload decoded, with where
/// its answer goes.
struct Decoded {
    index: usize,
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
