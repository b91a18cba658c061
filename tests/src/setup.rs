//! A test's database and NATS namespace with the `ORDERS` stream, and the
//! helpers relay and consumer tests drive them with.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use outbox_core::Backoff;
use outbox_core::relay::{Publisher, Relay, RelayBuilder};
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::ConsumerBuilder;
use sea_orm::DatabaseConnection;

use crate::TestDb;
use crate::fixtures::AppError;
use crate::nats::TestNats;

/// Quick retries, so that tests do not wait seconds for redeliveries.
pub const FAST_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(20),
    max: Duration::from_millis(100),
};

/// Commits one event.
#[transactional]
pub async fn emit_one<E: OutboxEvent>(db: &DatabaseConnection, event: E) -> Result<(), AppError> {
    emit!(event);
    Ok(())
}

/// A test's database and NATS namespace, with the `ORDERS` stream provisioned.
#[derive(Debug)]
pub struct Setup {
    /// The database.
    pub test: TestDb,
    /// The NATS namespace.
    pub nats: TestNats,
    /// The full name of the `ORDERS` stream.
    pub stream: String,
}

impl Setup {
    /// Provisions the stream for `test` and `nats`.
    pub async fn new(test: TestDb, nats: TestNats) -> Self {
        let stream = nats.provision_orders().await;
        Self { test, nats, stream }
    }

    /// On a PostgreSQL schema and the shared NATS server.
    pub async fn postgres() -> Self {
        Self::new(TestDb::postgres().await, TestNats::shared().await).await
    }

    /// On a MariaDB/MySQL database and the shared NATS server.
    pub async fn mysql() -> Self {
        Self::new(TestDb::mysql().await, TestNats::shared().await).await
    }

    /// The test's database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.test.db
    }

    /// Emits `event` and relays the outbox to the stream.
    pub async fn publish<E: OutboxEvent>(&self, event: E) {
        emit_one(self.db(), event).await.expect("commit the event");
        self.relay().await;
    }

    /// Relays everything in the outbox once.
    pub async fn relay(&self) {
        let relay = Relay::builder(self.db().clone(), self.nats.publisher()).build();
        while relay.process_batch().await.expect("relay").claimed > 0 {}
    }

    /// Publishes a message straight to the stream, with the given outbox headers.
    pub async fn publish_raw(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &'static [u8],
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        let subject = format!("{}.{subject}", self.nats.namespace);
        jetstream::new(self.nats.client.clone())
            .publish_with_headers(subject, map, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// A consumer of the stream in this namespace, with quick retries.
    pub fn consumer(&self, name: &str) -> ConsumerBuilder {
        (self.nats.handle().consumer(self.db().clone(), name)).retry_backoff(FAST_RETRY)
    }

    /// Runs consumer `name`, configured by `configure`, until it has settled
    /// every message of the stream, then shuts it down.
    pub async fn consume(
        &self,
        name: &str,
        configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder,
    ) {
        let consumer = configure(self.consumer(name))
            .spawn()
            .await
            .expect("start the consumer");
        self.settled(name).await;
        consumer.shutdown().await.expect("stop");
    }

    /// Waits until `consumer` has acknowledged (or terminated) every message of the stream.
    pub async fn settled(&self, consumer: &str) {
        settled(&self.nats.client, &self.stream, consumer).await;
    }

    /// Deletes the streams and drops the database.
    pub async fn finish(self) {
        self.nats.finish().await;
        self.test.finish().await;
    }
}

/// Waits until `consumer` has acknowledged (or terminated) every message of `stream`.
pub async fn settled(client: &async_nats::Client, stream: &str, consumer: &str) {
    let stream = jetstream::new(client.clone())
        .get_stream(stream)
        .await
        .expect("stream");
    eventually("the consumer acknowledges every message", async || {
        let info = stream.consumer_info(consumer).await.expect("consumer info");
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
}

/// Polls `check` for up to 20 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay tuned for tests: short waits, so that they run in seconds.
pub fn fast<P: Publisher>(db: &DatabaseConnection, publisher: P) -> RelayBuilder<P> {
    Relay::builder(db.clone(), publisher)
        .poll_interval(Duration::from_millis(50))
        .stats_interval(Duration::from_millis(50))
        .retry_backoff(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(40),
        })
        .outage_backoff(Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        })
}

/// Waits until the outbox is empty; the bound only keeps a broken relay from hanging the run.
pub async fn drained(db: &DatabaseConnection, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let stats = outbox_core::relay::stats(db).await.expect("outbox stats");
        if stats.pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} events still pending",
            stats.pending
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
