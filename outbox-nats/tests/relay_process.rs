//! `outbox relay` as an operator runs it: as a process, against a private
//! `nats-server` that wants a user, a password and TLS with a client
//! certificate, with JSON logs and a Prometheus endpoint scraped over HTTP.
//! Also: a wrong password or a missing credentials file ends it with a clear
//! error that names no secret.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use outbox_nats::{NatsAuth, NatsConfig, NatsTls, Secret, StreamSpec};
use outbox_tests::emit_one;
use outbox_tests::fixtures::OrderCreated;
use outbox_tests::nats::PrivateNats;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sea_orm::Database;

const PASSWORD: &str = "pw-relay-41c7e2";

/// PEM files in `dir`: a CA, and a certificate and key for `server` and `client`.
fn certificates(dir: &Path) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("CA key");
    std::fs::write(
        dir.join("ca.pem"),
        params.self_signed(&key).expect("CA").pem(),
    )
    .expect("write");
    let issuer = Issuer::new(params, key);
    for name in ["server", "client"] {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).expect("write");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// The metrics page, or `None` while nothing answers.
fn scrape(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    Some(page)
}

/// The value of the sample `name` (without labels) on a metrics page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn outbox(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .current_dir(dir)
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env_remove("NATS_PASSWORD")
        .args(args);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_process_on_a_secured_server_serves_metrics_and_logs_json_without_secrets() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path();
    certificates(path);
    let config = format!(
        "authorization {{ users = [ {{ user: relay, password: \"{PASSWORD}\" }} ] }}\n\
         tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}\n",
        path.join("server.pem"),
        path.join("server-key.pem"),
        path.join("ca.pem"),
    );
    let server = PrivateNats::start_with_config(Some(&config)).await;
    let url = format!("sqlite://{}?mode=rwc", path.join("outbox.sqlite").display());
    let db = Database::connect(&url).await.expect("open SQLite");
    outbox_core::migrate(&db).await.expect("migrate");
    for order_id in 1..=3 {
        emit_one(
            &db,
            OrderCreated {
                order_id,
                total_cents: 100,
            },
        )
        .await
        .expect("commit");
    }

    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let tls = [
        "--nats-tls-ca",
        "ca.pem",
        "--nats-tls-cert",
        "client.pem",
        "--nats-tls-key",
        "client-key.pem",
        "--nats-tls-required",
    ];
    let log = std::fs::File::create(path.join("relay.log")).expect("log file");
    let mut relay = outbox(
        path,
        &["--log-format", "json", "relay", "--database-url", &url],
    )
    .args(["--nats-url", &server.url, "--nats-user", "relay"])
    .env("NATS_PASSWORD", PASSWORD)
    .args(tls)
    .args(["--stream", "ORDERS=orders", "--namespace", "ops"])
    .args(["--stream-replicas", "1", "--stream-max-age", "3600"])
    .args(["--metrics-addr", &metrics_addr, "--poll-interval", "0.1"])
    .env("RUST_LOG", "debug")
    .stdout(log.try_clone().expect("log file"))
    .stderr(log)
    .spawn()
    .expect("start outbox relay");

    let mut page = String::new();
    for _ in 0..300 {
        page = scrape(metrics_port).unwrap_or_default();
        if sample(&page, "outbox_published_total") == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = || std::fs::read_to_string(path.join("relay.log")).unwrap_or_default();
    assert_eq!(
        sample(&page, "outbox_published_total"),
        Some(3.0),
        "{page}\n{}",
        log()
    );
    assert!(sample(&page, "outbox_pending_rows").is_some(), "{page}");
    assert!(page.contains("outbox_batch_duration_seconds"), "{page}");

    // The stream, seen from outside with the same credentials.
    let client = NatsConfig::new(&server.url)
        .expect("server list")
        .auth(NatsAuth::UserPassword {
            user: "relay".into(),
            password: Secret::new(PASSWORD),
        })
        .tls(
            NatsTls::default()
                .ca(path.join("ca.pem"))
                .client_certificate(path.join("client.pem"), path.join("client-key.pem")),
        )
        .connect()
        .await
        .expect("connect");
    let name = StreamSpec::for_exchange("ORDERS", "orders", Some("ops")).name;
    let mut stream = jetstream::new(client)
        .get_stream(&name)
        .await
        .expect("stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, 3);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));

    let stopped = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    assert_eq!(relay.wait().expect("wait").code(), Some(0));
    let log = log();
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
    }
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
}

#[tokio::test]
async fn a_wrong_password_or_a_missing_credentials_file_ends_the_relay_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path();
    let config = "authorization { users = [ { user: relay, password: \"other-9d3f\" } ] }";
    let server = PrivateNats::start_with_config(Some(config)).await;
    let url = format!("sqlite://{}?mode=rwc", path.join("outbox.sqlite").display());

    let refused = outbox(path, &["relay", "--database-url", &url])
        .args(["--nats-url", &server.url, "--nats-user", "relay"])
        .env("NATS_PASSWORD", PASSWORD)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("run outbox relay");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(stderr.contains("NATS refused the connection"), "{stderr}");
    assert!(
        !stderr.contains(PASSWORD) && !stdout.contains(PASSWORD),
        "{stderr}{stdout}"
    );

    let missing = outbox(path, &["relay", "--database-url", &url])
        .args(["--nats-url", &server.url, "--nats-creds", "missing.creds"])
        .output()
        .expect("run outbox relay");
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("--nats-creds") && stderr.contains("missing.creds"),
        "{stderr}"
    );

    let malformed = outbox(path, &["relay", "--database-url", &url])
        .args(["--nats-url", "nats://relay:secret-2b@127.0.0.1:4222,,"])
        .output()
        .expect("run outbox relay");
    assert_eq!(malformed.status.code(), Some(2), "{malformed:?}");
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert!(
        stderr.contains("empty entry") && !stderr.contains("secret-2b"),
        "{stderr}"
    );
}

/// An option out of its range ends the relay at once, naming the option and
/// the range: a poll interval of 0 would busy-poll, a batch of 20000 was
/// silently cut to 10000.
#[test]
fn an_option_out_of_range_is_refused_naming_it_and_its_range() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path();
    let url = format!("sqlite://{}?mode=rwc", path.join("outbox.sqlite").display());
    for (option, value, range) in [
        ("--poll-interval", "-1", "0 or more"),
        ("--poll-interval", "0", "0.01 to 3600"),
        ("--batch-size", "20000", "1..=10000"),
        ("--batch-size", "0", "1..=10000"),
        ("--max-attempts", "0", "1.."),
    ] {
        let refused = outbox(path, &["relay", "--database-url", &url])
            .args([option, value])
            .output()
            .expect("run outbox relay");
        assert_eq!(
            refused.status.code(),
            Some(2),
            "{option} {value}: {refused:?}"
        );
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains(option) && stderr.contains(range),
            "{option} {value}: {stderr}"
        );
    }
}

/// A relay whose database refuses connections waits for it, as it waits for
/// NATS: it logs the server and the cause at once (never the password),
/// keeps running, and stops cleanly on SIGTERM.
#[test]
fn a_relay_waits_for_an_unreachable_database_and_says_why() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path();
    let port = free_port();
    let url = format!("postgres://app:pw-77e0@127.0.0.1:{port}/app");
    let log = std::fs::File::create(path.join("relay.log")).expect("log file");
    let mut relay = outbox(path, &["relay", "--database-url", &url])
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start outbox relay");
    let wanted = format!("cannot reach the database at 127.0.0.1:{port}");
    let mut text = String::new();
    for _ in 0..200 {
        text = std::fs::read_to_string(path.join("relay.log")).expect("read the log");
        if text.contains(&wanted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        text.contains("the database is unreachable; retrying until it is")
            && text.contains(&wanted)
            && text.to_lowercase().contains("refused"),
        "{text}"
    );
    assert!(
        !text.contains("pw-77e0"),
        "the password reached the log: {text}"
    );
    assert!(
        relay.try_wait().expect("poll").is_none(),
        "it gave up: {text}"
    );
    let term = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(term.success());
    let status = relay.wait().expect("wait for the relay");
    assert_eq!(status.code(), Some(0), "{text}");
}
