//! `outbox`: run a relay as its own process, and look into the outbox.
//!
//! ```text
//! outbox relay --database-url postgres://... --nats-url 127.0.0.1:4222 --stream ORDERS=orders
//! outbox status --database-url postgres://...
//! outbox dead-letters --database-url postgres://...
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use outbox_core::entity::{dead_letter, inbox_dead_letter};
use outbox_core::relay::Relay;
use outbox_nats::{JetStreamPublisher, StreamSpec, provision};
use sea_orm::{Database, DatabaseConnection, EntityTrait, QueryOrder, QuerySelect};

#[derive(Parser)]
#[command(version, about = "Relay and inspect a transactional outbox")]
struct Cli {
    /// The database holding the outbox tables.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deliver committed events to NATS JetStream until interrupted (Ctrl-C, SIGTERM).
    Relay(RelayArgs),
    /// Pending events, the oldest one's age, and dead letters. With a
    /// threshold it is a probe: exit status 1 when one is breached.
    Status(StatusArgs),
    /// List dead-lettered events with their last error.
    DeadLetters {
        /// How many to list, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// List the consumers' dead letters (`outbox_inbox_dead_letters`) instead of the relay's.
        #[arg(long)]
        inbox: bool,
    },
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Breached when more events than this are pending.
    #[arg(long)]
    max_pending: Option<u64>,
    /// Breached when the oldest pending event is older than this many seconds.
    #[arg(long, value_parser = parse_seconds, allow_hyphen_values = true)]
    max_age: Option<f64>,
}

fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("`{value}` is not a number of seconds (0 or more)")),
    }
}

#[derive(clap::Args)]
struct RelayArgs {
    /// The NATS servers, comma-separated; the first connection waits for one to answer.
    #[arg(long, env = "NATS_URL", default_value = "127.0.0.1:4222")]
    nats_url: String,
    /// A stream to create or check at start, as NAME=EXCHANGE (captures EXCHANGE.>); repeatable.
    /// Without any, streams are not provisioned.
    #[arg(long = "stream", value_parser = parse_stream)]
    streams: Vec<(String, String)>,
    /// Prefix of every subject and stream name.
    #[arg(long, env = "OUTBOX_NAMESPACE")]
    namespace: Option<String>,
    /// Events per round.
    #[arg(long, default_value_t = 2_000)]
    batch_size: usize,
    /// Attempts before a rejected event is dead-lettered.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// Seconds between polls when nothing else wakes the relay.
    #[arg(long, default_value_t = 1.0)]
    poll_interval: f64,
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

// One thread: the relay is a loop waiting on the database and the broker in
// turn, and on a multi-threaded runtime each hand-over between its task and
// the connections' tasks is a cross-thread wake-up; the benchmark measured
// the relay's CPU per event about a quarter lower this way.
/// Exit status: 0 done (or healthy), 1 a `status` threshold breached,
/// 2 an error (clap's usage errors are 2 too).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", outbox_core::ErrorReport(&*error));
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<ExitCode, Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // sqlx logs every statement at info: a relay's polls would drown the rest.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        // Colour codes only for a person at a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let cli = Cli::parse();
    let url = cli
        .database_url
        .ok_or("no database: pass --database-url or set DATABASE_URL")?;
    let db = Database::connect(&url).await?;
    match cli.command {
        Command::Relay(args) => relay(db, args).await?,
        Command::Status(args) => return status(&db, &args).await,
        Command::DeadLetters {
            limit,
            inbox: false,
        } => dead_letters(&db, limit).await?,
        Command::DeadLetters { limit, inbox: true } => inbox_dead_letters(&db, limit).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn relay(db: DatabaseConnection, args: RelayArgs) -> Result<(), Box<dyn std::error::Error>> {
    outbox_core::migrate(&db).await?;
    let servers = outbox_nats::parse_servers(&args.nats_url)?;
    let client = tokio::select! {
        client = outbox_nats::connect(&servers, async_nats::ConnectOptions::new) => client?,
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
        .build();
    let streams: Vec<StreamSpec> = args
        .streams
        .iter()
        .map(|(name, exchange)| StreamSpec::for_exchange(name, exchange, args.namespace.as_deref()))
        .collect();
    let window = relay.config().retry_horizon().max(Duration::from_secs(120));
    provision(publisher.context(), &streams, window).await?;
    let handle = relay.spawn();
    shutdown_signal().await;
    handle.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() {
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

async fn status(
    db: &DatabaseConnection,
    args: &StatusArgs,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let stats = outbox_core::relay::stats(db).await?;
    let age = (stats.oldest_pending)
        .map(|oldest| (chrono::Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1e3);
    let mut breached = Vec::new();
    if args.max_pending.is_some_and(|max| stats.pending > max) {
        breached.push("max_pending");
    }
    if let (Some(max), Some(age)) = (args.max_age, age)
        && age > max
    {
        breached.push("max_age");
    }
    if args.json {
        let report = serde_json::json!({
            "pending": stats.pending,
            "oldest_pending": stats.oldest_pending,
            "oldest_pending_age_seconds": age,
            "dead_letters": stats.dead_letters,
            "breached": breached,
        });
        println!("{report}");
    } else {
        println!("pending events: {}", stats.pending);
        match (stats.oldest_pending, age) {
            (Some(oldest), Some(age)) => println!("oldest pending: {oldest} ({age:.0}s ago)"),
            _ => println!("oldest pending: -"),
        }
        println!("dead letters:   {}", stats.dead_letters);
        if !breached.is_empty() {
            println!("breached:       {}", breached.join(", "));
        }
    }
    Ok(if breached.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the newest `limit` rows of a dead-letter table, one line each.
async fn list_newest<E: EntityTrait>(
    db: &DatabaseConnection,
    failed_at: E::Column,
    limit: u64,
    what: &str,
    line: impl Fn(&E::Model) -> String,
) -> Result<(), Box<dyn std::error::Error>> {
    let rows = E::find()
        .order_by_desc(failed_at)
        .limit(limit)
        .all(db)
        .await?;
    for row in &rows {
        println!("{}", line(row));
    }
    println!("{} {what} shown", rows.len());
    Ok(())
}

async fn dead_letters(
    db: &DatabaseConnection,
    limit: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    list_newest::<dead_letter::Entity>(
        db,
        dead_letter::Column::FailedAt,
        limit,
        "dead letters",
        |l| {
            format!(
                "{} {} v{} {} attempts={} failed_at={} error: {}",
                l.id,
                l.event_type,
                l.event_version,
                l.subject,
                l.attempts,
                l.failed_at,
                l.last_error
            )
        },
    )
    .await
}

async fn inbox_dead_letters(
    db: &DatabaseConnection,
    limit: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let failed_at = inbox_dead_letter::Column::FailedAt;
    list_newest::<inbox_dead_letter::Entity>(db, failed_at, limit, "consumer dead letters", |l| {
        format!(
            "{} consumer={} {}#{} {} event={} reason={} deliveries={} failed_at={} error: {}",
            l.id,
            l.consumer,
            l.stream,
            l.stream_sequence,
            l.subject,
            l.event_type.as_deref().unwrap_or("?"),
            l.reason,
            l.deliveries,
            l.failed_at,
            l.error
        )
    })
    .await
}
