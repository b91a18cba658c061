//! Opening the database: the relay waits for it as it waits for NATS;
//! every other command is a probe or a one-off and fails fast. Either way
//! the error names the server and the cause (never the password): the
//! pool's own "pool timed out" would hide a refused connection.

use std::time::Duration;

use outbox_core::Backoff;
use sea_orm::sqlx::Error as SqlxError;
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, RuntimeErr};

/// How long one attempt waits for a connection.
const ATTEMPT: Duration = Duration::from_secs(5);

/// The relay's delays between attempts while the database is unreachable.
const WAITING: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(10),
};

/// Whether to wait for an unreachable database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Patience {
    /// Retry with backoff until it answers (the relay).
    Wait,
    /// Fail after one attempt (status, migrate, dead letters).
    Probe,
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// No connection within the attempt's time; `cause` is what connecting
    /// to the server's address said.
    #[error("cannot reach the database at {server}: {cause}")]
    Unreachable {
        /// `host:port`, without credentials.
        server: String,
        /// What a plain TCP connection to it said, or the pool's timeout.
        cause: String,
    },
    /// The server answered and refused (credentials, a missing database).
    #[error("cannot open the database at {server}")]
    Refused {
        /// `host:port`, without credentials.
        server: String,
        /// What the database said.
        #[source]
        source: DbErr,
    },
}

/// Opens `url`, waiting for it while it is unreachable if `patience` says so.
pub(crate) async fn open(url: &str, patience: Patience) -> Result<DatabaseConnection, OpenError> {
    let server = server(url);
    let mut failures = 0;
    loop {
        let mut options = ConnectOptions::new(url);
        options.connect_timeout(ATTEMPT).acquire_timeout(ATTEMPT);
        let error = match Database::connect(options).await {
            Ok(db) => {
                if failures > 0 {
                    tracing::info!(database = %server, attempts = failures + 1, "connected to the database");
                }
                return Ok(db);
            }
            Err(error) if !is_unreachable(&error) => {
                return Err(OpenError::Refused {
                    server,
                    source: error,
                });
            }
            Err(_) => OpenError::Unreachable {
                cause: cause(&server).await,
                server: server.clone(),
            },
        };
        if patience == Patience::Probe {
            return Err(error);
        }
        failures += 1;
        let delay = WAITING.delay(failures);
        let error = outbox_core::ErrorReport(&error);
        if failures == 1 {
            tracing::warn!(%error, "the database is unreachable; retrying until it is");
        } else {
            tracing::debug!(%error, retry_in = ?delay, "the database is still unreachable");
        }
        tokio::time::sleep(delay).await;
    }
}

/// A connection error that may pass: no server answered in time.
fn is_unreachable(error: &DbErr) -> bool {
    match error {
        DbErr::Conn(RuntimeErr::SqlxError(error)) => {
            matches!(**error, SqlxError::PoolTimedOut | SqlxError::Io(_))
        }
        _ => false,
    }
}

/// The server of `url` as `host:port`, or the URL's scheme alone (SQLite,
/// or a URL that does not parse): never its user or password.
fn server(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => format!("{host}:{}", default_port(parsed.scheme())),
            (None, _) => format!("{}://", parsed.scheme()),
        },
        Err(_) => "the --database-url".to_owned(),
    }
}

fn default_port(scheme: &str) -> u16 {
    match scheme {
        "mysql" | "mariadb" => 3306,
        _ => 5432,
    }
}

/// What a plain TCP connection to `server` says: the cause the pool's
/// timeout hides (refused, no route, a name that does not resolve).
async fn cause(server: &str) -> String {
    match tokio::time::timeout(ATTEMPT, tokio::net::TcpStream::connect(server)).await {
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {ATTEMPT:?}"),
        Ok(Ok(_)) => {
            format!("the server took connections but gave the pool none within {ATTEMPT:?}")
        }
    }
}
