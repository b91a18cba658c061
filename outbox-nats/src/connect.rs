//! Connecting to NATS: a server list, credentials, TLS, and a first
//! connection that waits for the servers instead of failing while they are
//! down.
//!
//! Secrets (an NKey seed, a password, a token, a password inside a server
//! URL) never reach a log line or an error message: [`Secret`] prints as
//! `***`, and a server list is only ever shown with its passwords masked.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use outbox_core::Backoff;

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
        /// The entry, as given, with any password masked.
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
    /// The credentials file cannot be read or holds no JWT and seed.
    #[error("cannot use the NATS credentials file `{}`", path.display())]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why: missing, unreadable, or malformed.
        #[source]
        source: std::io::Error,
    },
    /// The NKey seed is not one.
    #[error("the NATS NKey seed is not a valid user seed")]
    NKey(#[source] nkeys::error::Error),
    /// The servers answered, but refused the connection (authentication,
    /// TLS): retrying would not help.
    #[error("NATS refused the connection")]
    Refused(#[source] async_nats::ConnectError),
}

/// A secret string (a password, a token, an NKey seed): its `Debug` and
/// `Display` print `***`, so that it cannot leak into a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the client proves who it is. At most one method applies, as in the
/// NATS server's own configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A `.creds` file holding a user JWT and its NKey seed (decentralised auth).
    CredentialsFile(PathBuf),
    /// An NKey user seed (`SU...`); the server knows the public key.
    NKey(Secret),
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// An authorisation token.
    Token(Secret),
}

/// TLS settings. With none set, TLS is used only when the server asks for it,
/// verified against the system's root certificates.
///
/// ```
/// let tls = outbox_nats::NatsTls::default()
///     .ca("/etc/nats/ca.pem")
///     .client_certificate("/etc/nats/relay.pem", "/etc/nats/relay-key.pem")
///     .required(true);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    ca: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
    required: bool,
}

impl NatsTls {
    /// Trusts the CA certificates of this PEM file (a private CA, say).
    pub fn ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// Presents this PEM client certificate and key, for servers that verify clients.
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client = Some((cert.into(), key.into()));
        self
    }

    /// Whether to refuse a server that does not use TLS.
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }
}

/// Where NATS is and how to connect to it: servers, credentials and TLS.
///
/// ```no_run
/// # async fn run() -> Result<(), outbox_nats::ConnectError> {
/// use outbox_nats::{NatsAuth, NatsConfig, Secret};
///
/// let client = NatsConfig::new("nats://a:4222,nats://b:4222")?
///     .auth(NatsAuth::Token(Secret::new(std::env::var("NATS_TOKEN").unwrap_or_default())))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsConfig {
    servers: Vec<ServerAddr>,
    auth: NatsAuth,
    tls: NatsTls,
}

/// Servers print with their passwords masked.
impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = (self.servers.iter())
            .map(|server| mask_passwords(server.as_url_str()))
            .collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .finish()
    }
}

impl NatsConfig {
    /// Servers from a comma-separated list (`nats://a:4222,b:4222`; the
    /// scheme and port are optional), with no credentials and TLS only when
    /// a server asks for it.
    ///
    /// ```
    /// use outbox_nats::NatsConfig;
    ///
    /// assert_eq!(NatsConfig::new("127.0.0.1:4222, nats://10.0.0.2:4222").unwrap().servers().len(), 2);
    /// assert!(NatsConfig::new("127.0.0.1:4222,,").is_err());
    /// assert!(NatsConfig::new("").is_err());
    /// ```
    pub fn new(servers: &str) -> Result<Self, ConnectError> {
        Ok(Self {
            servers: parse_servers(servers)?,
            auth: NatsAuth::None,
            tls: NatsTls::default(),
        })
    }

    /// Authenticates with `auth`.
    pub fn auth(mut self, auth: NatsAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Uses `tls`.
    pub fn tls(mut self, tls: NatsTls) -> Self {
        self.tls = tls;
        self
    }

    /// The servers.
    pub fn servers(&self) -> &[ServerAddr] {
        &self.servers
    }

    /// async-nats options with these credentials and TLS settings, for a
    /// caller who adds options of its own and connects by itself. Reads the
    /// credentials file.
    pub fn options(&self) -> Result<ConnectOptions, ConnectError> {
        let options = ConnectOptions::new();
        let mut options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::CredentialsFile(path) => credentials(options, path)?,
            NatsAuth::NKey(seed) => {
                nkeys::KeyPair::from_seed(seed.expose()).map_err(ConnectError::NKey)?;
                options.nkey(seed.expose().to_owned())
            }
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            NatsAuth::Token(token) => options.token(token.expose().to_owned()),
        };
        if let Some(ca) = &self.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.require_tls(self.tls.required))
    }

    /// Connects to any of the servers, retrying with backoff (100 ms
    /// doubling to 10 s) for as long as none is reachable, so that a relay or
    /// consumer started before NATS waits for it. Errors that a retry cannot
    /// fix (credentials, TLS) end it at once. Once connected, the client
    /// reconnects by itself after outages.
    pub async fn connect(&self) -> Result<async_nats::Client, ConnectError> {
        if self.servers.is_empty() {
            return Err(ConnectError::NoServers);
        }
        let mut failures = 0;
        loop {
            match self.options()?.connect(&self.servers[..]).await {
                Ok(client) => {
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "connected to NATS");
                    }
                    return Ok(client);
                }
                Err(error) if is_outage(&error) => {
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
}

/// Whether a failed connection may succeed later: no server answered. A TLS
/// handshake that failed (an untrusted certificate, a missing client
/// certificate) is reported as I/O too, but as invalid data, and retrying
/// would not change it.
fn is_outage(error: &async_nats::ConnectError) -> bool {
    match error.kind() {
        ConnectErrorKind::TimedOut | ConnectErrorKind::Dns => true,
        ConnectErrorKind::Io => std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_none_or(|io| io.kind() != std::io::ErrorKind::InvalidData),
        _ => false,
    }
}

fn credentials(options: ConnectOptions, path: &Path) -> Result<ConnectOptions, ConnectError> {
    let failed = |source| ConnectError::Credentials {
        path: path.to_owned(),
        source,
    };
    let contents = std::fs::read_to_string(path).map_err(failed)?;
    options.credentials(&contents).map_err(failed)
}

/// Parses a comma-separated list of NATS servers.
fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    (list.split(','))
        .map(str::trim)
        .map(|entry| {
            if entry.is_empty() {
                return Err(ConnectError::EmptyEntry(mask_passwords(list)));
            }
            entry
                .parse::<ServerAddr>()
                .map_err(|source| ConnectError::InvalidServer {
                    entry: mask_passwords(entry),
                    source,
                })
        })
        .collect()
}

/// `list` with the password of every `scheme://user:password@host` entry
/// replaced by `***`.
fn mask_passwords(list: &str) -> String {
    let entries: Vec<String> = (list.split(','))
        .map(|entry| {
            let Some((head, host)) = entry.rsplit_once('@') else {
                return entry.to_owned();
            };
            let scheme_end = head.find("://").map_or(0, |i| i + 3);
            match head[scheme_end..].split_once(':') {
                Some((user, _)) => format!("{}{user}:***@{host}", &head[..scheme_end]),
                None => entry.to_owned(),
            }
        })
        .collect();
    entries.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_a_server_list_are_masked() {
        assert_eq!(
            mask_passwords("nats://u:s3cret@a:4222, b:4222,tls://v:x@c"),
            "nats://u:***@a:4222, b:4222,tls://v:***@c"
        );
        assert_eq!(mask_passwords("nats://token@a"), "nats://token@a");
        let error = NatsConfig::new("nats://u:s3cret@a:notaport").expect_err("refused");
        assert!(!error.to_string().contains("s3cret"), "{error}");
        let error = NatsConfig::new("nats://u:s3cret@a,,").expect_err("refused");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[test]
    fn secrets_print_as_stars() {
        let auth = NatsAuth::UserPassword {
            user: "relay".into(),
            password: Secret::new("s3cret"),
        };
        let config = NatsConfig::new("a:4222").expect("one server").auth(auth);
        assert!(!format!("{config:?}").contains("s3cret"));
        let in_url = NatsConfig::new("nats://relay:s3cret@a:4222").expect("one server");
        let debug = format!("{in_url:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("relay:***@a"),
            "{debug}"
        );
        assert_eq!(Secret::new("s3cret").to_string(), "***");
    }

    #[test]
    fn a_malformed_seed_or_a_missing_credentials_file_is_refused_before_connecting() {
        let bad_seed = NatsConfig::new("a:4222")
            .expect("one server")
            .auth(NatsAuth::NKey(Secret::new("SUnotaseed")));
        let error = bad_seed.options().expect_err("refused");
        assert!(matches!(error, ConnectError::NKey(_)), "{error}");
        assert!(
            !outbox_core::ErrorReport(&error)
                .to_string()
                .contains("SUnotaseed")
        );

        let missing = NatsConfig::new("a:4222")
            .expect("one server")
            .auth(NatsAuth::CredentialsFile("/nonexistent/user.creds".into()));
        let error = missing.options().expect_err("refused");
        assert!(
            error.to_string().contains("/nonexistent/user.creds"),
            "{error}"
        );
    }
}
