//! The logical relay (feature `logical`, PostgreSQL 14 or newer): reads
//! committed events from the write-ahead log through a logical replication
//! slot instead of polling `outbox_messages`.
//!
//! ```no_run
//! # async fn run<P: outbox_core::relay::Publisher>(db: sea_orm::DatabaseConnection, publisher: P, url: &str)
//! # -> Result<(), outbox_core::relay::logical::LogicalError> {
//! use outbox_core::relay::{Relay, logical::LogicalRelay};
//!
//! let relay = Relay::builder(db, publisher).batch_size(2_000).build();
//! let handle = LogicalRelay::new(relay, url)?.spawn(); // url: the database's, with a REPLICATION role
//! // ... serve ...
//! handle.shutdown().await.ok();
//! # Ok(()) }
//! ```
//!
//! - **Writing.** The relay installs a trigger (`capture`) that turns every
//!   row inserted into `outbox_messages` into a transactional logical
//!   message: `emit!` does not change, and no row is written, so there is
//!   nothing to claim, settle or vacuum, whatever the backlog.
//! - **Order.** The slot hands transactions over in commit order; each
//!   key's events reach the stream in that order (a rejected event holds
//!   back only its key's later events, as in the polling relay).
//! - **Progress.** The slot's position is confirmed only past transactions
//!   whose events JetStream stored (or that were dead-lettered), and the
//!   same position is recorded in `outbox_logical_progress`. A restart
//!   resumes from the slot's position; what it resends up to the recorded
//!   one is skipped, so that a relay down for longer than JetStream's
//!   duplicate window, or a PostgreSQL crash that took the slot's position
//!   back to its last checkpoint, does not publish again what was stored.
//! - **One reader.** The replication connection holds the slot; another
//!   relay on the same slot stands by and takes over when it is free.
//! - **Idle.** A heartbeat message every [`heartbeat`](LogicalRelay::heartbeat)
//!   moves the slot on, so that an idle database retains no WAL for it.
//! - **Everything else** of the polling relay still runs beside the slot:
//!   scheduled events coming due are inserted into the outbox (and so
//!   captured), and rows already in the table (written before the trigger,
//!   or after [`retire`] removed it) are drained before the slot is read.
//!
//! The polling relay stays the default, and the only one on MySQL and
//! SQLite. Run one kind of relay per outbox.

mod pending;
mod reader;
mod slot;

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationConfig};
use sea_orm::DbErr;

pub use slot::{SlotStatus, slot_status, slots};

use super::publish::Publisher;
use super::{Relay, worker::RelayHandle};
use crate::background::Background;

/// Why the logical relay cannot run, each naming its fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogicalError {
    /// The database is not PostgreSQL.
    #[error("the logical relay needs PostgreSQL; on MySQL and SQLite run the polling relay")]
    NotPostgres,
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is {found:?}: the logical relay needs `wal_level = logical` \
         (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
    )]
    WalLevel {
        /// The server's setting.
        found: String,
    },
    /// The role may not open replication connections.
    #[error(
        "role {role:?} lacks REPLICATION: ALTER ROLE {role} REPLICATION, or connect as a role that has it"
    )]
    NoReplication {
        /// The connection's role.
        role: String,
    },
    /// The server predates logical messages in `pgoutput`.
    #[error("PostgreSQL {version} is too old for the logical relay: it needs 14 or newer")]
    ServerTooOld {
        /// `server_version_num`.
        version: i32,
    },
    /// The connection URL cannot be used for the replication connection.
    #[error("invalid PostgreSQL URL for the replication connection: {0}")]
    Url(String),
    /// The slot name is not a plain lower-case identifier.
    #[error("invalid slot name {0:?}: use lower-case letters, digits and underscores, at most 63")]
    SlotName(String),
    /// Another relay reads the slot.
    #[error("the replication slot {0:?} is in use by another relay; stop it first")]
    SlotInUse(String),
    /// The database failed.
    #[error("database error")]
    Database(#[from] DbErr),
    /// Draining the rows in `outbox_messages` (written while the capture
    /// trigger was not installed) failed.
    #[error("draining the outbox table failed")]
    Drain(#[source] Box<crate::Error>),
    /// The replication connection failed.
    #[error("replication connection failed")]
    Replication(#[from] PgWireError),
}

/// A relay that reads the write-ahead log; see the [module](self) docs.
pub struct LogicalRelay<P> {
    relay: Relay<P>,
    connection: ReplicationConfig,
    slot: Option<String>,
    heartbeat: Duration,
    standby_poll: Duration,
}

/// The replication connection shows without its password.
impl<P: std::fmt::Debug> std::fmt::Debug for LogicalRelay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalRelay")
            .field("relay", &self.relay)
            .field("connection", &self.connection.display_connection())
            .field("slot", &self.slot)
            .field("heartbeat", &self.heartbeat)
            .field("standby_poll", &self.standby_poll)
            .finish()
    }
}

impl<P: Publisher> LogicalRelay<P> {
    /// A logical relay publishing through `relay`'s publisher with its
    /// settings (batch size, retries, dead letters); `url` is the
    /// database's PostgreSQL URL, for the replication connection (its role
    /// needs `REPLICATION`).
    ///
    /// Fails with [`LogicalError::Url`] when `url` is not a
    /// `postgres://` URL; the password never appears in the error.
    pub fn new(relay: Relay<P>, url: &str) -> Result<Self, LogicalError> {
        Ok(Self {
            relay,
            connection: connection(url)?,
            slot: None,
            heartbeat: Duration::from_secs(10),
            standby_poll: Duration::from_secs(1),
        })
    }

    /// The replication slot to read (default `outbox_<schema>`, from the
    /// connection's schema). Its publication has the same name.
    pub fn slot(mut self, name: impl Into<String>) -> Self {
        self.slot = Some(name.into());
        self
    }

    /// How often to write a heartbeat (default 10 s): the longest an idle
    /// database keeps WAL for the slot, and how stale `outbox status`'s
    /// slot lag may read.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval.max(Duration::from_millis(100));
        self
    }

    /// How often a relay standing by tries the slot (default 1 s): the
    /// longest a takeover waits after the reading relay died.
    pub fn standby_poll(mut self, interval: Duration) -> Self {
        self.standby_poll = interval.max(Duration::from_millis(50));
        self
    }

    /// Runs the relay in a background task until [`RelayHandle::shutdown`]:
    /// it creates the slot if needed, stands by while another relay reads
    /// it, and backs off while the database or broker is down.
    pub fn spawn(self) -> RelayHandle {
        RelayHandle(Background::spawn(|stopped| reader::run(self, stopped)))
    }
}

/// The slot's name: given, or `outbox_<schema>`.
async fn slot_name<P>(relay: &LogicalRelay<P>) -> Result<String, LogicalError> {
    let name = match &relay.slot {
        Some(name) => name.clone(),
        None => slot::default_name(&slot::schema(relay.relay.store.db()).await?),
    };
    if slot::valid_name(&name) {
        Ok(name)
    } else {
        Err(LogicalError::SlotName(name))
    }
}

/// Stops capturing events into the slot and drops it, losing nothing: the
/// capture trigger goes first (new events are rows for a polling relay
/// again), then what the slot still holds is published through `relay`,
/// then the slot, its publication and its progress row are dropped.
///
/// Fails with [`LogicalError::SlotInUse`] while a logical relay reads the
/// slot: stop them first.
pub async fn retire<P: Publisher>(relay: LogicalRelay<P>) -> Result<(), LogicalError> {
    reader::retire(relay).await
}

/// The replication connection's settings from a `postgres://` URL.
fn connection(url: &str) -> Result<ReplicationConfig, LogicalError> {
    let parsed = url::Url::parse(url).map_err(|e| LogicalError::Url(e.to_string()))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(LogicalError::Url(format!(
            "scheme {:?} is not postgres",
            parsed.scheme()
        )));
    }
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    // Never a plain connection where the URL asks for TLS.
    if let Some((_, mode)) = parsed.query_pairs().find(|(key, _)| key == "sslmode")
        && !matches!(&*mode, "disable" | "allow" | "prefer")
    {
        return Err(LogicalError::Url(format!(
            "sslmode={mode}: the replication connection has no TLS yet; \
             use sslmode=disable or prefer (a private network), or the polling relay"
        )));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| LogicalError::Url("no host".into()))?;
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        user => decode(user),
    };
    let password = parsed.password().map(decode).unwrap_or_default();
    let database = match parsed.path().trim_start_matches('/') {
        "" => user.clone(),
        database => decode(database),
    };
    // Slot and publication are set per session, once the slot's name is known.
    Ok(
        ReplicationConfig::new(host, user, password, database, "", "")
            .with_port(parsed.port().unwrap_or(5432))
            .with_status_interval(Duration::from_millis(500))
            .with_wakeup_interval(Duration::from_secs(1))
            .with_application_name("outbox-logical-relay"),
    )
}

#[cfg(test)]
mod tests {
    use super::{LogicalError, connection};

    #[test]
    fn the_replication_connection_comes_from_the_url() {
        let config = connection("postgres://app%40eu:p%2Fw@db.example:6432/shop?sslmode=disable")
            .expect("a valid URL");
        assert_eq!((config.host.as_str(), config.port), ("db.example", 6432));
        assert_eq!(
            (config.user.as_str(), config.password.as_str()),
            ("app@eu", "p/w")
        );
        assert_eq!(config.database, "shop");
    }

    #[test]
    fn a_url_that_asks_for_tls_is_refused_rather_than_connected_in_plain() {
        let error = connection("postgres://app:pw@db/shop?sslmode=require").expect_err("no TLS");
        assert!(error.to_string().contains("sslmode=require"), "{error}");
        assert!(connection("postgres://app:pw@db/shop?sslmode=prefer").is_ok());
    }

    #[test]
    fn a_bad_url_is_an_error_without_its_password() {
        let error = connection("mysql://root:hunter2@db/shop").expect_err("not PostgreSQL");
        assert!(matches!(error, LogicalError::Url(_)));
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }
}
