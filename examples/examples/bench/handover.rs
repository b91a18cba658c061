//! Handover: how long a killed group member's partitions wait for their
//! next handled message (`handover_p50_s`, `handover_max_s`).
//!
//! Two member processes (this program with `--member`) run one consumer
//! name as a group with a 3 s lease while events flow at about 200 a second.
//! Each round kills one with SIGKILL and, for every partition it owned,
//! times the first message handled after the kill: the survivor takes a
//! dead member's partitions once its lease ends, at its next look at the
//! group. Then the victim is started again, and the round ends once the two
//! share the partitions again.

use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox_core::consumer::group::{GroupConfig, partition_of};
use outbox_core::inbox::Metadata;
use outbox_nats::Consumer;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{Bench, BenchEvent, BoxError, connect_schema, nats_url, round3};

/// The group's consumer name.
const NAME: &str = "handover";

/// The members' lease: the handover's bound is about a lease and a third.
pub(crate) const LEASE: Duration = Duration::from_secs(3);

/// Events published per tick of the parent's loop, a tick being [`TICK`].
const PER_TICK: u64 = 10;
const TICK: Duration = Duration::from_millis(50);

/// The longest a step of a round may take before the run fails.
const PATIENCE: Duration = Duration::from_secs(60);

fn group() -> GroupConfig {
    let mut group = GroupConfig::DEFAULT;
    group.lease = LEASE;
    group
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The figures: seconds from a kill to each of the victim's partitions'
/// next handled message, over every partition of every round.
pub(crate) struct Handover {
    pub(crate) p50_s: f64,
    pub(crate) max_s: f64,
    pub(crate) partitions: usize,
    pub(crate) rounds: u32,
}

impl Handover {
    pub(crate) fn into_figures(self) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("handover_p50_s", round3(self.p50_s).into()),
            ("handover_max_s", round3(self.max_s).into()),
            ("handover_lease_s", LEASE.as_secs_f64().into()),
            ("handover_partitions", self.partitions.into()),
            ("handover_rounds", self.rounds.into()),
        ]
    }
}

/// A member process and its id in the group.
struct MemberProc {
    child: Child,
    id: String,
}

impl Bench {
    /// Runs `rounds` kills and returns the handover times.
    pub(crate) async fn handover(&self, rounds: u32) -> Result<Handover, BoxError> {
        self.fresh_streams().await?;
        self.db
            .execute_unprepared(
                "CREATE TABLE bench_handled (partition INT NOT NULL, at_ms BIGINT NOT NULL)",
            )
            .await?;
        let mut flow = Flow { seq: 0 };
        let mut members = [self.member().await?, self.member().await?];
        let mut waits = Vec::new();
        for round in 0..rounds {
            self.until_shared(&members, &mut flow).await?;
            let victim = &mut members[round as usize % 2];
            let owned = self.owned(&victim.id).await?;
            let killed_ms = now_ms();
            victim.child.start_kill()?;
            victim.child.wait().await?;
            let mut waited = Vec::new();
            let started = Instant::now();
            while waited.len() < owned.len() {
                if started.elapsed() > PATIENCE {
                    return Err(format!("partitions {owned:?} not handled {PATIENCE:?} after their member was killed").into());
                }
                flow.tick(self).await?;
                waited = self.first_handled_after(killed_ms, &owned).await?;
            }
            eprintln!(
                "handover {}/{rounds}: {} partitions, first messages handled {:?} s after the kill",
                round + 1,
                owned.len(),
                waited
                    .iter()
                    .map(|ms| round3(*ms as f64 / 1e3))
                    .collect::<Vec<_>>()
            );
            waits.extend(waited);
            *victim = self.member().await?;
        }
        for mut member in members {
            let _ = member.child.start_kill();
            let _ = member.child.wait().await;
        }
        waits.sort_unstable();
        let seconds = |ms: Option<&i64>| ms.map_or(f64::NAN, |ms| *ms as f64 / 1e3);
        Ok(Handover {
            p50_s: seconds(waits.get(waits.len().saturating_sub(1) / 2)),
            max_s: seconds(waits.last()),
            partitions: waits.len(),
            rounds,
        })
    }

    /// Starts a member process and reads the id it joined as.
    async fn member(&self) -> Result<MemberProc, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--member", &self.schema, &self.namespace])
            .args(["--database-url", &self.args.database_url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the member's output is not piped")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let id = (line.strip_prefix("member "))
            .ok_or_else(|| format!("the member process said {line:?}, not its id"))?
            .trim()
            .to_owned();
        Ok(MemberProc { child, id })
    }

    /// Waits, events flowing, until every member owns as many partitions
    /// as the others, give or take one.
    async fn until_shared(&self, members: &[MemberProc], flow: &mut Flow) -> Result<(), BoxError> {
        let partitions = group().partitions as usize;
        let share = partitions / members.len();
        let started = Instant::now();
        loop {
            flow.tick(self).await?;
            let mut shared = true;
            for member in members {
                shared &= self.owned(&member.id).await?.len() >= share;
            }
            if shared {
                return Ok(());
            }
            if started.elapsed() > PATIENCE {
                return Err("the members did not share the partitions".into());
            }
        }
    }

    /// The partitions `member` owns.
    async fn owned(&self, member: &str) -> Result<Vec<i32>, DbErr> {
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT partition_index FROM outbox_consumer_partitions WHERE consumer = $1 AND owner = $2",
                [NAME.into(), member.into()],
            ))
            .await?;
        rows.iter().map(|row| row.try_get_by_index(0)).collect()
    }

    /// For each of `partitions` that has one, milliseconds from `killed_ms`
    /// to its first message handled after it.
    async fn first_handled_after(
        &self,
        killed_ms: i64,
        partitions: &[i32],
    ) -> Result<Vec<i64>, DbErr> {
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT MIN(at_ms) - $1 FROM bench_handled WHERE at_ms > $1 AND partition = ANY($2) GROUP BY partition",
                [killed_ms.into(), partitions.to_vec().into()],
            ))
            .await?;
        rows.iter().map(|row| row.try_get_by_index(0)).collect()
    }
}

/// The events flowing while members come and go.
struct Flow {
    seq: u64,
}

impl Flow {
    /// Publishes the next [`PER_TICK`] events, then waits a [`TICK`].
    async fn tick(&mut self, bench: &Bench) -> Result<(), BoxError> {
        let next = self.seq + PER_TICK;
        bench
            .send(bench.messages("bench", self.seq..next, true)?)
            .await?;
        self.seq = next;
        tokio::time::sleep(TICK).await;
        Ok(())
    }
}

/// The child process of [`Bench::handover`]: a member of the group, which
/// records the partition and time of every message it handles. Prints its
/// id, then runs until killed or until its parent is gone (its input ends).
pub(crate) async fn member_only(url: &str, schema: &str, namespace: &str) -> Result<(), BoxError> {
    let db = connect_schema(url, schema, 8).await?;
    let client = outbox_nats::async_nats::connect(nats_url()).await?;
    let consumer = Consumer::builder(client, db, NAME)
        .namespace(namespace)
        .group(group())
        .on::<BenchEvent, _>(record)
        .spawn()
        .await?;
    println!("member {}", consumer.member().unwrap_or_default());
    let mut input = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut input).await;
    consumer.shutdown().await?;
    Ok(())
}

async fn record(_: BenchEvent, meta: Metadata, db: &DatabaseTransaction) -> Result<(), DbErr> {
    let key = meta.key.unwrap_or_default();
    let partition = partition_of(key.as_bytes(), group().partitions);
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO bench_handled (partition, at_ms) VALUES ($1, $2)",
        [i64::from(partition).into(), now_ms().into()],
    ))
    .await
    .map(drop)
}
