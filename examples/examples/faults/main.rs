//! The fault suite: every delivery guarantee checked by breaking real processes.
//!
//! ```text
//! cargo build -p outbox-nats --features cli --bin outbox
//! cargo run --example faults                  # short mode: 20 s of faults per scenario
//! cargo run --example faults -- --seconds 300 # long mode
//! ```
//!
//! Each scenario runs the relay as three `outbox relay` processes, the
//! consumer as a process of its own (this program, `consume`), and a producer
//! stepping orders through 40 states, one `#[transactional]` call per step
//! (keyed by order; some transactions roll back, some also emit an unkeyed
//! event). While events flow it kills relays and the consumer with SIGKILL,
//! restarts the consumer with SIGTERM, kills and restarts `nats-server`, and
//! stops PostgreSQL as a crash would. Scenarios:
//!
//! - `postgres`: a private PostgreSQL (`initdb` in a temporary directory, a
//!   free port; restarted) and one private `nats-server`;
//! - `cluster`: the same database and a 3-node `nats-server` cluster with the
//!   stream replicated three times (one node restarted at a time);
//! - `mariadb`: a database of its own on the machine's MariaDB (`MYSQL_URL`,
//!   never restarted) and one private `nats-server`;
//! - `groups`: the `postgres` scenario with the consumer run as a group of
//!   three processes (8 partitions, a 3 s lease), and faults of its own:
//!   a member killed, stopped with SIGTERM, paused with SIGSTOP past its
//!   lease and then continued, the group scaled 3 → 1 → 4 → 3;
//! - `groups-cluster`: `groups` on the 3-node cluster.
//!
//! At the end it reads the stream with plain async-nats and the database
//! with plain SQL, prints each figure, and exits 1 if any event was lost,
//! duplicated, reordered, left behind or applied other than once in order.

mod app;
mod procs;
mod scenario;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use outbox_core::consumer::group::GroupConfig;
use outbox_nats::Consumer;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

use crate::procs::{PrivatePostgres, Result};
use crate::scenario::{Env, Plan, Scenario, Store};

#[derive(Parser)]
#[command(
    about = "Break relays, the consumer, NATS and PostgreSQL while events flow; check nothing is lost, duplicated or reordered"
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Seconds of faults per scenario.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 2.0)]
    fault_every: f64,
    /// Order steps committed per second (each a transaction).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Relay processes per scenario.
    #[arg(long, default_value_t = 3)]
    relays: usize,
    /// Scenarios to run, comma-separated: postgres, cluster, mariadb,
    /// groups, groups-cluster, logical, logical-cluster.
    #[arg(
        long,
        default_value = "postgres,cluster,mariadb,groups,groups-cluster,logical,logical-cluster",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// The `outbox` binary (default: next to this program's directory, as cargo builds it).
    #[arg(long)]
    outbox_bin: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Role {
    /// Run the consumer (started by the suite; SIGTERM stops it cleanly).
    Consume {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        nats_url: String,
        #[arg(long)]
        namespace: String,
        /// Run as a member of the consumer's group, with this lease (milliseconds).
        #[arg(long)]
        group_lease_ms: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.role {
        Some(Role::Consume {
            ref database_url,
            ref nats_url,
            ref namespace,
            group_lease_ms,
        }) => {
            let group = group_lease_ms.map(|lease| {
                let mut group = GroupConfig::DEFAULT;
                group.partitions = 8;
                group.lease = Duration::from_millis(lease);
                group
            });
            runtime.block_on(consume(database_url, nats_url, namespace, group))
        }
        None => runtime.block_on(suite(&cli)),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {}", outbox_core::ErrorReport(&*error));
            ExitCode::FAILURE
        }
    }
}

async fn suite(cli: &Cli) -> Result<bool> {
    let self_bin = std::env::current_exe()?;
    let outbox_bin = match &cli.outbox_bin {
        Some(path) => path.clone(),
        // target/<profile>/examples/faults → target/<profile>/outbox
        None => (self_bin.parent().and_then(|examples| examples.parent()))
            .map(|profile| profile.join("outbox"))
            .ok_or("cannot locate the outbox binary; pass --outbox-bin")?,
    };
    if !outbox_bin.exists() {
        return Err(format!(
            "{} is missing: build it first (cargo build -p outbox-nats --features cli --bin outbox)",
            outbox_bin.display()
        )
        .into());
    }
    let plan = Plan {
        fault_window: Duration::from_secs(cli.seconds),
        fault_every: Duration::from_secs_f64(cli.fault_every),
        steps_per_second: cli.rate,
        steps_per_order: 40,
        relays: cli.relays,
        drain_timeout: Duration::from_secs(180),
    };
    let mut scenarios = Vec::new();
    for name in &cli.scenarios {
        scenarios.push(match name.as_str() {
            "postgres" => Scenario {
                name: "postgres",
                store: Store::PrivatePostgres,
                nats_nodes: 1,
                group: None,
                logical: false,
            },
            "cluster" => Scenario {
                name: "cluster",
                store: Store::PrivatePostgres,
                nats_nodes: 3,
                group: None,
                logical: false,
            },
            "mariadb" => Scenario {
                name: "mariadb",
                store: Store::MariaDb,
                nats_nodes: 1,
                group: None,
                logical: false,
            },
            "groups" => Scenario {
                name: "groups",
                store: Store::PrivatePostgres,
                nats_nodes: 1,
                group: Some(GROUP_LEASE),
                logical: false,
            },
            "groups-cluster" => Scenario {
                name: "groups-cluster",
                store: Store::PrivatePostgres,
                nats_nodes: 3,
                group: Some(GROUP_LEASE),
                logical: false,
            },
            "logical" => Scenario {
                name: "logical",
                store: Store::PrivatePostgres,
                nats_nodes: 1,
                group: None,
                logical: true,
            },
            "logical-cluster" => Scenario {
                name: "logical-cluster",
                store: Store::PrivatePostgres,
                nats_nodes: 3,
                group: None,
                logical: true,
            },
            other => {
                return Err(format!(
                    "unknown scenario `{other}` (postgres, cluster, mariadb, groups, groups-cluster, logical, logical-cluster)"
                )
                .into());
            }
        });
    }
    let dir = tempfile::tempdir()?;
    let postgres = if scenarios.iter().any(|s| s.store == Store::PrivatePostgres) {
        Some(PrivatePostgres::start(dir.path()).await?)
    } else {
        None
    };
    let env = Env {
        outbox_bin: &outbox_bin,
        self_bin: &self_bin,
        dir: dir.path(),
        postgres: postgres.as_ref(),
    };
    let mut all_passed = true;
    for scenario in scenarios {
        println!(
            "scenario {}: {} s of faults, {} relays, {} steps/s",
            scenario.name, cli.seconds, cli.relays, cli.rate
        );
        let report = match scenario::run(scenario, &plan, &env).await {
            Ok(report) => report,
            Err(error) => {
                drop(postgres);
                println!("logs kept in {}", dir.keep().display());
                return Err(error);
            }
        };
        for (fault, count) in &report.faults {
            println!("  [{}] {count:>4} × {fault}", scenario.name);
        }
        println!(
            "  [{}] processes that exited by themselves: {}",
            scenario.name, report.unexpected_exits
        );
        println!(
            "  [{}] consumer: {} deliveries found gone elsewhere; {} messages handled from unsure spans",
            scenario.name, report.skipped_deliveries, report.recovered_messages
        );
        if scenario.group.is_some() {
            println!(
                "  [{}] group: effects applied per consumer process {:?}; {} partitions moved, {} lost to another member (fenced); {} stand-downs (NATS out of reach for a lease)",
                scenario.name,
                report.shares,
                report.partitions_moved,
                report.partitions_lost,
                report.stood_down
            );
        }
        if scenario.logical {
            println!(
                "  [{}] logical: {} times a relay took the slot (its first reader and every takeover); `outbox slot drop` published what was left and dropped it",
                scenario.name, report.slot_takes
            );
        }
        if report.relays_started_before_nats {
            println!(
                "  [{}] relays started 1 s before nats-server: they waited for it",
                scenario.name
            );
        }
        println!(
            "  [{}] drained {:.1} s after the faults stopped",
            scenario.name, report.drain_seconds
        );
        report.verdict.print(scenario.name);
        if scenario.group.is_some() {
            println!(
                "  [{}] group: effects committed by a non-owner {} / members without a share {}",
                scenario.name,
                report.verdict.non_owner_effects,
                report.verdict.members_without_share
            );
        }
        let failures = report.verdict.failures();
        if failures.is_empty() {
            println!("  [{}] PASSED", scenario.name);
        } else {
            println!("  [{}] FAILED: {}", scenario.name, failures.join(", "));
            all_passed = false;
        }
    }
    drop(postgres);
    if !all_passed {
        let kept = dir.keep();
        println!("logs kept in {}", kept.display());
    }
    Ok(all_passed)
}

/// The lease of the `groups` scenario's members: short, so that a run sees
/// many handovers.
const GROUP_LEASE: Duration = Duration::from_secs(3);

/// The consumer process: applies steps and audits once each, in per-key
/// order. SIGTERM stops it cleanly at any point, starting up included.
async fn consume(
    database_url: &str,
    nats_url: &str,
    namespace: &str,
    group: Option<GroupConfig>,
) -> Result<bool> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_ansi(false)
        .init();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if let Some(group) = group {
        app::GROUP.get_or_init(|| group);
    }
    let started_ms = chrono::Utc::now().timestamp_millis();
    let (consumer, db) = tokio::select! {
        started = start_consumer(database_url, nats_url, namespace, group) => started?,
        _ = term.recv() => return Ok(true),
    };
    let who = consumer.member().map(str::to_owned);
    let who = app::started_as(who.unwrap_or_else(|| format!("pid-{}", std::process::id())));
    // Alive every half second until told to stop (a down database skips a beat).
    let mut beat = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if let Err(error) = app::alive(&db, who, started_ms).await {
                    tracing::debug!(%error, "cannot record this process alive");
                }
            }
            _ = term.recv() => break,
        }
    }
    consumer.shutdown().await?;
    Ok(true)
}

/// Connects and spawns the consumer, retrying while NATS or the database is
/// down or the consumer's lock is still held.
async fn start_consumer(
    database_url: &str,
    nats_url: &str,
    namespace: &str,
    group: Option<GroupConfig>,
) -> Result<(outbox_nats::ConsumerHandle, DatabaseConnection)> {
    let mut options = ConnectOptions::new(database_url);
    options.max_connections(16).sqlx_logging(false);
    let db = Database::connect(options).await?;
    let client = outbox_nats::NatsConfig::new(nats_url)?.connect().await?;
    loop {
        let mut builder = Consumer::builder(client.clone(), db.clone(), app::CONSUMER);
        if let Some(group) = group {
            builder = builder.group(group);
        }
        let started = builder
            .namespace(namespace)
            .on::<app::OrderStep, _>(app::apply_step)
            .on::<app::Audit, _>(app::apply_audit)
            .retry_backoff(app::RETRY)
            .max_deliveries(1_000)
            .spawn()
            .await;
        match started {
            Ok(consumer) => return Ok((consumer, db)),
            Err(error) => {
                tracing::warn!(error = %outbox_core::ErrorReport(&error), "cannot start the consumer; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
