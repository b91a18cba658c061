//! The consumer section: how fast a pre-filled stream is consumed by
//!
//! - a plain JetStream pull consumer that only acks (`raw_consume_eps`, the ceiling);
//! - a hand-written pull consumer that applies a one-row `UPDATE` per
//!   message in a transaction of its own, then acks, with `in_flight`
//!   messages at once and neither an inbox nor per-key order
//!   (`handwritten_consumer_eps`, what a user would write);
//! - `outbox_nats::Consumer` with the same `UPDATE` as its handler and
//!   `in_flight` transactions at once (`consumer_eps`);
//! - the same `Consumer` as a group of one (`group1_consumer_eps`; its
//!   ratio to `consumer_eps` is `group_overhead`) and as a group of two
//!   members in this process (`group2_consumer_eps`, whose first look at
//!   the group, a lease's third in, hands half the partitions to the second).
//!
//! Each variant reads the whole stream through a durable consumer of its
//! own; the three run in turn, `repeat` times, and the medians are reported.

use outbox_nats::async_nats;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use outbox_core::consumer::group::GroupConfig;
use outbox_core::inbox::{Handler, Metadata};
use outbox_core::uuid::Uuid;
use outbox_nats::{Consumer, ConsumerHandle};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement,
    TransactionTrait,
};

use super::{BenchEvent, BoxError, ServiceCpu, own_cpu_seconds, round, round3};

/// What the section measures, and with what.
pub(crate) struct Section<'a> {
    pub db: &'a DatabaseConnection,
    pub context: &'a async_nats::jetstream::Context,
    pub client: &'a async_nats::Client,
    pub namespace: &'a str,
    /// The stream holding the events, already filled.
    pub stream: &'a str,
    pub events: usize,
    pub keys: u32,
    /// Messages (hand-written) or transactions (`Consumer`) at once.
    pub in_flight: usize,
    /// The `Consumer`'s batch size; its default if `None`.
    pub batch: Option<usize>,
    pub repeat: u32,
}

/// One variant's run: its rate, and the CPU time per event of this
/// process (the consumer), of PostgreSQL's backends and of nats-server.
#[derive(Debug, Clone, Copy)]
struct Measured {
    eps: f64,
    process_us: f64,
    postgres_us: f64,
    nats_us: f64,
}

impl Measured {
    /// Times `run`, which consumes `events` messages.
    async fn of<F: Future<Output = Result<(), BoxError>>>(
        events: usize,
        run: F,
    ) -> Result<Self, BoxError> {
        let (services, own, started) = (ServiceCpu::now(), own_cpu_seconds(), Instant::now());
        run.await?;
        let seconds = started.elapsed().as_secs_f64();
        let per_event = |cpu: f64| cpu * 1e6 / events as f64;
        let services = services.since();
        Ok(Self {
            eps: events as f64 / seconds,
            process_us: per_event(own_cpu_seconds() - own),
            postgres_us: per_event(services.postgres),
            nats_us: per_event(services.nats),
        })
    }
}

/// The median run of each variant, by rate.
pub(crate) struct ConsumerFigures {
    raw: Measured,
    handwritten: Measured,
    outbox: Measured,
    group1: Measured,
    group2: Measured,
}

/// The groups' lease: short, so that the second member gets its share soon.
const GROUP_LEASE: Duration = Duration::from_secs(3);

impl ConsumerFigures {
    /// The rate of the outbox `Consumer`.
    pub(crate) fn consumer_eps(&self) -> f64 {
        self.outbox.eps
    }

    pub(crate) fn into_figures(self) -> Vec<(&'static str, serde_json::Value)> {
        let Self {
            raw,
            handwritten,
            outbox,
            group1,
            group2,
        } = self;
        vec![
            ("raw_consume_eps", round(raw.eps).into()),
            ("handwritten_consumer_eps", round(handwritten.eps).into()),
            ("consumer_eps", round(outbox.eps).into()),
            (
                "consumer_ratio",
                round3(outbox.eps / handwritten.eps).into(),
            ),
            (
                "handwritten_cpu_us_process",
                round3(handwritten.process_us).into(),
            ),
            (
                "handwritten_cpu_us_postgres",
                round3(handwritten.postgres_us).into(),
            ),
            ("consumer_cpu_us_process", round3(outbox.process_us).into()),
            (
                "consumer_cpu_us_postgres",
                round3(outbox.postgres_us).into(),
            ),
            ("group1_consumer_eps", round(group1.eps).into()),
            ("group_overhead", round3(group1.eps / outbox.eps).into()),
            ("group1_cpu_us_process", round3(group1.process_us).into()),
            ("group1_cpu_us_postgres", round3(group1.postgres_us).into()),
            ("group1_cpu_us_nats", round3(group1.nats_us).into()),
            ("consumer_cpu_us_nats", round3(outbox.nats_us).into()),
            ("group2_consumer_eps", round(group2.eps).into()),
            ("group2_cpu_us_process", round3(group2.process_us).into()),
            ("group2_cpu_us_postgres", round3(group2.postgres_us).into()),
            ("group2_cpu_us_nats", round3(group2.nats_us).into()),
        ]
    }
}

/// The run of median rate.
fn median_run(mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.eps.total_cmp(&b.eps));
    runs[(runs.len() - 1) / 2]
}

/// The handler of both the hand-written consumer and the `Consumer`.
async fn bump(db: &impl ConnectionTrait, key: u32) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE bench_stock SET n = n + 1 WHERE key = $1",
        [i64::from(key).into()],
    ))
    .await
    .map(drop)
}

async fn handle(event: BenchEvent, _: Metadata, db: &DatabaseTransaction) -> Result<(), DbErr> {
    bump(db, event.key).await
}

impl Section<'_> {
    pub(crate) async fn run(&self) -> Result<ConsumerFigures, BoxError> {
        self.db
            .execute_unprepared(
                "CREATE TABLE IF NOT EXISTS bench_stock (key BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
            )
            .await?;
        let (mut raw, mut handwritten, mut outbox) = (Vec::new(), Vec::new(), Vec::new());
        let (mut group1, mut group2) = (Vec::new(), Vec::new());
        for run in 1..=self.repeat {
            raw.push(self.raw(run).await?);
            handwritten.push(self.handwritten(run).await?);
            outbox.push(self.consumer(&format!("outbox{run}"), 0).await?);
            group1.push(self.consumer(&format!("group1_{run}"), 1).await?);
            group2.push(self.consumer(&format!("group2_{run}"), 2).await?);
            let last = |runs: &[Measured]| runs[runs.len() - 1];
            let (r, h, o) = (last(&raw), last(&handwritten), last(&outbox));
            let (g1, g2) = (last(&group1), last(&group2));
            eprintln!(
                "consumers, run {run}/{}: raw {:.0}/s, hand-written {:.0}/s \
                 ({:.1} + {:.1} µs CPU/event here + PostgreSQL), outbox Consumer {:.0}/s \
                 ({:.1} + {:.1}), group of one {:.0}/s ({:.1} + {:.1}), of two {:.0}/s \
                 ({:.1} + {:.1})",
                self.repeat,
                r.eps,
                h.eps,
                h.process_us,
                h.postgres_us,
                o.eps,
                o.process_us,
                o.postgres_us,
                g1.eps,
                g1.process_us,
                g1.postgres_us,
                g2.eps,
                g2.process_us,
                g2.postgres_us,
            );
        }
        Ok(ConsumerFigures {
            raw: median_run(raw),
            handwritten: median_run(handwritten),
            outbox: median_run(outbox),
            group1: median_run(group1),
            group2: median_run(group2),
        })
    }

    /// A durable pull consumer of its own on the stream, from its start.
    async fn durable(
        &self,
        name: &str,
    ) -> Result<async_nats::jetstream::consumer::PullConsumer, BoxError> {
        let stream = self.context.get_stream(self.stream).await?;
        let config = async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        };
        Ok(stream.create_consumer(config).await?)
    }

    async fn raw(&self, run: u32) -> Result<Measured, BoxError> {
        let consumer = self.durable(&format!("raw{run}")).await?;
        Measured::of(self.events, async {
            let mut messages = consumer.messages().await?.take(self.events);
            while let Some(message) = messages.next().await {
                message?.ack().await.map_err(|e| e as BoxError)?;
            }
            Ok(self.client.flush().await?)
        })
        .await
    }

    async fn handwritten(&self, run: u32) -> Result<Measured, BoxError> {
        self.reset_stock().await?;
        let consumer = self.durable(&format!("hand{run}")).await?;
        Measured::of(self.events, async {
            (consumer.messages().await?.take(self.events))
                .map_err(BoxError::from)
                .try_for_each_concurrent(self.in_flight, |message| async move {
                    let event: BenchEvent = serde_json::from_slice(&message.payload)?;
                    let txn = self.db.begin().await?;
                    bump(&txn, event.key).await?;
                    txn.commit().await?;
                    message.ack().await.map_err(|e| e as BoxError)?;
                    Ok(())
                })
                .await?;
            Ok(self.client.flush().await?)
        })
        .await
    }

    /// The outbox `Consumer` named `name`: one process's (`members` 0), or
    /// a group of `members` in this process.
    async fn consumer(&self, name: &str, members: usize) -> Result<Measured, BoxError> {
        self.reset_stock().await?;
        let builder = || {
            let mut builder = Consumer::builder(self.client.clone(), self.db.clone(), name)
                .namespace(self.namespace)
                .max_in_flight(self.in_flight)
                .on::<BenchEvent, _>(handle);
            if let Some(batch) = self.batch {
                builder = builder.batch_size(batch);
            }
            if members > 0 {
                let mut group = GroupConfig::DEFAULT;
                group.lease = GROUP_LEASE;
                builder = builder.group(group);
            }
            builder
        };
        let mut consumers = Vec::new();
        let measured = Measured::of(self.events, async {
            for _ in 0..members.max(1) {
                consumers.push(builder().spawn().await?);
            }
            while self.applied().await? < self.events as i64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })
        .await?;
        for consumer in consumers {
            consumer.shutdown().await?;
        }
        Ok(measured)
    }

    /// One row per key, at zero.
    async fn reset_stock(&self) -> Result<(), DbErr> {
        self.db.execute_unprepared("TRUNCATE bench_stock").await?;
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO bench_stock SELECT k, 0 FROM generate_series(0, $1 - 1) AS k",
                [i64::from(self.keys).into()],
            ))
            .await
            .map(drop)
    }

    /// Updates committed so far.
    async fn applied(&self) -> Result<i64, DbErr> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT COALESCE(SUM(n), 0)::BIGINT FROM bench_stock",
            ))
            .await?;
        row.map_or(Ok(0), |row| row.try_get_by_index(0))
    }
}

/// When each event's handler ran, by event id.
pub(crate) type Handled = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Notes when each event reached its handler; writes nothing else.
struct Stamp(Handled);

impl Handler<BenchEvent> for Stamp {
    type Error = DbErr;

    async fn handle(
        &self,
        _: BenchEvent,
        meta: Metadata,
        _: &DatabaseTransaction,
    ) -> Result<(), DbErr> {
        let mut handled = self.0.lock().unwrap_or_else(|p| p.into_inner());
        handled.insert(meta.id, Instant::now());
        Ok(())
    }
}

/// A `Consumer` of the relay's stream, from now on, whose handler notes when
/// each event reached it: the far end of the latency run.
pub(crate) async fn stamping(
    client: &async_nats::Client,
    db: &DatabaseConnection,
    context: &async_nats::jetstream::Context,
    namespace: &str,
    stream: &str,
) -> Result<(ConsumerHandle, Handled), BoxError> {
    context.get_stream(stream).await?.purge().await?;
    let handled = Handled::default();
    let consumer = Consumer::builder(client.clone(), db.clone(), "latency")
        .namespace(namespace)
        .on::<BenchEvent, _>(Stamp(Arc::clone(&handled)))
        .spawn()
        .await?;
    Ok((consumer, handled))
}
