//! Connecting to NATS: a server list, and a first connection that waits for
//! the servers instead of failing while they are down.

use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use outbox_core::relay::Backoff;

/// Pauses between attempts at the first connection.
const FIRST_CONNECTION: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(10),
};

/// Why no connection to NATS could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// An entry of the server list is not a NATS address.
    #[error("`{entry}` in the NATS server list is not a server address")]
    InvalidServer {
        /// The entry, as given.
        entry: String,
        /// Why it does not parse.
        #[source]
        source: std::io::Error,
    },
    /// The server list holds no address.
    #[error("the NATS server list is empty")]
    NoServers,
    /// The server list has an empty entry (two commas in a row, say).
    #[error("the NATS server list `{0}` has an empty entry")]
    EmptyEntry(String),
    /// The servers answered, but refused the connection (authentication,
    /// TLS): retrying would not help.
    #[error("NATS refused the connection")]
    Refused(#[source] async_nats::ConnectError),
}

/// Parses a comma-separated list of NATS servers (`nats://a:4222,b:4222`;
/// the scheme and port are optional).
///
/// ```
/// let servers = outbox_nats::parse_servers("127.0.0.1:4222, nats://10.0.0.2:4222").unwrap();
/// assert_eq!(servers.len(), 2);
/// assert!(outbox_nats::parse_servers("127.0.0.1:4222,,").is_err());
/// assert!(outbox_nats::parse_servers("").is_err());
/// ```
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let servers = (list.split(','))
        .map(str::trim)
        .map(|entry| {
            if entry.is_empty() {
                return Err(ConnectError::EmptyEntry(list.to_owned()));
            }
            entry
                .parse::<ServerAddr>()
                .map_err(|source| ConnectError::InvalidServer {
                    entry: entry.to_owned(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(servers)
}

/// Connects to any of `servers` with the options `options` makes, retrying
/// with backoff (100 ms doubling to 10 s) for as long as none is reachable,
/// so that a relay or consumer started before NATS waits for it. Errors that
/// a retry cannot fix (authentication, TLS) end it at once. Once connected,
/// the client reconnects by itself after outages.
///
/// ```no_run
/// # async fn run() -> Result<(), outbox_nats::ConnectError> {
/// let servers = outbox_nats::parse_servers("nats://a:4222,nats://b:4222")?;
/// let client = outbox_nats::connect(&servers, async_nats::ConnectOptions::new).await?;
/// # Ok(()) }
/// ```
pub async fn connect(
    servers: &[ServerAddr],
    options: impl Fn() -> ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    if servers.is_empty() {
        return Err(ConnectError::NoServers);
    }
    let mut failures = 0;
    loop {
        match options().connect(servers).await {
            Ok(client) => {
                if failures > 0 {
                    tracing::info!(attempts = failures + 1, "connected to NATS");
                }
                return Ok(client);
            }
            Err(error)
                if matches!(
                    error.kind(),
                    ConnectErrorKind::Io | ConnectErrorKind::TimedOut | ConnectErrorKind::Dns
                ) =>
            {
                failures += 1;
                let delay = FIRST_CONNECTION.delay(failures);
                if failures == 1 {
                    tracing::warn!(%error, "NATS is unreachable; retrying until it is");
                } else {
                    tracing::debug!(%error, retry_in = ?delay, "NATS still unreachable");
                }
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(ConnectError::Refused(error)),
        }
    }
}
