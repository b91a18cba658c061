//! The benchmark: our relay and handlers against the raw limits of the same
//! PostgreSQL and NATS, in one run, so that the ratios hold on any machine.
//!
//! ```sh
//! cargo run --release --example bench                 # the full run (100,000 events)
//! cargo run --release --example bench -- --events 1000000 --naive-events 0
//! cargo run --example bench -- --smoke                # a few thousand events, for CI
//! ```
//!
//! The consumer section is in `consumer.rs`.
//!
//! Needs PostgreSQL (`DATABASE_URL`) and NATS (`NATS_URL`); works in a schema
//! and a stream namespace of its own, removed at the end. Prints a table, then
//! one JSON object as the last line.

mod consumer;

use outbox_nats::async_nats;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use outbox_core::entity::outbox_message;
use outbox_core::relay::{Batch, Delivery, Publisher, Relay};
use outbox_core::uuid::Uuid;
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::async_nats::HeaderMap;
use outbox_nats::async_nats::jetstream::Context;
use outbox_nats::async_nats::jetstream::message::PublishMessage;
use outbox_nats::{JetStreamPublisher, StreamSpec, provision};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    QueryOrder, QuerySelect, Statement, TransactionTrait,
};

#[derive(Parser, Debug)]
#[command(
    about = "Relay throughput, latency and handler overhead against raw JetStream and SeaORM"
)]
struct Args {
    /// Backlog drained by the relay, and published raw.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events for the naive relay (it is slow; its rate does not depend on the count). 0 skips it.
    #[arg(long, default_value_t = 5_000)]
    naive_events: usize,
    /// Payload size in bytes (serialized JSON).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Events per relay round.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Publish acknowledgements in flight at once.
    #[arg(long, default_value_t = 4_096)]
    in_flight: usize,
    /// Distinct partition keys of the backlog.
    #[arg(long, default_value_t = 1_000)]
    keys: u32,
    /// Offered rate of the latency run, events per second (open loop).
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Drains of the backlog, each between two raw runs; the figures are the
    /// median pair's (the machine's speed drifts between runs seconds apart).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Handler calls per variant in the overhead comparison.
    #[arg(long, default_value_t = 3_000)]
    handler_calls: usize,
    /// Events of the consumer section's stream.
    #[arg(long, default_value_t = 20_000)]
    consumer_events: usize,
    /// Messages (hand-written consumer) or transactions (outbox `Consumer`) at once.
    #[arg(long, default_value_t = 16)]
    consumer_in_flight: usize,
    /// The outbox `Consumer`'s batch size (messages per transaction); its default if not given.
    #[arg(long)]
    consumer_batch: Option<usize>,
    /// Events scheduled for tomorrow, held in `outbox_scheduled` for the whole
    /// run: what pending scheduled events cost the relay's drains and wakes.
    #[arg(long, default_value_t = 0)]
    scheduled: u64,
    /// Run the consumer section only.
    #[arg(long)]
    consumers_only: bool,
    /// Let the relay commit its bookkeeping without waiting for the WAL flush.
    #[arg(long)]
    async_commit: bool,
    /// Deleted events between the relay's vacuums of the outbox; 0: never.
    #[arg(long, default_value_t = 100_000)]
    vacuum_after: u64,
    /// Run the relay's rounds in turn instead of overlapping them.
    #[arg(long)]
    no_overlap: bool,
    /// Before each drain, move the backlog into an outbox partitioned by id
    /// range into this many partitions of equal size (0: the migrations'
    /// plain table): what partitioning does to a large backlog's drain.
    #[arg(long, default_value_t = 0)]
    partitions: usize,
    /// Internal: drain the backlog of this schema and namespace, print events/s and peak RSS, exit.
    /// The parent runs the drain in such a child, so that the relay's memory is measured alone.
    #[arg(long, hide = true, num_args = 2, value_names = ["SCHEMA", "NAMESPACE"])]
    drain_only: Option<Vec<String>>,
    /// A short run for CI: a few thousand events, one second of latency.
    #[arg(long)]
    smoke: bool,
}

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "bench", routing_key = "k.{key}", key = key)]
struct BenchEvent {
    key: u32,
    seq: u64,
    data: String,
}

impl BenchEvent {
    /// An event whose JSON is `payload` bytes long (or as near as its fields allow).
    fn sized(seq: u64, keys: u32, payload: usize) -> Self {
        let key = u32::try_from(seq % u64::from(keys.max(1))).unwrap_or(0);
        let mut event = Self {
            key,
            seq,
            data: String::new(),
        };
        let bare = serde_json::to_vec(&event).map_or(0, |json| json.len());
        event.data = "x".repeat(payload.saturating_sub(bare));
        event
    }
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Outbox(#[from] outbox_core::Error),
}

impl From<DbErr> for BenchError {
    fn from(error: DbErr) -> Self {
        Self::Outbox(error.into())
    }
}

/// A chunk of the backlog, in one transaction.
#[transactional]
async fn emit_backlog(
    db: &DatabaseConnection,
    from: u64,
    to: u64,
    keys: u32,
    payload: usize,
) -> Result<(), BenchError> {
    for seq in from..to {
        emit!(BenchEvent::sized(seq, keys, payload));
    }
    Ok(())
}

/// The handler measured: one business row and one event.
#[transactional]
async fn place_order(db: &DatabaseConnection, id: i64, payload: usize) -> Result<Uuid, BenchError> {
    insert_order(db, id).await?;
    Ok(emit!(BenchEvent::sized(id.unsigned_abs(), 1_000, payload)))
}

async fn insert_order(db: &impl ConnectionTrait, id: i64) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO bench_orders (id, total_cents) VALUES ($1, $2)",
        [id.into(), 100_i64.into()],
    ))
    .await?;
    Ok(())
}

/// The same work written by hand: the business row and the outbox row, one transaction.
async fn place_order_by_hand(
    db: &DatabaseConnection,
    id: i64,
    payload: usize,
) -> Result<(), BenchError> {
    let txn = db.begin().await?;
    insert_order(&txn, id).await?;
    let event = BenchEvent::sized(id.unsigned_abs(), 1_000, payload);
    let now = chrono::Utc::now();
    let row = outbox_message::ActiveModel {
        id: Set(Uuid::now_v7()),
        event_type: Set("BenchEvent".into()),
        event_version: Set(1),
        exchange: Set("bench".into()),
        subject: Set(format!("bench.k.{}", event.key)),
        partition_key: Set(Some(event.key.to_string())),
        payload: Set(serde_json::to_vec(&event).map_err(|e| DbErr::Custom(e.to_string()))?),
        headers: Set(None),
        content_type: Set("application/json".into()),
        created_at: Set(now),
        next_attempt_at: Set(now),
        ..Default::default()
    };
    outbox_message::Entity::insert(row)
        .exec_without_returning(&txn)
        .await?;
    txn.commit().await?;
    Ok(())
}

/// Only the business row.
async fn place_order_plain(db: &DatabaseConnection, id: i64) -> Result<(), BenchError> {
    let txn = db.begin().await?;
    insert_order(&txn, id).await?;
    txn.commit().await?;
    Ok(())
}

/// Records when each event's acknowledgement arrived (the batch's, to be exact).
struct TimedPublisher {
    inner: JetStreamPublisher,
    acked: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

impl TimedPublisher {
    fn record<'a>(
        &self,
        events: &[&outbox_message::Model],
        deliveries: impl IntoIterator<Item = Option<&'a Delivery>>,
    ) {
        let now = Instant::now();
        let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        for (event, delivery) in events.iter().zip(deliveries) {
            if matches!(delivery, Some(Delivery::Stored { .. })) {
                acked.insert(event.id, now);
            }
        }
    }
}

impl Publisher for TimedPublisher {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        let deliveries = self.inner.publish(events).await;
        self.record(events, deliveries.iter().map(Some));
        deliveries
    }

    async fn publish_in_key_order(&self, batch: &Batch<'_>) -> Vec<Option<Delivery>> {
        let deliveries = self.inner.publish_in_key_order(batch).await;
        self.record(batch.events(), deliveries.iter().map(Option::as_ref));
        deliveries
    }
}

struct Bench {
    args: Args,
    db: DatabaseConnection,
    admin: DatabaseConnection,
    schema: String,
    client: async_nats::Client,
    namespace: String,
    next_id: i64,
}

type BoxError = Box<dyn std::error::Error>;

/// Milliseconds from a handler's commit to the JetStream ack of its event
/// (`acked`) and, with a consumer running, to the consumer's handler of it
/// (`handled`): p50, p99, max.
struct Latency {
    acked: [f64; 3],
    handled: Option<[f64; 3]>,
    events: usize,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    // The draining relay runs on one thread, as the `outbox` binary does; the
    // rest (with the in-process relay of the latency run) as an application would.
    let mut runtime = if args.drain_only.is_some() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(mut args: Args) -> Result<(), BoxError> {
    if args.smoke {
        args.events = 3_000;
        args.naive_events = args.naive_events.min(300);
        args.seconds = 1;
        args.rate = args.rate.min(200);
        args.handler_calls = args.handler_calls.min(200);
        args.repeat = args.repeat.min(2);
        args.consumer_events = args.consumer_events.min(2_000);
    }
    if let Some(target) = args.drain_only.clone() {
        return drain_only(&args, &target[0], &target[1]).await;
    }
    let mut bench = Bench::connect(args).await?;
    let result = if bench.args.consumers_only {
        bench.consumers().await.map(|consumers| {
            consumers
                .into_figures()
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect()
        })
    } else {
        bench.run().await
    };
    bench.cleanup().await;
    let figures = result?;
    print_table(&bench.args, &figures);
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}

type Figures = serde_json::Map<String, serde_json::Value>;

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1/test".into())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into())
}

async fn connect_schema(schema: &str, connections: usize) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(database_url());
    options
        .set_schema_search_path(schema.to_owned())
        .max_connections(u32::try_from(connections).unwrap_or(u32::MAX))
        .sqlx_logging(false);
    Database::connect(options).await
}

fn publisher(client: async_nats::Client, args: &Args, namespace: &str) -> JetStreamPublisher {
    JetStreamPublisher::new(client)
        .ack_timeout(Duration::from_secs(10))
        .max_in_flight(args.in_flight)
        .namespace(namespace.to_owned())
}

/// Fills `outbox_scheduled` with `count` events due in a day, in one statement.
async fn schedule_for_tomorrow(db: &DatabaseConnection, count: u64) -> Result<(), DbErr> {
    if count == 0 {
        return Ok(());
    }
    let started = Instant::now();
    db.execute_unprepared(&format!(
        "INSERT INTO outbox_scheduled (id, event_type, event_version, exchange, subject, \
         partition_key, payload, content_type, created_at, deliver_at) \
         SELECT gen_random_uuid(), 'BenchEvent', 1, 'bench', 'bench.k.' || (n % 1000), \
         (n % 1000)::text, convert_to('{{}}', 'UTF8'), 'application/json', now(), \
         now() + interval '1 day' + n * interval '1 microsecond' \
         FROM generate_series(1, {count}) AS n"
    ))
    .await?;
    db.execute_unprepared("ANALYZE outbox_scheduled").await?;
    eprintln!(
        "{count} events scheduled for tomorrow in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The child process of [`Bench::relay_drain`]: one relay drains the backlog until the outbox is empty.
async fn drain_only(args: &Args, schema: &str, namespace: &str) -> Result<(), BoxError> {
    let db = connect_schema(schema, 16).await?;
    let client = async_nats::connect(nats_url()).await?;
    let relay = Relay::builder(db, publisher(client, args, namespace))
        .batch_size(args.batch)
        .async_commit(args.async_commit)
        .overlap_rounds(!args.no_overlap)
        .vacuum_after(Some(args.vacuum_after).filter(|&n| n > 0))
        .build();
    // The services' CPU is read here, while this relay's database sessions
    // are open: once they close, a backend's time is lost to /proc until the
    // postmaster has reaped it.
    let (services, own) = (ServiceCpu::now(), own_cpu_seconds());
    let started = Instant::now();
    let drained = relay.drain().await?.published;
    let rate = drained as f64 / started.elapsed().as_secs_f64();
    let services = services.since();
    let figures = serde_json::json!({
        "relay_drain_eps": rate,
        "relay_rss_mib": peak_rss_mib(),
        "relay_cpu_s": own_cpu_seconds() - own,
        "nats_cpu_s": services.nats,
        "postgres_cpu_s": services.postgres,
    });
    println!("{figures}");
    Ok(())
}

impl Bench {
    async fn connect(args: Args) -> Result<Self, BoxError> {
        let admin = Database::connect(&database_url()).await?;
        let schema = format!("outbox_bench_{}", Uuid::now_v7().simple());
        admin
            .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
            .await?;
        let db = connect_schema(&schema, 16).await?;
        outbox_core::migrate(&db).await?;
        schedule_for_tomorrow(&db, args.scheduled).await?;
        db.execute_unprepared(
            "CREATE TABLE bench_orders (id BIGINT PRIMARY KEY, total_cents BIGINT NOT NULL)",
        )
        .await?;
        let client = async_nats::connect(nats_url()).await?;
        let namespace = format!("bench{}", Uuid::now_v7().simple());
        Ok(Self {
            args,
            db,
            admin,
            schema,
            client,
            namespace,
            next_id: 0,
        })
    }

    async fn cleanup(&self) {
        self.delete_streams(self.publisher().context()).await;
        let _ = self
            .admin
            .execute_unprepared(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await;
    }

    /// The raw runs' stream and the relay's (which the consumers read), in
    /// this run's namespace.
    fn streams(&self) -> [StreamSpec; 2] {
        [
            StreamSpec::for_exchange("RAW", "raw", Some(&self.namespace)),
            StreamSpec::for_exchange("BENCH", "bench", Some(&self.namespace)),
        ]
    }

    /// The consumer section, on a fresh `BENCH` stream filled with
    /// `consumer_events` events as the relay would have published them.
    async fn consumers(&self) -> Result<consumer::ConsumerFigures, BoxError> {
        self.fresh_streams().await?;
        let messages = self.messages("bench", self.args.consumer_events, true)?;
        self.send(messages).await?;
        let pool = connect_schema(&self.schema, self.args.consumer_in_flight + 8).await?;
        let publisher = self.publisher();
        let stream = self.streams()[1].name.clone();
        let section = consumer::Section {
            db: &pool,
            context: publisher.context(),
            client: &self.client,
            namespace: &self.namespace,
            stream: &stream,
            events: self.args.consumer_events,
            keys: self.args.keys,
            in_flight: self.args.consumer_in_flight,
            batch: self.args.consumer_batch,
            repeat: self.args.repeat.min(3),
        };
        section.run().await
    }

    async fn delete_streams(&self, context: &Context) {
        for stream in self.streams() {
            let _ = context.delete_stream(&stream.name).await;
        }
    }

    /// Empty streams for the next phase: nats-server's cost per message grows
    /// with what its streams hold, so a phase would otherwise pay for the
    /// ones before it.
    async fn fresh_streams(&self) -> Result<(), BoxError> {
        let publisher = self.publisher();
        self.delete_streams(publisher.context()).await;
        provision(
            publisher.context(),
            &self.streams(),
            Duration::from_secs(600),
        )
        .await?;
        Ok(())
    }

    fn publisher(&self) -> JetStreamPublisher {
        publisher(self.client.clone(), &self.args, &self.namespace)
    }

    async fn run(&mut self) -> Result<Figures, BoxError> {
        let publisher = self.publisher();
        let mut figures = Figures::new();
        let a = &self.args;
        for (name, value) in [
            ("events", a.events),
            ("payload_bytes", a.payload),
            ("batch_size", a.batch),
            ("in_flight", a.in_flight),
            ("keys", a.keys as usize),
        ] {
            figures.insert(name.into(), value.into());
        }

        figures.insert("async_commit".into(), self.args.async_commit.into());
        figures.insert("overlap_rounds".into(), (!self.args.no_overlap).into());
        figures.insert("partitions".into(), self.args.partitions.into());
        figures.insert("repeat".into(), self.args.repeat.into());
        self.fresh_streams().await?;
        let services = ServiceCpu::now();
        let raw_headers = self.raw_jetstream(true).await?;
        let raw_headers_nats = services.since().nats;
        let mut before = self.raw_run().await?;
        // Measured back to back: what the relay's five other headers cost the broker.
        let headers_over_raw = raw_headers / before.eps;
        eprintln!(
            "raw JetStream: {:.0} events/s ({raw_headers:.0} with the relay's headers)",
            before.eps
        );
        // The machine's speed drifts by a fifth within a minute on a shared
        // host: each drain is compared with the mean of the raw runs on
        // either side of it, and the median of these pairs is reported.
        let mut pairs = Vec::new();
        for run in 1..=self.args.repeat {
            self.backlog(self.args.events).await?;
            self.fresh_streams().await?;
            let drain = self.relay_drain().await?;
            let after = self.raw_run().await?;
            let pair = Pair {
                before,
                drain,
                after,
            };
            eprintln!(
                "run {run}/{}: relay drain {:.0} events/s (peak RSS {:.1} MiB), \
                 raw {:.0} after it: ratio {:.3}",
                self.args.repeat,
                drain.eps,
                drain.rss_mib,
                after.eps,
                pair.ratio()
            );
            pairs.push(pair);
            before = after;
        }
        let ratios: Vec<f64> = pairs.iter().map(|pair| round3(pair.ratio())).collect();
        let peak_rss = (pairs.iter()).fold(0.0, |peak: f64, pair| peak.max(pair.drain.rss_mib));
        pairs.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        // With an even count, the lower of the two middle pairs: a ratio the
        // target wants high is not rounded up (`median` rounds a cost up).
        let median_pair = pairs[(pairs.len() - 1) / 2];
        let Pair {
            before,
            drain,
            after,
        } = median_pair;
        let raw = median_pair.raw_eps();
        // CPU time per event of every process involved: on a machine where
        // they share the cores, this bounds the rate more than any latency.
        let per_event = |seconds: f64| round3(seconds * 1e6 / self.args.events as f64);
        let drain_total = drain.services.total() + drain.relay_cpu_s;
        for (name, value) in [
            (
                "raw_cpu_us_per_event",
                per_event(before.nats_cpu_s + before.publisher_cpu_s),
            ),
            ("raw_cpu_us_nats", per_event(before.nats_cpu_s)),
            ("raw_cpu_us_publisher", per_event(before.publisher_cpu_s)),
            ("raw_all_headers_cpu_us_nats", per_event(raw_headers_nats)),
            ("drain_cpu_us_per_event", per_event(drain_total)),
            ("drain_cpu_us_nats", per_event(drain.services.nats)),
            ("drain_cpu_us_postgres", per_event(drain.services.postgres)),
            ("drain_cpu_us_relay", per_event(drain.relay_cpu_s)),
            (
                "cpu_bound_drain_eps",
                round(cores() * self.args.events as f64 / drain_total),
            ),
        ] {
            figures.insert(name.into(), value.into());
        }
        figures.insert("raw_jetstream_eps".into(), round(raw).into());
        figures.insert("raw_jetstream_before_eps".into(), round(before.eps).into());
        figures.insert("raw_jetstream_after_eps".into(), round(after.eps).into());
        figures.insert("relay_drain_eps".into(), round(drain.eps).into());
        figures.insert("drain_ratio".into(), round3(median_pair.ratio()).into());
        figures.insert("drain_ratio_runs".into(), ratios.into());
        figures.insert(
            "raw_jetstream_all_headers_eps".into(),
            round(raw_headers).into(),
        );
        figures.insert(
            "raw_all_headers_over_raw".into(),
            round3(headers_over_raw).into(),
        );
        figures.insert("relay_rss_mib".into(), round3(peak_rss).into());
        figures.insert("scheduled_pending".into(), self.args.scheduled.into());
        let idle = self.idle_drain(&publisher).await?;
        eprintln!("an empty outbox's drain: {idle:.1} µs");
        figures.insert("idle_drain_us".into(), round3(idle).into());
        if self.args.naive_events > 0 {
            self.backlog(self.args.naive_events).await?;
            let naive = self.naive_relay(&publisher).await?;
            eprintln!("naive relay: {naive:.0} events/s");
            figures.insert("naive_relay_eps".into(), round(naive).into());
            figures.insert("drain_over_naive".into(), round3(drain.eps / naive).into());
        }
        self.truncate_outbox().await?;
        let latency = self.latency(publisher.clone(), false).await?;
        figures.insert("latency_events".into(), latency.events.into());
        figures.insert("latency_rate_eps".into(), self.args.rate.into());
        let [p50, p99, max] = latency.acked;
        figures.insert("latency_p50_ms".into(), round3(p50).into());
        figures.insert("latency_p99_ms".into(), round3(p99).into());
        figures.insert("latency_max_ms".into(), round3(max).into());
        // A second run with a consumer of the relay's stream in the process.
        self.truncate_outbox().await?;
        let e2e = self.latency(publisher, true).await?.handled;
        let [p50, p99, max] = e2e.unwrap_or([f64::NAN; 3]);
        figures.insert("e2e_latency_p50_ms".into(), round3(p50).into());
        figures.insert("e2e_latency_p99_ms".into(), round3(p99).into());
        figures.insert("e2e_latency_max_ms".into(), round3(max).into());
        self.truncate_outbox().await?;
        let (manual, plain) = self.handler_overhead().await?;
        figures.insert("handler_ratio_manual".into(), round3(manual).into());
        figures.insert("handler_ratio_plain".into(), round3(plain).into());
        let consumers = self.consumers().await?;
        // The consumer issue's target reads consumer_eps >= 0.25 x relay_drain_eps.
        figures.insert(
            "consumer_over_relay".into(),
            round3(consumers.consumer_eps() / drain.eps).into(),
        );
        for (name, value) in consumers.into_figures() {
            figures.insert(name.into(), value);
        }
        Ok(figures)
    }

    /// Microseconds of a drain that finds nothing (the median of 200): what
    /// each wake of an idle relay costs, scheduled events included.
    async fn idle_drain(&self, publisher: &JetStreamPublisher) -> Result<f64, BoxError> {
        self.truncate_outbox().await?;
        let relay = Relay::builder(self.db.clone(), publisher.clone()).build();
        let mut took = Vec::with_capacity(200);
        for _ in 0..200 {
            let started = Instant::now();
            relay.drain().await?;
            took.push(started.elapsed().as_secs_f64() * 1e6);
        }
        took.sort_by(f64::total_cmp);
        Ok(took[took.len() / 2])
    }

    /// The ceiling: the same payloads straight to JetStream, `in_flight` acks
    /// pipelined, with `Nats-Msg-Id` only, or with every header the relay sends.
    async fn raw_jetstream(&self, all_headers: bool) -> Result<f64, BoxError> {
        let messages = self.messages("raw", self.args.events, all_headers)?;
        let started = Instant::now();
        self.send(messages).await?;
        Ok(self.args.events as f64 / started.elapsed().as_secs_f64())
    }

    /// `count` events of `exchange` as messages, with `Nats-Msg-Id` only or
    /// with every header the relay sends.
    fn messages(
        &self,
        exchange: &str,
        count: usize,
        all_headers: bool,
    ) -> Result<Vec<(String, PublishMessage)>, outbox_nats::InvalidHeader> {
        let now = chrono::Utc::now();
        (0..count as u64)
            .map(|seq| {
                let event = BenchEvent::sized(seq, self.args.keys, self.args.payload);
                let payload = serde_json::to_vec(&event).unwrap_or_default();
                let row = outbox_message::Model {
                    id: Uuid::now_v7(),
                    event_type: "BenchEvent".into(),
                    event_version: 1,
                    exchange: exchange.into(),
                    subject: format!("{exchange}.k.{}", event.key),
                    partition_key: Some(event.key.to_string()),
                    payload,
                    headers: None,
                    content_type: "application/json".into(),
                    created_at: now,
                    attempts: 0,
                    next_attempt_at: now,
                    last_error: None,
                    delivered_at: None,
                };
                let headers = if all_headers {
                    outbox_nats::headers(&row)?
                } else {
                    let mut only_id = HeaderMap::new();
                    only_id.insert(outbox_core::headers::MSG_ID, row.id.to_string().as_str());
                    only_id
                };
                let subject = format!("{}.{}", self.namespace, row.subject);
                Ok((
                    subject,
                    PublishMessage::build()
                        .payload(row.payload.into())
                        .headers(headers),
                ))
            })
            .collect()
    }

    /// Publishes `messages` with `in_flight` acks pipelined.
    async fn send(&self, messages: Vec<(String, PublishMessage)>) -> Result<(), BoxError> {
        let context = self.publisher().context().clone();
        let mut acks = FuturesOrdered::new();
        for (subject, message) in messages {
            acks.push_back(context.send_publish(subject, message).await?.into_future());
            if acks.len() >= self.args.in_flight {
                acks.next().await.transpose()?;
            }
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        Ok(())
    }

    /// A raw run into fresh streams, with the CPU that it and nats-server used.
    async fn raw_run(&self) -> Result<RawRun, BoxError> {
        self.fresh_streams().await?;
        let (services, own) = (ServiceCpu::now(), own_cpu_seconds());
        let eps = self.raw_jetstream(false).await?;
        Ok(RawRun {
            eps,
            nats_cpu_s: services.since().nats,
            publisher_cpu_s: own_cpu_seconds() - own,
        })
    }

    /// A drain leaves the outbox full of dead rows until autovacuum, which
    /// the next phase's claims and commits would step over: each phase starts
    /// on an empty table instead.
    async fn truncate_outbox(&self) -> Result<(), DbErr> {
        self.db
            .execute_unprepared("TRUNCATE outbox_messages")
            .await
            .map(drop)
    }

    /// Commits `count` events to an emptied outbox (not measured).
    async fn backlog(&self, count: usize) -> Result<(), BoxError> {
        self.truncate_outbox().await?;
        let (count, chunk) = (count as u64, 2_500);
        for from in (0..count).step_by(chunk) {
            emit_backlog(
                &self.db,
                from,
                (from + chunk as u64).min(count),
                self.args.keys,
                self.args.payload,
            )
            .await?;
        }
        if self.args.partitions > 0 {
            self.partition_outbox(count as usize).await?;
        }
        Ok(())
    }

    /// Moves the backlog into a new `outbox_messages` partitioned by id range
    /// into `--partitions` partitions of equal size, the last one open-ended
    /// for what comes later, and vacuums it (not measured: a copy of every
    /// row).
    async fn partition_outbox(&self, count: usize) -> Result<(), DbErr> {
        let parts = self.args.partitions;
        self.db
            .execute_unprepared(
                "ALTER TABLE outbox_messages RENAME TO outbox_messages_filled; \
                 CREATE TABLE outbox_messages (LIKE outbox_messages_filled INCLUDING ALL) \
                 PARTITION BY RANGE (id)",
            )
            .await?;
        let mut bounds = vec!["MINVALUE".to_owned()];
        for k in 1..parts {
            let nth = format!(
                "SELECT id FROM outbox_messages_filled ORDER BY id OFFSET {} LIMIT 1",
                k * count / parts
            );
            let row = self
                .db
                .query_one_raw(Statement::from_string(DbBackend::Postgres, nth));
            if let Some(row) = row.await? {
                bounds.push(format!("'{}'", row.try_get_by_index::<Uuid>(0)?));
            }
        }
        bounds.push("MAXVALUE".to_owned());
        let tag = Uuid::now_v7().simple();
        for (k, range) in bounds.windows(2).enumerate() {
            let [from, to] = range else { continue };
            self.db
                .execute_unprepared(&format!(
                    "CREATE TABLE outbox_messages_{tag}_{k} PARTITION OF outbox_messages \
                     FOR VALUES FROM ({from}) TO ({to})"
                ))
                .await?;
        }
        self.db
            .execute_unprepared(
                "INSERT INTO outbox_messages SELECT * FROM outbox_messages_filled; \
                 DROP TABLE outbox_messages_filled",
            )
            .await?;
        // What autovacuum does to a table filled over minutes, and would not
        // have done yet to a copy made a moment ago: without it, the relay's
        // first vacuum reads every partition whole during the drain.
        self.db
            .execute_unprepared("VACUUM ANALYZE outbox_messages")
            .await
            .map(drop)
    }

    /// One relay, in a process of its own, drains the backlog.
    async fn relay_drain(&self) -> Result<DrainRun, BoxError> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?);
        child
            .args(["--drain-only", &self.schema, &self.namespace])
            .args([
                "--batch",
                &self.args.batch.to_string(),
                "--in-flight",
                &self.args.in_flight.to_string(),
                "--vacuum-after",
                &self.args.vacuum_after.to_string(),
            ]);
        if self.args.async_commit {
            child.arg("--async-commit");
        }
        if self.args.no_overlap {
            child.arg("--no-overlap");
        }
        let output = child.output().await?;
        if !output.status.success() {
            return Err(format!(
                "the drain process failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let figures: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let get = |name: &str| {
            figures[name]
                .as_f64()
                .ok_or_else(|| format!("the drain process printed no {name}"))
        };
        Ok(DrainRun {
            eps: get("relay_drain_eps")?,
            rss_mib: get("relay_rss_mib")?,
            relay_cpu_s: get("relay_cpu_s")?,
            services: ServiceCpu {
                nats: get("nats_cpu_s")?,
                postgres: get("postgres_cpu_s")?,
            },
        })
    }

    /// The design outbox articles show: 100 rows, one publish and ack at a time, one delete each.
    async fn naive_relay(&self, publisher: &JetStreamPublisher) -> Result<f64, BoxError> {
        let context = publisher.context().clone();
        let started = Instant::now();
        let mut published = 0;
        loop {
            let rows = outbox_message::Entity::find()
                .order_by_asc(outbox_message::Column::Id)
                .limit(100)
                .all(&self.db)
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let subject = format!("{}.{}", self.namespace, row.subject);
                let message = PublishMessage::build()
                    .payload(row.payload.clone().into())
                    .headers(outbox_nats::headers(&row)?);
                context.send_publish(subject, message).await?.await?;
                outbox_message::Entity::delete_by_id(row.id)
                    .exec(&self.db)
                    .await?;
                published += 1;
            }
        }
        Ok(published as f64 / started.elapsed().as_secs_f64())
    }

    /// Commit → JetStream ack of single-event handlers at a fixed offered rate, relay in process.
    /// Commits single-event handlers at `--rate` for `--seconds` with a relay
    /// running, and, if `consume`, a `Consumer` of the relay's stream too.
    async fn latency(
        &mut self,
        publisher: JetStreamPublisher,
        consume: bool,
    ) -> Result<Latency, BoxError> {
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let stream = self.streams()[1].name.clone();
        let (consumer, handled) = if consume {
            let (consumer, handled) = consumer::stamping(
                &self.client,
                &self.db,
                publisher.context(),
                &self.namespace,
                &stream,
            )
            .await?;
            (Some(consumer), Some(handled))
        } else {
            (None, None)
        };
        let relay = Relay::builder(
            self.db.clone(),
            TimedPublisher {
                inner: publisher,
                acked: acked.clone(),
            },
        )
        .batch_size(self.args.batch)
        .overlap_rounds(!self.args.no_overlap)
        .spawn();
        let total = (u64::from(self.args.rate) * self.args.seconds) as usize;
        let period = Duration::from_secs(1) / self.args.rate.max(1);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut calls = Vec::with_capacity(total);
        for _ in 0..total {
            ticks.tick().await;
            self.next_id += 1;
            let (db, id, payload) = (self.db.clone(), self.next_id, self.args.payload);
            calls.push(tokio::spawn(async move {
                let event = place_order(&db, id, payload).await;
                event.map(|event| (event, Instant::now()))
            }));
        }
        let mut committed = Vec::with_capacity(total);
        for call in calls {
            committed.push(call.await??);
        }
        let count = |map: &Mutex<HashMap<Uuid, Instant>>| {
            map.lock().unwrap_or_else(|p| p.into_inner()).len()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let done =
            || count(&acked) >= total && handled.as_deref().is_none_or(|h| count(h) >= total);
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        relay.shutdown().await?;
        if let Some(consumer) = consumer {
            consumer.shutdown().await?;
        }
        let percentiles = |reached: &Mutex<HashMap<Uuid, Instant>>| {
            let reached = reached.lock().unwrap_or_else(|p| p.into_inner());
            let mut millis: Vec<f64> = (committed.iter())
                .map(|(id, at)| {
                    reached.get(id).map_or(f64::INFINITY, |then| {
                        then.saturating_duration_since(*at).as_secs_f64() * 1e3
                    })
                })
                .collect();
            millis.sort_by(f64::total_cmp);
            let pick = |q: f64| millis[((millis.len() - 1) as f64 * q).round() as usize];
            [pick(0.5), pick(0.99), pick(1.0)]
        };
        Ok(Latency {
            acked: percentiles(&acked),
            handled: handled.as_deref().map(percentiles),
            events: total,
        })
    }

    /// `#[transactional]` over the hand-written transaction, and over the
    /// business row alone: the median over rounds of each round's ratio. A
    /// round runs the three variants back to back, in an order that rotates,
    /// so that drift, or a checkpoint landing in one round, does not weigh on
    /// one variant (each call waits for a WAL flush, whose time varies most).
    async fn handler_overhead(&mut self) -> Result<(f64, f64), BoxError> {
        const ROUNDS: usize = 30;
        let per_round = self.args.handler_calls.div_ceil(ROUNDS);
        let (mut over_manual, mut over_plain) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let mut took = [0.0; 3];
            for offset in 0..3 {
                let variant = (round + offset) % 3;
                let started = Instant::now();
                for _ in 0..per_round {
                    self.next_id += 1;
                    let (db, id) = (&self.db, self.next_id);
                    match variant {
                        0 => {
                            place_order(db, id, self.args.payload).await?;
                        }
                        1 => place_order_by_hand(db, id, self.args.payload).await?,
                        _ => place_order_plain(db, id).await?,
                    }
                }
                took[variant] = started.elapsed().as_secs_f64();
            }
            over_manual.push(took[0] / took[1]);
            over_plain.push(took[0] / took[2]);
        }
        Ok((median(over_manual), median(over_plain)))
    }
}

/// A raw publish run: events/s, and the CPU seconds of nats-server and of the publisher.
#[derive(Debug, Clone, Copy)]
struct RawRun {
    eps: f64,
    nats_cpu_s: f64,
    publisher_cpu_s: f64,
}

/// A drain: events/s, the relay's peak RSS, and the CPU seconds of the
/// relay and of the services.
#[derive(Debug, Clone, Copy)]
struct DrainRun {
    eps: f64,
    rss_mib: f64,
    relay_cpu_s: f64,
    services: ServiceCpu,
}

/// A drain and the raw runs on either side of it.
#[derive(Debug, Clone, Copy)]
struct Pair {
    before: RawRun,
    drain: DrainRun,
    after: RawRun,
}

impl Pair {
    /// The ceiling the drain is compared with: the mean of its two raw runs.
    fn raw_eps(&self) -> f64 {
        (self.before.eps + self.after.eps) / 2.0
    }

    fn ratio(&self) -> f64 {
        self.drain.eps / self.raw_eps()
    }
}

/// The median of costs (handler time ratios, lower is better); with an even
/// count, the higher of the two middle values, so that a cost is not rounded down.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// CPU seconds (user + system) used so far by the processes named
/// `nats-server` and `postgres` (every backend), read from /proc; NaN elsewhere.
#[derive(Debug, Clone, Copy)]
struct ServiceCpu {
    nats: f64,
    postgres: f64,
}

impl ServiceCpu {
    fn now() -> Self {
        let mut cpu = Self {
            nats: 0.0,
            postgres: 0.0,
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self {
                nats: f64::NAN,
                postgres: f64::NAN,
            };
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
                continue;
            };
            let slot = match name.trim() {
                "nats-server" => &mut cpu.nats,
                "postgres" => &mut cpu.postgres,
                _ => continue,
            };
            *slot += cpu_seconds(&path.join("stat")).unwrap_or(0.0);
        }
        cpu
    }

    /// What was used since `self` was taken.
    fn since(self) -> Self {
        let now = Self::now();
        Self {
            nats: now.nats - self.nats,
            postgres: now.postgres - self.postgres,
        }
    }

    fn total(self) -> f64 {
        self.nats + self.postgres
    }
}

/// User + system CPU seconds of one process and of its children that have
/// exited (so that a PostgreSQL backend that closed counts, through the
/// postmaster that reaped it), from `/proc/<pid>/stat` (fields 14 to 17, in
/// clock ticks of 1/100 s on Linux).
fn cpu_seconds(stat: &std::path::Path) -> Option<f64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // The command name may hold spaces; the fields after it start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)? + ticks(13)? + ticks(14)?) / 100.0)
}

fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::path::Path::new("/proc/self/stat")).unwrap_or(f64::NAN)
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(f64::NAN, |n| n.get() as f64)
}

fn round(x: f64) -> f64 {
    x.round()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_table(args: &Args, figures: &Figures) {
    println!(
        "\noutbox benchmark: {} events, {} B payloads, batch {}, {} acks in flight, {} keys, \
         async commit {}, overlapped rounds {}",
        args.events,
        args.payload,
        args.batch,
        args.in_flight,
        args.keys,
        args.async_commit,
        !args.no_overlap
    );
    println!("{:<24} {:>14}", "figure", "value");
    for (name, value) in figures {
        println!("{name:<24} {value:>14}");
    }
}
