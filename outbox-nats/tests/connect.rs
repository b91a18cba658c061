//! Connecting to secured NATS: private `nats-server`s configured with users,
//! a token, an NKey, decentralised JWT auth (a credentials file) and TLS
//! with client certificates, the certificates and keys generated here. Right
//! credentials connect; wrong ones are refused at once, not retried, and no
//! secret appears in an error.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use outbox_nats::{ConnectError, NatsAuth, NatsConfig, NatsTls, Secret};
use outbox_tests::nats::PrivateNats;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair as TlsKey};
use serde_json::json;

const PASSWORD: &str = "pw-7f3a9c1e";
const TOKEN: &str = "tok-5d2b8e4f";

/// Connects, with a bound only so that a broken retry loop cannot hang the run.
async fn connect(config: &NatsConfig) -> Result<async_nats::Client, ConnectError> {
    let connected = tokio::time::timeout(Duration::from_secs(30), config.connect()).await;
    let client =
        connected.expect("a refusal ends the first connection; only outages are retried")?;
    client.flush().await.expect("a round trip to the server");
    Ok(client)
}

fn assert_refused(result: Result<async_nats::Client, ConnectError>, secret: &str) {
    let error = result.expect_err("refused");
    assert!(matches!(error, ConnectError::Refused(_)), "{error:?}");
    let report = outbox_core::ErrorReport(&error).to_string();
    assert!(!report.contains(secret), "the secret leaked: {report}");
    assert!(
        !format!("{error:?}").contains(secret),
        "the secret leaked: {error:?}"
    );
}

#[tokio::test]
async fn users_and_nkeys_connect_and_wrong_credentials_are_refused() {
    let user = KeyPair::new_user();
    let config = format!(
        "authorization {{ users = [ {{ user: relay, password: \"{PASSWORD}\" }}, {{ nkey: {} }} ] }}",
        user.public_key()
    );
    let server = PrivateNats::start_with_config(Some(&config)).await;
    let nats = || NatsConfig::new(&server.url).expect("server list");

    let password = |password: &str| NatsAuth::UserPassword {
        user: "relay".into(),
        password: Secret::new(password),
    };
    connect(&nats().auth(password(PASSWORD)))
        .await
        .expect("user and password");
    let seed = user.seed().expect("seed");
    connect(&nats().auth(NatsAuth::NKey(Secret::new(&seed))))
        .await
        .expect("NKey");

    assert_refused(
        connect(&nats().auth(password("wrong-8e1d"))).await,
        "wrong-8e1d",
    );
    let stranger = KeyPair::new_user().seed().expect("seed");
    assert_refused(
        connect(&nats().auth(NatsAuth::NKey(Secret::new(&stranger)))).await,
        &stranger,
    );
    assert_refused(connect(&nats()).await, PASSWORD);
}

#[tokio::test]
async fn a_token_connects_and_a_wrong_one_is_refused() {
    let config = format!("authorization {{ token: \"{TOKEN}\" }}");
    let server = PrivateNats::start_with_config(Some(&config)).await;
    let nats = |token: &str| {
        NatsConfig::new(&server.url)
            .expect("server list")
            .auth(NatsAuth::Token(Secret::new(token)))
    };
    connect(&nats(TOKEN)).await.expect("token");
    assert_refused(connect(&nats("tok-wrong-3c")).await, "tok-wrong-3c");
}

/// A JWT signed by `issuer`, as nats-server's decentralised auth reads it.
fn jwt(issuer: &KeyPair, subject: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": uuid::Uuid::now_v7().simple().to_string().to_uppercase(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[tokio::test]
async fn a_credentials_file_connects_and_a_missing_one_is_named() {
    let (operator, system, account, user) = (
        KeyPair::new_operator(),
        KeyPair::new_account(),
        KeyPair::new_account(),
        KeyPair::new_user(),
    );
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
    let account_jwt = |account: &KeyPair| {
        let claims = json!({"type": "account", "version": 2, "limits": unlimited});
        jwt(&operator, &account.public_key(), claims)
    };
    // With JetStream on, the server needs a system account.
    let config = format!(
        "operator: {}\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: {}, {}: {} }}\n",
        jwt(
            &operator,
            &operator.public_key(),
            json!({"type": "operator", "version": 2})
        ),
        system.public_key(),
        system.public_key(),
        account_jwt(&system),
        account.public_key(),
        account_jwt(&account),
    );
    let server = PrivateNats::start_with_config(Some(&config)).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let creds = dir.path().join("relay.creds");
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        ),
    )
    .expect("write the credentials file");
    let nats = |path: &Path| {
        NatsConfig::new(&server.url)
            .expect("server list")
            .auth(NatsAuth::CredentialsFile(path.to_owned()))
    };
    connect(&nats(&creds)).await.expect("credentials file");

    let missing = dir.path().join("missing.creds");
    let error = connect(&nats(&missing)).await.expect_err("missing file");
    assert!(
        matches!(error, ConnectError::Credentials { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("missing.creds"), "{error}");
}

/// A CA, and a certificate for `names` signed by it, as PEM files in `dir`.
struct Pki {
    ca: std::path::PathBuf,
    issuer: Issuer<'static, TlsKey>,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = TlsKey::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write the CA");
        Self {
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// `(certificate, key)` files for `name`, valid for 127.0.0.1 and localhost.
    fn issue(&self, dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate params");
        let key = TlsKey::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let (cert_file, key_file) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).expect("write the certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write the key");
        (cert_file, key_file)
    }
}

#[tokio::test]
async fn tls_with_a_private_ca_and_a_client_certificate_connects() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pki = Pki::new(dir.path());
    let (server_cert, server_key) = pki.issue(dir.path(), "server");
    let (client_cert, client_key) = pki.issue(dir.path(), "client");
    let config = format!(
        "tls {{ cert_file: {server_cert:?}, key_file: {server_key:?}, ca_file: {:?}, verify: true, timeout: 5 }}",
        pki.ca
    );
    let server = PrivateNats::start_with_config(Some(&config)).await;
    let nats = |tls: NatsTls| NatsConfig::new(&server.url).expect("server list").tls(tls);

    let full = NatsTls::default()
        .ca(&pki.ca)
        .client_certificate(&client_cert, &client_key)
        .required(true);
    connect(&nats(full))
        .await
        .expect("TLS with a client certificate");

    let error = connect(&nats(NatsTls::default().ca(&pki.ca)))
        .await
        .expect_err("no client certificate");
    assert!(matches!(error, ConnectError::Refused(_)), "{error:?}");
    let unknown_ca = NatsTls::default().client_certificate(&client_cert, &client_key);
    let error = connect(&nats(unknown_ca))
        .await
        .expect_err("the CA is not trusted");
    assert!(matches!(error, ConnectError::Refused(_)), "{error:?}");
}
