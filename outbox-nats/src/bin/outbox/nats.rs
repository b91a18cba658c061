//! The NATS connection flags: servers, one way to authenticate, TLS. Each
//! has an environment variable; secrets are never echoed by `--help`.

use std::path::PathBuf;

use outbox_nats::{ConnectError, NatsAuth, NatsConfig, NatsTls, Secret};

#[derive(clap::Args)]
#[group(id = "nats")]
pub(crate) struct NatsArgs {
    /// The NATS servers, comma-separated; the first connection waits for one to answer.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "127.0.0.1:4222",
        hide_env_values = true
    )]
    nats_url: String,
    /// A credentials file (user JWT and NKey seed).
    #[arg(long, env = "NATS_CREDS", value_parser = existing_file, group = "nats_auth")]
    nats_creds: Option<PathBuf>,
    /// An NKey user seed (`SU...`); prefer the environment variable to the flag.
    #[arg(long, env = "NATS_NKEY", hide_env_values = true, group = "nats_auth")]
    nats_nkey: Option<String>,
    /// A user name, with --nats-password.
    #[arg(
        long,
        env = "NATS_USER",
        requires = "nats_password",
        group = "nats_auth"
    )]
    nats_user: Option<String>,
    /// The password of --nats-user; prefer the environment variable to the flag.
    #[arg(
        long,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    nats_password: Option<String>,
    /// An authorisation token; prefer the environment variable to the flag.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, group = "nats_auth")]
    nats_token: Option<String>,
    /// A PEM file of CA certificates to trust for the servers' TLS certificates.
    #[arg(long, env = "NATS_TLS_CA", value_parser = existing_file)]
    nats_tls_ca: Option<PathBuf>,
    /// A PEM client certificate, for servers that verify clients; with --nats-tls-key.
    #[arg(long, env = "NATS_TLS_CERT", value_parser = existing_file, requires = "nats_tls_key")]
    nats_tls_cert: Option<PathBuf>,
    /// The key of --nats-tls-cert.
    #[arg(long, env = "NATS_TLS_KEY", value_parser = existing_file, requires = "nats_tls_cert")]
    nats_tls_key: Option<PathBuf>,
    /// Refuse servers that do not use TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    nats_tls_required: bool,
}

impl NatsArgs {
    pub(crate) fn config(&self) -> Result<NatsConfig, BadServerList> {
        let auth = if let Some(path) = &self.nats_creds {
            NatsAuth::CredentialsFile(path.clone())
        } else if let Some(seed) = &self.nats_nkey {
            NatsAuth::NKey(Secret::new(seed))
        } else if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            NatsAuth::UserPassword {
                user: user.clone(),
                password: Secret::new(password),
            }
        } else if let Some(token) = &self.nats_token {
            NatsAuth::Token(Secret::new(token))
        } else {
            NatsAuth::None
        };
        let mut tls = NatsTls::default().required(self.nats_tls_required);
        if let Some(ca) = &self.nats_tls_ca {
            tls = tls.ca(ca);
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert, &self.nats_tls_key) {
            tls = tls.client_certificate(cert, key);
        }
        let servers = NatsConfig::new(&self.nats_url).map_err(BadServerList)?;
        Ok(servers.auth(auth).tls(tls))
    }
}

/// `--nats-url` does not parse; the cause says why, with passwords masked
/// (clap's own error would echo the value).
#[derive(Debug, thiserror::Error)]
#[error("invalid --nats-url (NATS_URL)")]
pub(crate) struct BadServerList(#[source] ConnectError);

fn existing_file(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("no such file: `{value}`"))
    }
}
