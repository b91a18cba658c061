//! The quickstart: a `#[transactional]` handler writes an order and its
//! `OrderCreated` event in one SQLite transaction (a rejected order leaves
//! neither); the relay delivers the committed events to NATS JetStream; a
//! consumer of the stream prints what arrives.
//!
//! Run with `cargo run --example quickstart`. NATS: `NATS_URL` if set, else
//! a server on 127.0.0.1:4222, else a private `nats-server -js` started from
//! PATH for the run.

use outbox_nats::async_nats;
use std::time::Duration;

use futures::StreamExt;
use outbox_core::relay::Relay;
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::async_nats::jetstream::{
    self, consumer::DeliverPolicy, consumer::pull::OrderedConfig,
};
use outbox_nats::{JetStreamPublisher, provision, streams_from_registry};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, Statement};

#[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
struct OrderCreated {
    order_id: i64,
    total_cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum PlaceOrderError {
    #[error(transparent)]
    Outbox(#[from] outbox_core::Error),
    #[error("an order must cost something")]
    EmptyOrder,
}

impl From<DbErr> for PlaceOrderError {
    fn from(error: DbErr) -> Self {
        Self::Outbox(error.into())
    }
}

/// Inserts the order and records its event; both commit, or neither.
#[transactional]
async fn place_order(
    db: &DatabaseConnection,
    order_id: i64,
    total_cents: i64,
) -> Result<(), PlaceOrderError> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO orders (id, total_cents) VALUES (?, ?)",
        [order_id.into(), total_cents.into()],
    ))
    .await?;
    emit!(OrderCreated {
        order_id,
        total_cents
    });
    if total_cents <= 0 {
        return Err(PlaceOrderError::EmptyOrder); // rolls back the order and its event
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One connection: every connection to `sqlite::memory:` is a database of its own.
    let mut options = ConnectOptions::new("sqlite::memory:");
    options.max_connections(1).sqlx_logging(false);
    let db = Database::connect(options).await?;
    outbox_core::migrate(&db).await?;
    db.execute_unprepared(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, total_cents BIGINT NOT NULL)",
    )
    .await?;

    let nats = nats::Server::find_or_start().await?;
    let client = async_nats::connect(nats.url()).await?;
    let publisher = JetStreamPublisher::new(client.clone());
    let relay = Relay::builder(db.clone(), publisher.clone()).build();
    let window = relay.config().retry_horizon().max(Duration::from_secs(120));
    provision(publisher.context(), &streams_from_registry(None)?, window).await?;

    // Subscribe before anything is published, to see exactly this run's events.
    let stream = jetstream::new(client).get_stream("ORDERS").await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    let mut received = consumer.messages().await?;
    let relay = relay.spawn();

    let mut committed = 0;
    for (order_id, total_cents) in [(1, 1250), (2, 0), (3, 990)] {
        match place_order(&db, order_id, total_cents).await {
            Ok(()) => {
                committed += 1;
                println!("order {order_id}: committed with its event");
            }
            Err(error) => println!("order {order_id}: rolled back ({error}), no event"),
        }
    }

    println!("\nreceived from JetStream stream ORDERS:");
    for _ in 0..committed {
        let message = tokio::time::timeout(Duration::from_secs(10), received.next())
            .await
            .map_err(|_| "no event arrived within 10 s")?
            .ok_or("the consumer stopped")??;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(outbox_core::headers::MSG_ID));
        println!(
            "  {} id={} {}",
            message.subject,
            id.map_or("-", |v| v.as_str()),
            String::from_utf8_lossy(&message.payload)
        );
    }
    relay.shutdown().await?;
    let stats = outbox_core::relay::stats(&db).await?;
    println!(
        "outbox: {} pending, {} dead letters",
        stats.pending, stats.dead_letters
    );
    Ok(())
}

/// Finds a NATS server for the example, or starts a private one.
mod nats {
    use std::net::TcpListener;
    use std::time::Duration;

    use tokio::process::{Child, Command};

    /// The server the example talks to; a private one stops with it.
    pub(crate) struct Server {
        url: String,
        _private: Option<(Child, tempfile::TempDir)>,
    }

    impl Server {
        pub(crate) fn url(&self) -> &str {
            &self.url
        }

        pub(crate) async fn find_or_start() -> Result<Self, Box<dyn std::error::Error>> {
            if let Ok(url) = std::env::var("NATS_URL") {
                return Ok(Self {
                    url,
                    _private: None,
                });
            }
            if tokio::net::TcpStream::connect("127.0.0.1:4222")
                .await
                .is_ok()
            {
                return Ok(Self {
                    url: "127.0.0.1:4222".into(),
                    _private: None,
                });
            }
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let store = tempfile::tempdir()?;
            let child = Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(store.path())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    format!(
                        "no NATS server: NATS_URL is unset, nothing listens on 127.0.0.1:4222, and \
                         `nats-server` could not be started ({e}); install it (e.g. `apt-get install \
                         nats-server`) or set NATS_URL"
                    )
                })?;
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    println!("started a private nats-server on port {port}");
                    return Ok(Self {
                        url: format!("127.0.0.1:{port}"),
                        _private: Some((child, store)),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err("the private nats-server did not start within 5 s".into())
        }
    }
}
