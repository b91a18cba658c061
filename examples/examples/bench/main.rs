//! The benchmark: our relay and handlers against the raw limits of the same
//! PostgreSQL and NATS, in one run, so that the ratios hold on any machine.
//!
//! ```sh
//! cargo run --release --example bench                 # the full run (100,000 events)
//! cargo run --release --example bench -- --events 1000000 --naive-events 0
//! cargo run --release --example bench -- --logical     # the logical relay against polling
//! cargo run --example bench -- --smoke                # a few thousand events, for CI
//! ```
//!
//! What each file holds: `write_path` (the event and the handler variants),
//! `relay_runs` (raw JetStream, the relay's drains, latency), `consumer` (the
//! consumer section), `handover` (a group's handover), `logical` (the
//! logical relay's section, on a private PostgreSQL), `measure` (medians,
//! CPU, memory, the table).
//!
//! Needs PostgreSQL (`DATABASE_URL`) and NATS (`NATS_URL`); works in a schema
//! and a stream namespace of its own, removed at the end. Prints a table, then
//! one JSON object as the last line.

mod consumer;
mod handover;
mod logical;
mod measure;
mod relay_runs;
mod write_path;

use measure::{Pair, ServiceCpu, cores, own_cpu_seconds, peak_rss_mib, print_table, round, round3};
use write_path::BenchEvent;

use outbox_nats::async_nats;
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_core::relay::Relay;
use outbox_core::uuid::Uuid;
use outbox_nats::async_nats::jetstream::Context;
use outbox_nats::{JetStreamPublisher, StreamSpec, provision};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

#[derive(Parser, Debug)]
#[command(
    about = "Relay throughput, latency and handler overhead against raw JetStream and SeaORM"
)]
struct Args {
    /// The PostgreSQL server (a schema of the run's own is created in it).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1/test",
        hide_env_values = true
    )]
    database_url: String,
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
    /// Run the logical relay's section only, on a private PostgreSQL started
    /// with `wal_level = logical`: its drains and latency against the
    /// polling relay's on the same server, and raw JetStream.
    #[arg(long)]
    logical: bool,
    /// The logical section's large backlog, drained once to compare its
    /// rate with the `--events` drains'; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    logical_backlog: usize,
    /// Internal, with --drain-only: drain through the logical relay.
    #[arg(long, hide = true)]
    drain_logical: bool,
    /// Group members killed in turn to time the handover of their partitions; 0 skips it.
    #[arg(long, default_value_t = 4)]
    handover_rounds: u32,
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
    /// Internal: run a member of the handover's group in this schema and namespace, print its
    /// id, and run until killed or until standard input ends.
    #[arg(long, hide = true, num_args = 2, value_names = ["SCHEMA", "NAMESPACE"])]
    member: Option<Vec<String>>,
    /// A short run for CI: a few thousand events, one second of latency.
    #[arg(long)]
    smoke: bool,
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

/// Which relay a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The default relay, claiming rows.
    Polling,
    /// The logical relay, reading the slot.
    Logical,
}

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
        args.handover_rounds = args.handover_rounds.min(1);
        args.logical_backlog = args.logical_backlog.min(3 * args.events);
    }
    if let Some(target) = args.drain_only.clone() {
        return match args.drain_logical {
            true => logical::drain_only(&args, &target[0], &target[1]).await,
            false => drain_only(&args, &target[0], &target[1]).await,
        };
    }
    if let Some(target) = args.member.clone() {
        return handover::member_only(&args.database_url, &target[0], &target[1]).await;
    }
    // The logical section's server, stopped when the run ends.
    let private = match args.logical {
        true => Some(logical::PrivateServer::start(&mut args).await?),
        false => None,
    };
    let mut bench = Bench::connect(args).await?;
    let result = if bench.args.logical {
        bench.logical().await
    } else if bench.args.consumers_only {
        match bench.consumers().await {
            Ok(consumers) => bench.handover_figures().await.map(|handover| {
                (consumers.into_figures().into_iter())
                    .chain(handover)
                    .map(|(name, value)| (name.to_owned(), value))
                    .collect()
            }),
            Err(error) => Err(error),
        }
    } else {
        bench.run().await
    };
    bench.cleanup().await;
    drop(private);
    let figures = result?;
    print_table(&bench.args, &figures);
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}

type Figures = serde_json::Map<String, serde_json::Value>;

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into())
}

async fn connect_schema(
    url: &str,
    schema: &str,
    connections: usize,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
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
    let db = connect_schema(&args.database_url, schema, 16).await?;
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
        let admin = Database::connect(&args.database_url).await?;
        let schema = format!("outbox_bench_{}", Uuid::now_v7().simple());
        admin
            .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
            .await?;
        let db = connect_schema(&args.database_url, &schema, 16).await?;
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
        let messages = self.messages("bench", 0..self.args.consumer_events as u64, true)?;
        self.send(messages).await?;
        let pool = connect_schema(
            &self.args.database_url,
            &self.schema,
            self.args.consumer_in_flight + 8,
        )
        .await?;
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

    /// The handover's figures, unless `--handover-rounds 0`.
    async fn handover_figures(&self) -> Result<Vec<(&'static str, serde_json::Value)>, BoxError> {
        match self.args.handover_rounds {
            0 => Ok(Vec::new()),
            rounds => Ok(self.handover(rounds).await?.into_figures()),
        }
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
            let drain = self.relay_drain(Source::Polling, self.args.events).await?;
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
        let latency = (self.latency(publisher.clone(), Source::Polling, false)).await?;
        figures.insert("latency_events".into(), latency.events.into());
        figures.insert("latency_rate_eps".into(), self.args.rate.into());
        let [p50, p99, max] = latency.acked;
        figures.insert("latency_p50_ms".into(), round3(p50).into());
        figures.insert("latency_p99_ms".into(), round3(p99).into());
        figures.insert("latency_max_ms".into(), round3(max).into());
        // A second run with a consumer of the relay's stream in the process.
        self.truncate_outbox().await?;
        let e2e = self
            .latency(publisher, Source::Polling, true)
            .await?
            .handled;
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
        for (name, value) in self.handover_figures().await? {
            figures.insert(name.into(), value);
        }
        Ok(figures)
    }
}
