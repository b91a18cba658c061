//! `outbox`: run a relay as its own process, and look into the outbox.
//!
//! ```text
//! outbox migrate --database-url postgres://...
//! outbox relay --database-url postgres://... --nats-url nats://a:4222,nats://b:4222 --stream ORDERS=orders
//! outbox relay --source logical --database-url postgres://... --stream ORDERS=orders
//! outbox slot drop --database-url postgres://...
//! outbox status --database-url postgres://... --json --max-pending 10000
//! outbox dead-letters list --database-url postgres://...
//! outbox dead-letters replay --event-type OrderCreated --database-url postgres://...
//! ```

mod database;
mod dead_letters;
mod nats;
mod relay;
mod slot;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(version, about = "Relay and inspect a transactional outbox")]
struct Cli {
    /// The database holding the outbox tables.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// How log lines are written: text, or one JSON object per line for log shippers.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the outbox tables, then exit (for deploy pipelines;
    /// `relay` does it at start unless given --no-migrate).
    Migrate,
    /// Deliver committed events to NATS JetStream until interrupted (Ctrl-C, SIGTERM).
    Relay(Box<relay::RelayArgs>),
    /// Pending events, the oldest one's age, and dead letters. With a
    /// threshold it is a probe: exit status 1 when one is breached.
    Status(status::StatusArgs),
    /// List, show, replay or discard dead letters: the relay's, or with
    /// `--inbox` the consumers'.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLetterCommand),
    /// The replication slot of `relay --source logical`.
    #[command(subcommand)]
    Slot(slot::SlotCommand),
}

// One thread: the relay is a loop waiting on the database and the broker in
// turn, and on a multi-threaded runtime each hand-over between its task and
// the connections' tasks is a cross-thread wake-up; the benchmark measured
// the relay's CPU per event about a quarter lower this way.
/// Exit status: 0 done (or healthy), 1 a `status` threshold breached,
/// 2 an error (clap's usage errors are 2 too).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            let error = outbox_core::ErrorReport(&*error);
            tracing::debug!(%error, "exiting");
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    // sqlx logs every statement at info: a relay's polls would drown the rest.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => logs.json().init(),
        // Colour codes only for a person at a terminal, not in a log file.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let url = cli
        .database_url
        .ok_or("no database: pass --database-url or set DATABASE_URL")?;
    let patience = match cli.command {
        Command::Relay(_) => database::Patience::Wait,
        _ => database::Patience::Probe,
    };
    // Interruptible while the relay waits for the database.
    let db = tokio::select! {
        db = database::open(&url, patience) => db?,
        () = relay::shutdown_signal() => return Ok(ExitCode::SUCCESS),
    };
    match cli.command {
        Command::Migrate => {
            outbox_core::migrate(&db).await?;
            println!("the outbox tables are up to date");
        }
        Command::Relay(args) => relay::run(db, &url, *args).await?,
        Command::Status(args) => return status::run(&db, &args).await,
        Command::DeadLetters(command) => dead_letters::run(&db, command).await?,
        Command::Slot(command) => slot::run(db, &url, command).await?,
    }
    Ok(ExitCode::SUCCESS)
}
