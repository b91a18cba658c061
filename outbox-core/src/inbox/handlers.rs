//! The dispatch table of a consumer, and the transaction each message is handled in.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};

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
    /// The handler returned an error, kept as its text (handlers' error
    /// types only promise `Display`).
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
                handler
                    .handle(*event, meta, db)
                    .await
                    .map_err(|e| e.to_string())
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
        let (run, event) = match self.decode(&meta, payload) {
            Ok(found) => found,
            Err(unhandled) => return unhandled,
        };
        match self.in_transaction(db, consumer, run, event, meta).await {
            Ok(processed) => processed,
            Err(error) => Processed::Unavailable(crate::ErrorReport(&error).to_string()),
        }
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

    async fn in_transaction(
        &self,
        db: &DatabaseConnection,
        consumer: &str,
        run: Arc<Run>,
        event: Box<dyn Any + Send>,
        meta: Metadata,
    ) -> Result<Processed, Error> {
        let txn = db.begin().await?;
        if !store::record(&txn, consumer, meta.id).await? {
            txn.rollback().await?;
            return Ok(Processed::Duplicate);
        }
        let commits_before = signal::count();
        // A panicking handler is a failed delivery, not a dead consumer; the
        // transaction is dropped with the unwound future, which rolls it back.
        let outcome = AssertUnwindSafe(run(event, meta, &txn))
            .catch_unwind()
            .await;
        let result = match outcome {
            Ok(result) => result.map_err(HandlerFailure::Returned),
            Err(panic) => Err(HandlerFailure::Panicked(panic_message(&*panic))),
        };
        match result {
            Ok(()) => {
                txn.commit().await?;
                // A #[transactional] handler signals at its savepoint, before
                // its events are visible: signal again now that they are. A
                // handler that emitted nothing wakes no relay (a concurrent
                // one's events may cause a spare wake-up, which is harmless).
                if signal::count() != commits_before {
                    signal::committed();
                }
                Ok(Processed::Handled)
            }
            Err(error) => {
                txn.rollback().await?;
                Ok(Processed::Failed(error))
            }
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload");
    text.to_owned()
}
