//! NATS for tests: the shared server (`NATS_URL`, default `127.0.0.1:4222`)
//! with a namespace of its own per test, or a private `nats-server` that a
//! test can stop and restart.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use outbox_nats::{JetStreamPublisher, Namespace, StreamSpec};
use tokio::process::{Child, Command};

/// The NATS server tests use.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

/// A namespace (subject prefix and stream-name prefix) only one test uses.
#[derive(Debug)]
pub struct TestNats {
    /// The connection.
    pub client: async_nats::Client,
    /// The subject prefix; streams are named `<NAMESPACE>_<STREAM>`.
    pub namespace: String,
}

impl TestNats {
    /// Connects to `url` with a fresh namespace.
    pub async fn connect(url: &str) -> Self {
        let client = async_nats::connect(url)
            .await
            .unwrap_or_else(|e| panic!("NATS at {url} is required: {e}"));
        let namespace = format!("t{}", uuid::Uuid::now_v7().simple());
        Self { client, namespace }
    }

    /// On the shared server.
    pub async fn shared() -> Self {
        Self::connect(&nats_url()).await
    }

    /// This namespace, as a service says it once.
    pub fn handle(&self) -> Namespace {
        Namespace::new(self.client.clone(), self.namespace.clone())
    }

    /// A publisher into this namespace.
    pub fn publisher(&self) -> JetStreamPublisher {
        self.handle().publisher()
    }

    /// The stream of `exchange` in this namespace.
    pub fn stream(&self, stream: &str, exchange: &str) -> StreamSpec {
        StreamSpec::for_exchange(stream, exchange, Some(&self.namespace))
    }

    /// Creates this namespace's `ORDERS` stream (`orders.>`, a 120 s
    /// duplicate window) and returns its full name.
    pub async fn provision_orders(&self) -> String {
        let spec = self.stream("ORDERS", "orders");
        outbox_nats::provision(
            self.publisher().context(),
            std::slice::from_ref(&spec),
            Duration::from_secs(120),
        )
        .await
        .expect("provision the orders stream");
        spec.name
    }

    /// Every message of `stream` (a full name), in stream order.
    pub async fn messages(&self, stream: &str) -> Vec<StreamMessage> {
        let context = jetstream::new(self.client.clone());
        let mut stream = context.get_stream(stream).await.expect("stream exists");
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            messages.push(
                stream
                    .get_raw_message(sequence)
                    .await
                    .expect("read message"),
            );
        }
        messages
    }

    /// Deletes the streams of this namespace.
    pub async fn finish(self) {
        let context = jetstream::new(self.client.clone());
        let prefix = format!("{}_", self.namespace.to_uppercase());
        let names: Vec<String> = futures::StreamExt::collect::<Vec<_>>(context.stream_names())
            .await
            .into_iter()
            .filter_map(Result::ok)
            .filter(|name| name.starts_with(&prefix))
            .collect();
        for name in names {
            let _ = context.delete_stream(&name).await;
        }
    }
}

/// A `nats-server -js` of the test's own, on a free port, with its own store.
#[derive(Debug)]
pub struct PrivateNats {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    store: tempfile::TempDir,
    /// A configuration file (`-c`), for servers with users and permissions.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl PrivateNats {
    /// Starts `nats-server` from PATH (or /usr/sbin).
    pub async fn start() -> Self {
        Self::start_with_config(None).await
    }

    /// Starts `nats-server` with `config` (nats-server configuration syntax)
    /// added to its command line flags.
    pub async fn start_with_config(config: Option<&str>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store: tempfile::tempdir().expect("store directory"),
            config: None,
            child: None,
        };
        if let Some(config) = config {
            let path = server.store.path().join("nats-server.conf");
            std::fs::write(&path, config).expect("write nats-server.conf");
            server.config = Some(path);
        }
        server.restart().await;
        server
    }

    /// Stops the server (its store stays).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("stop nats-server");
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut command = Command::new(binary());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server is required for this test (apt-get install nats-server)");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "nats-server did not listen on port {} within 5 s",
            self.port
        );
    }
}

/// `NATS_SERVER` if set (CI points it at the current release), else
/// Debian's, else the one on PATH.
fn binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    match std::env::var_os("NATS_SERVER") {
        Some(path) => PathBuf::from(path),
        None if sbin.exists() => sbin,
        None => PathBuf::from("nats-server"),
    }
}

/// A cluster of `nats-server -js` processes of the test's own, on free
/// ports, each with its own store; stopped when dropped.
#[derive(Debug)]
pub struct PrivateCluster {
    /// `nats://127.0.0.1:<a>,nats://127.0.0.1:<b>,...`
    pub url: String,
    _store: tempfile::TempDir,
    _nodes: Vec<Child>,
}

impl PrivateCluster {
    /// Starts `size` nodes routed to each other, and waits until each listens.
    pub async fn start(size: usize) -> Self {
        let store = tempfile::tempdir().expect("store directory");
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free(), free())).collect();
        let routes: Vec<String> = (ports.iter())
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let dir = store.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).expect("node store");
            let config = format!(
                "listen: 127.0.0.1:{port}\nserver_name: n{i}\njetstream {{ store_dir: {:?} }}\n\
                 cluster {{ name: test, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                dir.display().to_string(),
                routes.join(", ")
            );
            let file = dir.join("nats.conf");
            std::fs::write(&file, config).expect("write the node's configuration");
            let child = Command::new(binary())
                .arg("-c")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("nats-server is required for this test (apt-get install nats-server)");
            nodes.push(child);
        }
        for (port, _) in &ports {
            let mut tries = 0;
            while tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_err()
            {
                tries += 1;
                assert!(
                    tries < 200,
                    "node on port {port} did not listen within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let urls: Vec<String> = (ports.iter())
            .map(|(port, _)| format!("nats://127.0.0.1:{port}"))
            .collect();
        Self {
            url: urls.join(","),
            _store: store,
            _nodes: nodes,
        }
    }
}
