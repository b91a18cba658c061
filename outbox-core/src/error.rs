//! The one error type of the framework.

use sea_orm::DbErr;

/// Everything that can go wrong in the outbox runtime.
///
/// A `#[transactional]` function returns `Result<T, E>` with
/// `E: From<outbox_core::Error>`, so these errors surface as the caller's own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database refused a statement, or the connection failed.
    ///
    /// Its text carries the database's own words: it is what a handler's
    /// failure leaves in logs and dead letters.
    #[error("database error: {0}")]
    Database(#[from] DbErr),

    /// The outbox's tables are not in the database (or not in the
    /// connection's schema).
    #[error(
        "the outbox tables are missing ({}): create them with `outbox migrate`, \
         `outbox_core::migrate(&db)`, or your own migrator holding `outbox_core::migrations()`",
        tables.join(", ")
    )]
    MissingTables {
        /// The tables not found.
        tables: Vec<&'static str>,
    },

    /// An event's payload could not be serialized; the transaction was rolled back.
    #[error("cannot serialize event `{event_type}`")]
    Serialize {
        /// The event type (`#[outbox(name = ...)]`).
        event_type: &'static str,
        /// What the serializer reported.
        #[source]
        source: serde_json::Error,
    },

    /// A routing-key placeholder produced a value that is not a valid NATS subject token.
    #[error(
        "invalid subject for event `{event_type}`: placeholder `{{{field}}}` became {value:?}, \
         which {reason}; subject tokens must be non-empty and hold no '.', '*', '>' or whitespace"
    )]
    Subject {
        /// The event type (`#[outbox(name = ...)]`).
        event_type: &'static str,
        /// The placeholder's field.
        field: &'static str,
        /// The value the field rendered to.
        value: String,
        /// Why the value is rejected.
        reason: &'static str,
    },

    /// A partition key holds a line break, which message headers cannot
    /// carry (the relay sends the key as `Outbox-Partition-Key`).
    #[error(
        "invalid partition key for event `{event_type}`: {value:?} holds a line break \
         (CR or LF), which a message header cannot carry"
    )]
    PartitionKey {
        /// The event type (`#[outbox(name = ...)]`).
        event_type: &'static str,
        /// The key the event gave.
        value: String,
    },

    /// `emit!(event, after = ...)` named a delay past the end of time as
    /// chrono counts it (about 262,000 years); nothing was committed.
    #[error("cannot schedule event `{event_type}` {after:?} from now: the time is out of range")]
    ScheduleOutOfRange {
        /// The event type (`#[outbox(name = ...)]`).
        event_type: &'static str,
        /// The delay given.
        after: std::time::Duration,
    },

    /// A header given to `emit!(event, headers = ...)` cannot travel with the
    /// event's message (its value is not shown: it may be a secret);
    /// nothing was committed.
    #[error("invalid header {name:?} on event `{event_type}`: {reason}")]
    Header {
        /// The event type (`#[outbox(name = ...)]`).
        event_type: &'static str,
        /// The header's name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A payload received for an event type could not be decoded.
    #[error("cannot decode event `{event_type}` version {version}")]
    Decode {
        /// The event type named by the message.
        event_type: String,
        /// The schema version named by the message.
        version: u16,
        /// What the deserializer reported.
        #[source]
        source: serde_json::Error,
    },

    /// No event of a batch reached the broker: it is down or not answering.
    #[error("broker unavailable")]
    BrokerUnavailable(#[source] crate::relay::DeliveryError),

    /// The event registry holds conflicting registrations.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),

    /// A Rust type's event types are not in the registry, or decode into
    /// another type: its `OutboxEvent` implementation was not derived.
    #[error("`{0}` is not in the event registry")]
    NotRegistered(&'static str),

    /// Events were still in the outbox when a test stopped waiting for them.
    #[cfg(feature = "testing")]
    #[error(transparent)]
    NotRelayed(#[from] crate::testing::NotRelayed),
}

impl Error {
    /// Whether the database broke a lock conflict by failing this
    /// transaction (a deadlock, a serialization failure, a lock wait that
    /// timed out; SQLite's "database is locked"): nothing is wrong, and the
    /// same work tried again at once normally succeeds.
    ///
    /// Read from the driver's message, the one place SeaORM leaves the
    /// SQLSTATE without a driver feature of ours: MySQL's `1213 (40001)`
    /// and `1205`, PostgreSQL's "deadlock detected" (40P01) and "could not
    /// serialize access" (40001).
    pub fn is_lock_conflict(&self) -> bool {
        let Error::Database(error) = self else {
            return false;
        };
        let text = error.to_string();
        [
            "(40001)",
            "1213 (",
            "1205 (",
            "deadlock detected",
            "could not serialize access",
        ]
        .iter()
        .any(|mark| text.contains(mark))
            || text.contains("database is locked")
    }
}

/// Any error, with its chain of causes: what a handler or a transport may
/// fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `Result` with the framework's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Displays an error with its chain of causes, `error: cause: cause`, for log
/// lines and a program's last words (`Debug` would print the structure).
///
/// A cause whose text the message before it already ends with is not
/// repeated: some libraries (SeaORM's `DbErr`, say) print their cause in
/// their own message and also return it as `source()`.
///
/// ```
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot connect to NATS")]
/// struct Connect(#[source] std::io::Error);
///
/// let error = Connect(std::io::Error::other("connection refused"));
/// let report = outbox_core::ErrorReport(&error).to_string();
/// assert_eq!(report, "cannot connect to NATS: connection refused");
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("query failed: {0}")]
/// struct Query(#[source] std::io::Error);
///
/// let error = Query(std::io::Error::other("relation does not exist"));
/// let report = outbox_core::ErrorReport(&error).to_string();
/// assert_eq!(report, "query failed: relation does not exist");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorReport<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorReport<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut message = self.0.to_string();
        f.write_str(&message)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !message.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            message = text;
            cause = error.source();
        }
        Ok(())
    }
}
