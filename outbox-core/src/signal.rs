//! Wakes relays in this process when a transaction with events commits.
//!
//! Each database has a channel of its own, so that a commit wakes the
//! relays of its database and not those of another the process also serves.
//! Where the database of a connection cannot be told (its driver's feature
//! is off, or a function is generic over its connection), a commit wakes
//! every relay, and such a relay wakes on every commit: a wasted claim, not
//! a lost event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use sea_orm::DatabaseConnection;
use tokio::sync::watch;

/// Which database a connection pool writes to: the backend plus the host,
/// port and database name (or socket) of a PostgreSQL or MySQL pool, the file
/// of a SQLite one. Never the user name or the password.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Database(String);

impl Database {
    /// The database of `db`, if its driver's feature (`postgres`, `mysql`,
    /// `sqlite`) is on.
    pub fn of(db: &DatabaseConnection) -> Option<Self> {
        match &db.inner {
            #[cfg(feature = "postgres")]
            sea_orm::DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
                let options = db.get_postgres_connection_pool().connect_options();
                let at = options.get_socket().map_or_else(
                    || format!("{}:{}", options.get_host(), options.get_port()),
                    |socket| format!("{}:{}", socket.display(), options.get_port()),
                );
                Some(Self(format!(
                    "postgres://{at}/{}",
                    options.get_database().unwrap_or_default()
                )))
            }
            #[cfg(feature = "mysql")]
            sea_orm::DatabaseConnectionType::SqlxMySqlPoolConnection(_) => {
                let options = db.get_mysql_connection_pool().connect_options();
                let at = options.get_socket().map_or_else(
                    || format!("{}:{}", options.get_host(), options.get_port()),
                    |socket| socket.display().to_string(),
                );
                Some(Self(format!(
                    "mysql://{at}/{}",
                    options.get_database().unwrap_or_default()
                )))
            }
            #[cfg(feature = "sqlite")]
            sea_orm::DatabaseConnectionType::SqlxSqlitePoolConnection(_) => {
                let options = db.get_sqlite_connection_pool().connect_options();
                Some(Self(format!(
                    "sqlite://{}",
                    options.get_filename().display()
                )))
            }
            _ => None,
        }
    }
}

/// What a channel has counted: commits that wrote events, and of them those
/// that wrote scheduled events, which may come due before the relay's next
/// look at them.
#[derive(Debug, Clone, Copy, Default)]
struct Stamp {
    commits: u64,
    scheduled: u64,
}

impl Stamp {
    fn count(&mut self, scheduled: bool) {
        self.commits = self.commits.wrapping_add(1);
        self.scheduled = self.scheduled.wrapping_add(u64::from(scheduled));
    }
}

/// The process's channels: one counting every commit, and one per database a
/// relay has subscribed to. A process serves a handful of databases, so the
/// map is never pruned.
#[derive(Default)]
struct Channels {
    every: watch::Sender<Stamp>,
    databases: Mutex<HashMap<Database, watch::Sender<Stamp>>>,
}

static CHANNELS: LazyLock<Channels> = LazyLock::new(Channels::default);

impl Channels {
    fn databases(&self) -> std::sync::MutexGuard<'_, HashMap<Database, watch::Sender<Stamp>>> {
        // The map holds no invariant a panicking holder could break.
        self.databases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a commit on `database` (on an unknown one: on every database).
    fn count(&self, database: Option<&Database>, scheduled: bool) {
        self.every.send_modify(|stamp| stamp.count(scheduled));
        let databases = self.databases();
        let mut count =
            |channel: &watch::Sender<Stamp>| channel.send_modify(|stamp| stamp.count(scheduled));
        match database {
            Some(database) => databases.get(database).into_iter().for_each(&mut count),
            None => databases.values().for_each(count),
        }
    }
}

/// What the commits of one task's transaction, and of the calls nested in
/// it, wrote: carried by the task (`task_local`), so that the outermost
/// commit knows, without guessing from the process's counters, whether a
/// nested `#[transactional]` call emitted anything. A nested call's events
/// become visible only when the transaction around it commits.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// The database of the connection the outermost transaction began on.
    database: Option<Database>,
    events: AtomicBool,
    scheduled: AtomicBool,
}

tokio::task_local! {
    static WRITTEN: Arc<Written>;
}

impl Written {
    /// A record for a transaction on `database`.
    pub(crate) fn on(database: Option<Database>) -> Arc<Self> {
        Arc::new(Self {
            database,
            ..Self::default()
        })
    }

    /// The record of the transaction this task is in, if a `#[transactional]`
    /// call or the inbox opened one, or a new one on `database`.
    pub(crate) fn current_or(database: Option<Database>) -> Arc<Self> {
        WRITTEN
            .try_with(Arc::clone)
            .unwrap_or_else(|_| Self::on(database))
    }

    /// The database of the outermost transaction, if known.
    pub(crate) fn database(&self) -> Option<&Database> {
        self.database.as_ref()
    }

    /// Runs `body` with `record` as its task's record.
    pub(crate) async fn scope<F: Future>(record: Arc<Self>, body: F) -> F::Output {
        WRITTEN.scope(record, body).await
    }

    /// Notes a commit (or a savepoint's release) that wrote events.
    pub(crate) fn note(&self, events: bool, scheduled: bool) {
        self.events.fetch_or(events || scheduled, Ordering::Relaxed);
        self.scheduled.fetch_or(scheduled, Ordering::Relaxed);
    }

    /// Wakes the relays of `database` (of every database, if unknown) if
    /// anything was written, by this transaction or in it.
    pub(crate) fn signal(&self, database: Option<&Database>) {
        if self.events.load(Ordering::Relaxed) {
            CHANNELS.count(database, self.scheduled.load(Ordering::Relaxed));
        }
    }
}

/// Wakes every relay of this process, as the commit of a `#[transactional]`
/// function that emitted events does for the relays of its database.
///
/// Call it after committing a transaction yourself in which a
/// `#[transactional]` function emitted events (called with your transaction,
/// it runs in a savepoint, whose release wakes relays before the events are
/// visible). Without it those events wait for the relays' next poll. Waking
/// relays with nothing to do costs each one an empty claim.
pub fn wake_relays() {
    CHANNELS.count(None, true);
}

/// A subscription to commits of outbox events made in this process.
///
/// A relay waits on it instead of polling, so events leave the outbox as soon
/// as their transaction commits.
#[derive(Debug)]
pub struct CommitSignal(watch::Receiver<Stamp>);

impl CommitSignal {
    /// Subscribes to every commit; commits made before this call are not
    /// reported.
    pub fn subscribe() -> Self {
        Self(CHANNELS.every.subscribe())
    }

    /// Subscribes to the commits on `db`'s database, and to those on
    /// connections whose database cannot be told (see [`wake_relays`]). Where
    /// `db`'s own database cannot be told, this is [`subscribe`](Self::subscribe).
    pub fn to(db: &DatabaseConnection) -> Self {
        match Database::of(db) {
            Some(database) => Self(
                CHANNELS
                    .databases()
                    .entry(database)
                    .or_default()
                    .subscribe(),
            ),
            None => Self::subscribe(),
        }
    }

    /// Resolves once a commit with events has happened since the last call
    /// (or since [`subscribe`](Self::subscribe)).
    pub async fn committed(&mut self) {
        // The senders live in a static and are never dropped, so this cannot fail.
        let _ = self.0.changed().await;
    }

    /// How many commits with scheduled events this subscription has counted
    /// up to now: a change means scheduled events may come due sooner than
    /// the relay last learnt.
    pub(crate) fn scheduled(&self) -> u64 {
        self.0.borrow().scheduled
    }
}

/// Tells the macro-generated code which database a connection writes to, by
/// autoref specialisation: `(&Probe(&conn)).database()` resolves to
/// [`KnownConnection`] for a `DatabaseConnection` and to [`AnyConnection`]
/// (unknown) for every other type, a generic one included.
#[doc(hidden)]
pub struct Probe<'a, C>(pub &'a C);

impl<C> std::fmt::Debug for Probe<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

#[doc(hidden)]
pub trait KnownConnection {
    fn database(&self) -> Option<Database>;
}

impl KnownConnection for Probe<'_, DatabaseConnection> {
    fn database(&self) -> Option<Database> {
        Database::of(self.0)
    }
}

impl KnownConnection for Probe<'_, &DatabaseConnection> {
    fn database(&self) -> Option<Database> {
        Database::of(self.0)
    }
}

#[doc(hidden)]
pub trait AnyConnection {
    fn database(&self) -> Option<Database> {
        None
    }
}

impl<C> AnyConnection for &Probe<'_, C> {}
