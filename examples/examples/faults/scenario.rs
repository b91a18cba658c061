//! One scenario: a database, NATS (one server or a 3-node cluster), relays
//! as `outbox` processes, the consumer as a process of its own, a producer,
//! and faults injected while events flow; then the verdict.

use outbox_core::uuid;
use outbox_nats::async_nats;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outbox_nats::async_nats::jetstream;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tokio::time::Instant;

use crate::app::{self, AppError};
use crate::procs::{Nats, PrivatePostgres, Proc, Result};
use crate::verify::{self, Verdict};
use outbox_core::testing::Proxy;

/// Which database a scenario keeps its outbox, inbox and application tables in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    /// The suite's private PostgreSQL, which it may restart.
    PrivatePostgres,
    /// A database of its own on the machine's MariaDB, never restarted.
    MariaDb,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) store: Store,
    pub(crate) nats_nodes: usize,
    /// The consumer as a group of [`MEMBERS`] processes with this lease;
    /// without, one process.
    pub(crate) group: Option<Duration>,
    /// The relays read the write-ahead log (`--source logical`), one at a
    /// time, the others standing by.
    pub(crate) logical: bool,
}

/// Members of a group scenario's consumer, at its start and between scalings.
const MEMBERS: usize = 3;

/// The sizes a group is scaled to in turn.
const SCALES: [usize; 3] = [1, 4, MEMBERS];

/// How long and how hard every scenario runs.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) fault_window: Duration,
    pub(crate) fault_every: Duration,
    pub(crate) steps_per_second: u32,
    pub(crate) steps_per_order: i32,
    pub(crate) relays: usize,
    pub(crate) drain_timeout: Duration,
}

/// The programs and places a scenario uses.
pub(crate) struct Env<'a> {
    pub(crate) outbox_bin: &'a Path,
    pub(crate) self_bin: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) postgres: Option<&'a PrivatePostgres>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRelay,
    KillConsumer,
    RestartConsumer,
    PauseConsumer,
    CutConsumer,
    ScaleGroup,
    RestartNats,
    RestartPostgres,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Self::KillRelay => "relay killed (SIGKILL)",
            Self::KillConsumer => "consumer (a member) killed (SIGKILL)",
            Self::RestartConsumer => "consumer (a member) restarted gracefully (SIGTERM)",
            Self::PauseConsumer => "member paused (SIGSTOP) past its lease, then continued",
            Self::CutConsumer => {
                "member cut off from NATS (not from PostgreSQL) past its lease, then let back"
            }
            Self::ScaleGroup => "group scaled (3 → 1 → 4 → 3 members, in turn)",
            Self::RestartNats => "nats-server killed and restarted",
            Self::RestartPostgres => "PostgreSQL stopped (immediate) and restarted",
        }
    }
}

/// What happened during a scenario, besides the verdict.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) faults: BTreeMap<&'static str, u32>,
    /// Processes found exited without being told to (restarted each time).
    pub(crate) unexpected_exits: u32,
    pub(crate) drain_seconds: f64,
    /// The relays were started while NATS was down (they must wait for it).
    pub(crate) relays_started_before_nats: bool,
    /// From the consumer's log: deliveries found gone elsewhere, and the
    /// messages of unsure spans it handled (not yet in its inbox).
    pub(crate) skipped_deliveries: usize,
    pub(crate) recovered_messages: usize,
    /// A group's: effects applied by each member, and, from the members'
    /// logs, partitions taken, partitions lost to another member after a
    /// pause, and members that stood down, out of NATS' reach for a lease.
    pub(crate) shares: Vec<u64>,
    pub(crate) partitions_moved: usize,
    pub(crate) partitions_lost: usize,
    pub(crate) stood_down: usize,
    /// The logical relays' takes of the slot, from their logs.
    pub(crate) slot_takes: usize,
    pub(crate) verdict: Verdict,
}

pub(crate) async fn run(scenario: Scenario, plan: &Plan, env: &Env<'_>) -> Result<Report> {
    let dir = env.dir.join(scenario.name);
    std::fs::create_dir_all(&dir)?;
    let tag = format!("f{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let mut nats = Nats::new(&dir, scenario.nats_nodes)?;
    let nats_url = nats.url();
    let mut report = Report::default();
    let (db_url, admin) = create_database(scenario.store, env.postgres, &tag).await?;
    let db = connect(&db_url).await?;
    outbox_core::migrate(&db).await?;
    app::create_tables(&db).await?;

    // What relays and the consumer connect to, as both take it.
    let connection = [
        "--database-url",
        &db_url,
        "--nats-url",
        &nats_url,
        "--namespace",
        &tag,
    ];
    let command = |verb: &str, extra: &[&str]| {
        let args = std::iter::once(verb)
            .chain(connection)
            .chain(extra.iter().copied());
        args.map(Into::into).collect()
    };
    let mut relay_flags = vec!["--stream", "FAULTS=faults", "--poll-interval", "0.2"];
    if scenario.logical {
        // A slot name of the scenario's own: slots are the server's, not a database's.
        relay_flags.extend(["--source", "logical", "--slot", &tag]);
    }
    let mut relays: Vec<Proc> = (0..plan.relays)
        .map(|i| {
            let args = command("relay", &relay_flags);
            Proc::new(&format!("relay-{i}"), env.outbox_bin, args, &dir)
        })
        .collect();
    // With one server, the relays start a second before it: they must wait
    // for NATS and then create the stream (`--stream`). The cluster's stream
    // is replicated, so the suite creates it before they start.
    let relays_first = scenario.nats_nodes == 1;
    if relays_first {
        relays.iter_mut().try_for_each(Proc::start)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    nats.start().await?;
    let client = outbox_nats::NatsConfig::new(&nats_url)?.connect().await?;
    let stream = stream(&client, &tag, scenario.nats_nodes, !relays_first).await?;
    if !relays_first {
        relays.iter_mut().try_for_each(Proc::start)?;
    }
    report.relays_started_before_nats = relays_first;
    let lease_ms = scenario.group.map(|lease| lease.as_millis().to_string());
    let consume = match &lease_ms {
        Some(lease_ms) => command("consume", &["--group-lease-ms", lease_ms]),
        None => command("consume", &[]),
    };
    // A group's first member reaches NATS through a proxy the suite cuts
    // (one server only: a cluster's client would reach the other nodes
    // straight, as they advertise themselves).
    let cut_off = match scenario.group {
        Some(_) if scenario.nats_nodes == 1 => Some(Proxy::start(&nats_url).await?),
        _ => None,
    };
    let member = |i: usize| {
        let mut args: Vec<std::ffi::OsString> = consume.clone();
        if let Some(proxy) = cut_off.as_ref().filter(|_| i == 0) {
            for arg in &mut args {
                if *arg == *nats_url {
                    *arg = proxy.url().into();
                }
            }
        }
        Proc::new(&format!("consumer-{i}"), env.self_bin, args, &dir)
    };
    let members = if scenario.group.is_some() { MEMBERS } else { 1 };
    let mut consumers: Vec<Proc> = (0..members).map(member).collect();
    consumers.iter_mut().try_for_each(Proc::start)?;
    let mut scales = SCALES.iter().cycle();

    let stop = Arc::new(AtomicBool::new(false));
    // With the logical relay, the producer writes each transaction's events
    // as one message (the capture trigger stays what the relays install).
    outbox_core::capture::write_as_messages(scenario.logical);
    let producer = tokio::spawn(produce(db.clone(), plan.clone(), Arc::clone(&stop)));

    let mut faults = vec![
        Fault::KillRelay,
        Fault::KillConsumer,
        Fault::RestartNats,
        Fault::RestartConsumer,
    ];
    if scenario.group.is_some() {
        faults.extend([Fault::PauseConsumer, Fault::ScaleGroup]);
    }
    if cut_off.is_some() {
        faults.push(Fault::CutConsumer);
    }
    if scenario.store == Store::PrivatePostgres {
        faults.push(Fault::RestartPostgres);
    }
    let end = Instant::now() + plan.fault_window;
    let mut next = 0;
    while Instant::now() + plan.fault_every <= end {
        tokio::time::sleep(plan.fault_every).await;
        let fault = faults[next % faults.len()];
        next += 1;
        match fault {
            Fault::KillRelay => {
                let victim = fastrand::usize(..relays.len());
                let relay = &mut relays[victim];
                relay.kill9().await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                relay.start()?;
            }
            Fault::KillConsumer => {
                let consumer = any(&mut consumers);
                consumer.kill9().await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                consumer.start()?;
            }
            Fault::RestartConsumer => {
                let consumer = any(&mut consumers);
                if !consumer.terminate(Duration::from_secs(60)).await? {
                    return Err("the consumer did not stop cleanly on SIGTERM".into());
                }
                consumer.start()?;
            }
            Fault::PauseConsumer => {
                let lease = scenario.group.unwrap_or_default();
                let consumer = any(&mut consumers);
                consumer.signal("STOP").await?;
                tokio::time::sleep(lease + Duration::from_secs(1)).await;
                consumer.signal("CONT").await?;
            }
            Fault::CutConsumer => {
                if let Some(proxy) = &cut_off {
                    proxy.cut();
                    let lease = scenario.group.unwrap_or_default();
                    tokio::time::sleep(lease + Duration::from_secs(2)).await;
                    proxy.restore();
                }
            }
            Fault::ScaleGroup => {
                let size = *scales.next().unwrap_or(&MEMBERS);
                while consumers.len() > size {
                    if let Some(mut gone) = consumers.pop()
                        && !gone.terminate(Duration::from_secs(60)).await?
                    {
                        return Err("a member did not stop cleanly on SIGTERM".into());
                    }
                }
                while consumers.len() < size {
                    let mut joining = member(consumers.len());
                    joining.start()?;
                    consumers.push(joining);
                }
            }
            Fault::RestartNats => {
                let node = fastrand::usize(..nats.nodes.len());
                nats.restart(node, Duration::from_secs(1)).await?;
            }
            Fault::RestartPostgres => {
                if let Some(postgres) = env.postgres {
                    postgres.restart(Duration::from_secs(1)).await?;
                }
            }
        }
        *report.faults.entry(fault.label()).or_default() += 1;
        report.unexpected_exits += restart_exited(&mut relays, &mut consumers)?;
    }
    stop.store(true, Ordering::SeqCst);
    producer.await??;
    let flow_ended_ms = chrono::Utc::now().timestamp_millis();

    // Everything committed must now reach the stream and the consumer's effects.
    let drain_started = Instant::now();
    loop {
        report.unexpected_exits += restart_exited(&mut relays, &mut consumers)?;
        if let Ok((committed, applied, left)) = verify::progress(&db).await
            && applied >= committed
            && left == 0
        {
            break;
        }
        if drain_started.elapsed() > plan.drain_timeout {
            println!(
                "  [{}] not drained after {:?}; checking what is there",
                scenario.name, plan.drain_timeout
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.drain_seconds = drain_started.elapsed().as_secs_f64();
    for consumer in &mut consumers {
        if !consumer.terminate(Duration::from_secs(60)).await? {
            return Err("the consumer did not stop cleanly on SIGTERM".into());
        }
    }
    for relay in &mut relays {
        relay.terminate(Duration::from_secs(30)).await?;
    }
    let group = (scenario.group).map(|lease| verify::GroupRun {
        lease,
        flow_ended_ms,
    });
    report.verdict = verify::verdict(&db, &client, &stream, group).await?;
    if scenario.logical {
        report.slot_takes = (0..plan.relays)
            .map(|i| {
                std::fs::read_to_string(dir.join(format!("relay-{i}.log"))).unwrap_or_default()
            })
            .map(|log| {
                log.matches("logical relay reading the slot").count()
                    + log.matches("logical relay recovered").count()
            })
            .sum();
        let args = ["slot", "drop"]
            .into_iter()
            .chain(connection)
            .chain(["--slot", &tag]);
        drop_slot(env.outbox_bin, args.map(Into::into).collect(), &dir).await?;
    }
    report.shares = verify::shares(&db).await?;
    let mut log = String::new();
    // Every member that ran, the scaled-away ones included.
    for i in 0..=SCALES.iter().copied().max().unwrap_or(1) {
        log.push_str(
            &std::fs::read_to_string(dir.join(format!("consumer-{i}.log"))).unwrap_or_default(),
        );
    }
    report.skipped_deliveries = log.matches("a delivery went elsewhere").count();
    report.recovered_messages = (log.lines())
        .filter(|line| line.contains("did not see"))
        .filter_map(|line| {
            line.rsplit("messages=")
                .next()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .sum();
    report.partitions_moved = log.matches("the group's partitions moved").count();
    report.stood_down = log
        .matches("the broker has been out of reach for a lease")
        .count();
    report.partitions_lost = log
        .matches("partitions were taken by another member")
        .count();
    db.close().await?;
    if let Some((admin, database)) = admin {
        admin
            .execute_unprepared(&format!("DROP DATABASE {database}"))
            .await?;
    }
    Ok(report)
}

/// Runs `outbox slot drop` (`args`), which must succeed.
async fn drop_slot(outbox_bin: &Path, args: Vec<std::ffi::OsString>, dir: &Path) -> Result<()> {
    let output = tokio::process::Command::new(outbox_bin)
        .args(args)
        .output()
        .await?;
    std::fs::write(
        dir.join("slot-drop.log"),
        [&output.stdout[..], &output.stderr[..]].concat(),
    )?;
    if !output.status.success() {
        return Err(format!(
            "`outbox slot drop` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}

/// One of the consumer's processes, at random.
fn any(consumers: &mut [Proc]) -> &mut Proc {
    let victim = fastrand::usize(..consumers.len());
    &mut consumers[victim]
}

/// Restarts relays and consumers that exited by themselves; returns how many.
fn restart_exited(relays: &mut [Proc], consumers: &mut [Proc]) -> Result<u32> {
    let mut exited = 0;
    for proc in relays.iter_mut().chain(consumers.iter_mut()) {
        if let Some(status) = proc.exited() {
            println!("  {} exited by itself ({status}); restarting it", proc.name);
            proc.start()?;
            exited += 1;
        }
    }
    Ok(exited)
}

/// A database of the scenario's own; returns its URL and, for MariaDB, the
/// connection and name to drop it with afterwards (the private PostgreSQL
/// goes with its directory).
async fn create_database(
    store: Store,
    postgres: Option<&PrivatePostgres>,
    tag: &str,
) -> Result<(String, Option<(DatabaseConnection, String)>)> {
    match store {
        Store::PrivatePostgres => {
            let postgres = postgres.ok_or("no private PostgreSQL")?;
            let admin = connect(&postgres.url("postgres")).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE {tag}"))
                .await?;
            admin.close().await?;
            Ok((postgres.url(tag), None))
        }
        Store::MariaDb => {
            let server = std::env::var("MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned());
            let admin = connect(&format!("{server}/test"))
                .await
                .map_err(|e| format!("MariaDB at {server} is required: {e}"))?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE {tag}"))
                .await?;
            Ok((format!("{server}/{tag}"), Some((admin, tag.to_owned()))))
        }
    }
}

async fn connect(url: &str) -> Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    Ok(Database::connect(options).await?)
}

/// The stream: created replicated on every node (`create`), retried while a
/// cluster elects its leader; else waited for until the relays create it.
async fn stream(
    client: &async_nats::Client,
    tag: &str,
    replicas: usize,
    create: bool,
) -> Result<String> {
    let context = jetstream::new(client.clone());
    let name = format!("{}_FAULTS", tag.to_uppercase());
    let config = jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{tag}.faults.>")],
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = if create {
            context
                .get_or_create_stream(config.clone())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            context
                .get_stream(&name)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        match found {
            Ok(()) => return Ok(name),
            Err(error) if Instant::now() < deadline => {
                if create {
                    eprintln!("  stream not created yet ({error}); retrying");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Steps orders through `steps_per_order` states until told to stop: four
/// tasks, each one order at a time, one transaction per step, some of them
/// rolled back on purpose (and recorded as ghosts), some carrying an unkeyed
/// audit event. A failed commit (the database restarting) is resolved by
/// asking the database whether the step committed.
async fn produce(db: DatabaseConnection, plan: Plan, stop: Arc<AtomicBool>) -> Result<()> {
    const TASKS: u64 = 4;
    let pause = Duration::from_secs_f64(TASKS as f64 / f64::from(plan.steps_per_second.max(1)));
    let next_order = Arc::new(AtomicU64::new(1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (db, stop, next_order) = (db.clone(), Arc::clone(&stop), Arc::clone(&next_order));
        let steps = plan.steps_per_order;
        tasks.spawn(async move {
            'orders: while !stop.load(Ordering::SeqCst) {
                let order_id = i64::try_from(next_order.fetch_add(1, Ordering::SeqCst))?;
                for seq in 1..=steps {
                    if stop.load(Ordering::SeqCst) {
                        break 'orders;
                    }
                    step(&db, order_id, seq).await?;
                    tokio::time::sleep(pause).await;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Commits step `seq` of `order_id`, however many attempts it takes.
async fn step(db: &DatabaseConnection, order_id: i64, seq: i32) -> Result<()> {
    loop {
        let roll_back = fastrand::u8(..100) < 5;
        let audit = fastrand::u8(..100) < 30;
        match app::advance(db, order_id, seq, audit, roll_back).await {
            Ok(()) => return Ok(()),
            Err(AppError::RolledBack(id)) => {
                while let Err(error) = app::ghost(db, id).await {
                    eprintln!("  recording a rolled-back event failed ({error}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(_) => loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match app::committed(db, order_id, seq).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => break,
                    Err(_) => continue,
                }
            },
        }
    }
}
