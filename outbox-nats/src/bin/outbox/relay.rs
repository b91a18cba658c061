//! `outbox relay`: deliver committed events until interrupted.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;
use clap::ValueEnum;
use outbox_core::relay::logical::{LogicalError, LogicalRelay};
use outbox_core::relay::{MAX_BATCH_SIZE, MIN_POLL_INTERVAL, Relay, RelayConfig};
use outbox_nats::{JetStreamPublisher, StreamSettings, StreamSpec, provision};
use sea_orm::DatabaseConnection;

use crate::nats::NatsArgs;

#[derive(clap::Args)]
pub(crate) struct RelayArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// A stream to create or check at start, as NAME=EXCHANGE (captures EXCHANGE.>); repeatable,
    /// or comma-separated in the variable. Without any, streams are not provisioned.
    #[arg(long = "stream", env = "OUTBOX_STREAMS", value_delimiter = ',', value_parser = parse_stream)]
    streams: Vec<(String, String)>,
    /// Replicas of each --stream (an existing stream with others is an error).
    #[arg(long, env = "OUTBOX_STREAM_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    stream_replicas: Option<u8>,
    /// Storage of each --stream created.
    #[arg(long, env = "OUTBOX_STREAM_STORAGE")]
    stream_storage: Option<Storage>,
    /// Seconds a --stream created keeps a message.
    #[arg(long, env = "OUTBOX_STREAM_MAX_AGE", value_parser = parse_seconds, allow_hyphen_values = true)]
    stream_max_age: Option<f64>,
    /// Bytes a --stream created holds at most (its oldest messages go first).
    #[arg(long, env = "OUTBOX_STREAM_MAX_BYTES")]
    stream_max_bytes: Option<u64>,
    /// Prefix of every subject and stream name.
    #[arg(long, env = "OUTBOX_NAMESPACE")]
    namespace: Option<String>,
    /// Events per round (1 to 10000).
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = RelayConfig::default().batch_size,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_BATCH_SIZE as u64))]
    batch_size: usize,
    /// Attempts before a rejected event is dead-lettered (1 or more).
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = RelayConfig::default().max_attempts,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// Seconds between polls when nothing else wakes the relay (0.01 to 3600).
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value_t = RelayConfig::default().poll_interval.as_secs_f64(), value_parser = parse_poll_interval, allow_hyphen_values = true)]
    poll_interval: f64,
    /// Deleted events between the relay's own `VACUUM outbox_messages`
    /// (PostgreSQL; 0: never, leaving it to autovacuum).
    #[arg(long, env = "OUTBOX_VACUUM_AFTER", default_value_t = RelayConfig::default().vacuum_after.unwrap_or(0))]
    vacuum_after: u64,
    /// Whether to create or upgrade the outbox tables at start. `false` (or
    /// --no-migrate) when they are your own migrator's or `outbox migrate`'s
    /// job: the relay then only checks that they exist.
    #[arg(long, env = "OUTBOX_MIGRATE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    migrate: bool,
    /// The same as --migrate false.
    #[arg(long)]
    no_migrate: bool,
    /// Where events come from: `polling` claims rows of the outbox table
    /// (every database); `logical` reads PostgreSQL's write-ahead log
    /// through a replication slot (`wal_level = logical`, a role with
    /// REPLICATION; see `outbox slot drop` to go back).
    #[arg(long, env = "OUTBOX_RELAY_SOURCE", default_value = "polling")]
    source: Source,
    /// The replication slot of `--source logical` (default `outbox_<schema>`).
    #[arg(long, env = "OUTBOX_SLOT")]
    slot: Option<String>,
    /// Serve the relay's metrics in Prometheus text format on this address
    /// (e.g. 127.0.0.1:9464), at any path.
    #[arg(long, env = "OUTBOX_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    Polling,
    Logical,
}

#[derive(Clone, Copy, ValueEnum)]
enum Storage {
    File,
    Memory,
}

fn parse_stream(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((name, exchange)) if !name.is_empty() && !exchange.is_empty() => {
            Ok((name.to_owned(), exchange.to_owned()))
        }
        _ => Err(format!(
            "`{value}` is not NAME=EXCHANGE, e.g. ORDERS=orders"
        )),
    }
}

/// A number of seconds, 0 or more.
pub(crate) fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("`{value}` is not a number of seconds (0 or more)")),
    }
}

/// A poll interval: 0 would poll without pause, a busy loop.
fn parse_poll_interval(value: &str) -> Result<f64, String> {
    match parse_seconds(value)? {
        seconds if (MIN_POLL_INTERVAL.as_secs_f64()..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("`{value}` is outside 0.01 to 3600 seconds")),
    }
}

impl RelayArgs {
    fn settings(&self) -> StreamSettings {
        let mut settings = StreamSettings::default();
        if let Some(replicas) = self.stream_replicas {
            settings = settings.replicas(usize::from(replicas));
        }
        if let Some(storage) = self.stream_storage {
            settings = settings.storage(match storage {
                Storage::File => StorageType::File,
                Storage::Memory => StorageType::Memory,
            });
        }
        if let Some(max_age) = self.stream_max_age {
            settings = settings.max_age(Duration::from_secs_f64(max_age));
        }
        if let Some(max_bytes) = self.stream_max_bytes {
            settings = settings.max_bytes(max_bytes);
        }
        settings
    }
}

pub(crate) async fn run(
    db: DatabaseConnection,
    url: &str,
    args: RelayArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    let nats = args.nats.config()?;
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|error| format!("cannot serve metrics on --metrics-addr {addr}: {error}"))?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    if args.migrate && !args.no_migrate {
        outbox_core::migrate(&db).await?;
    } else {
        outbox_core::check_schema(&db).await?;
    }
    let client = tokio::select! {
        client = nats.connect() => client?,
        () = shutdown_signal() => return Ok(()),
    };
    let mut publisher = JetStreamPublisher::new(client);
    if let Some(namespace) = &args.namespace {
        publisher = publisher.namespace(namespace.clone());
    }
    let relay = Relay::builder(db, publisher.clone())
        .batch_size(args.batch_size)
        .max_attempts(args.max_attempts)
        .poll_interval(Duration::from_secs_f64(args.poll_interval))
        .vacuum_after(Some(args.vacuum_after).filter(|&events| events > 0))
        .build();
    let settings = args.settings();
    let streams: Vec<StreamSpec> = (args.streams.iter())
        .map(|(name, exchange)| {
            StreamSpec::for_exchange(name, exchange, args.namespace.as_deref())
                .with_settings(settings)
        })
        .collect();
    let window = relay.config().retry_horizon().max(Duration::from_secs(120));
    provision(publisher.context(), &streams, window).await?;
    let handle = match args.source {
        Source::Polling => relay.spawn(),
        Source::Logical => logical(relay, url, args.slot)?.spawn(),
    };
    shutdown_signal().await;
    handle.shutdown().await?;
    Ok(())
}

/// The logical relay over `relay`, on slot `slot` if given.
pub(crate) fn logical(
    relay: Relay<JetStreamPublisher>,
    url: &str,
    slot: Option<String>,
) -> Result<LogicalRelay<JetStreamPublisher>, LogicalError> {
    let logical = LogicalRelay::new(relay, url)?;
    Ok(match slot {
        Some(slot) => logical.slot(slot),
        None => logical,
    })
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the relay")
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
