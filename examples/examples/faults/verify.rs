//! The checks at the end of a scenario, from outside: the stream read with
//! plain async-nats, the database with plain SQL.

use outbox_nats::async_nats;
use std::collections::{BTreeMap, HashMap, HashSet};

use outbox_nats::async_nats::jetstream;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::procs::Result;

/// What a scenario ended with; every count but the totals must be zero.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Verdict {
    pub(crate) committed: usize,
    pub(crate) committed_keyed: usize,
    pub(crate) rolled_back: usize,
    pub(crate) orders: usize,
    pub(crate) stream_messages: usize,
    pub(crate) effects: usize,
    /// Committed events not in the stream.
    pub(crate) lost: usize,
    /// Events in the stream more than once.
    pub(crate) duplicated_in_stream: usize,
    /// Rolled-back events in the stream.
    pub(crate) rolled_back_in_stream: usize,
    /// Messages that are neither committed nor rolled-back events.
    pub(crate) unknown_in_stream: usize,
    /// Orders whose steps are not 1, 2, … in stream order.
    pub(crate) reordered_keys_in_stream: usize,
    pub(crate) outbox_left: u64,
    pub(crate) relay_dead_letters: u64,
    pub(crate) consumer_dead_letters: u64,
    /// Committed events whose effect was not applied.
    pub(crate) not_applied: usize,
    /// Events applied more than once.
    pub(crate) applied_twice: usize,
    /// Handler calls that found their order at another step than `seq - 1`.
    pub(crate) order_violations: u64,
    /// A group's effects committed by a member that did not own their
    /// partition at the commit.
    pub(crate) non_owner_effects: u64,
    /// A group's members that lived through [`SHARE_WITHIN`] leases of the
    /// producer's run and applied nothing.
    pub(crate) members_without_share: u64,
}

/// Leases of flow within which a member that joins must have handled a
/// share: one look to be seen, one for the others to hand over, one for
/// the messages of its partitions to come.
pub(crate) const SHARE_WITHIN: u32 = 3;

/// What a group scenario's verdict also checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupRun {
    pub(crate) lease: std::time::Duration,
    /// When the producer stopped, in Unix milliseconds.
    pub(crate) flow_ended_ms: i64,
}

impl Verdict {
    pub(crate) fn failures(&self) -> Vec<&'static str> {
        let checks = [
            (self.lost, "committed events missing from the stream"),
            (self.duplicated_in_stream, "events in the stream twice"),
            (
                self.rolled_back_in_stream,
                "rolled-back events in the stream",
            ),
            (self.unknown_in_stream, "unknown messages in the stream"),
            (
                self.reordered_keys_in_stream,
                "keys out of order in the stream",
            ),
            (self.outbox_left as usize, "events left in the outbox"),
            (self.relay_dead_letters as usize, "relay dead letters"),
            (self.consumer_dead_letters as usize, "consumer dead letters"),
            (self.not_applied, "committed events never applied"),
            (self.applied_twice, "events applied twice"),
            (
                self.order_violations as usize,
                "handler calls out of per-key order",
            ),
            (
                self.non_owner_effects as usize,
                "effects committed by a member that did not own the partition",
            ),
            (
                self.members_without_share as usize,
                "group members that handled no share",
            ),
        ];
        (checks.into_iter())
            .filter(|(count, _)| *count > 0)
            .map(|(_, what)| what)
            .collect()
    }

    pub(crate) fn print(&self, scenario: &str) {
        println!(
            "  [{scenario}] committed events      {:>8} ({} keyed steps over {} orders, {} unkeyed)",
            self.committed,
            self.committed_keyed,
            self.orders,
            self.committed - self.committed_keyed
        );
        println!(
            "  [{scenario}] rolled back            {:>8}",
            self.rolled_back
        );
        println!(
            "  [{scenario}] stream messages        {:>8}",
            self.stream_messages
        );
        println!(
            "  [{scenario}] lost / duplicated / rolled back / unknown in stream  {} / {} / {} / {}",
            self.lost,
            self.duplicated_in_stream,
            self.rolled_back_in_stream,
            self.unknown_in_stream
        );
        println!(
            "  [{scenario}] keys out of order in stream  {}",
            self.reordered_keys_in_stream
        );
        println!(
            "  [{scenario}] outbox left / relay dead letters / consumer dead letters  {} / {} / {}",
            self.outbox_left, self.relay_dead_letters, self.consumer_dead_letters
        );
        println!(
            "  [{scenario}] effects {} : not applied {} / applied twice {} / out of per-key order {}",
            self.effects, self.not_applied, self.applied_twice, self.order_violations
        );
    }
}

/// One committed event: its order and step.
#[derive(Debug, Clone, Copy)]
struct Produced {
    keyed: bool,
    order_id: i64,
    seq: i32,
}

pub(crate) async fn verdict(
    db: &DatabaseConnection,
    client: &async_nats::Client,
    stream: &str,
    group: Option<GroupRun>,
) -> Result<Verdict> {
    let mut verdict = Verdict::default();
    let produced: HashMap<String, Produced> =
        rows(db, "SELECT event_id, keyed, order_id, seq FROM produced")
            .await?
            .into_iter()
            .map(|row| {
                Ok((
                    row.try_get_by_index::<String>(0)?,
                    Produced {
                        keyed: row.try_get_by_index(1)?,
                        order_id: row.try_get_by_index(2)?,
                        seq: row.try_get_by_index(3)?,
                    },
                ))
            })
            .collect::<std::result::Result<_, sea_orm::DbErr>>()?;
    let ghosts: HashSet<String> = (rows(db, "SELECT event_id FROM ghosts").await?.into_iter())
        .map(|row| row.try_get_by_index::<String>(0))
        .collect::<std::result::Result<_, _>>()?;
    verdict.committed = produced.len();
    verdict.committed_keyed = produced.values().filter(|p| p.keyed).count();
    verdict.orders = (produced.values().map(|p| p.order_id))
        .collect::<HashSet<_>>()
        .len();
    verdict.rolled_back = ghosts.len();

    // The stream, message by message.
    let stream = jetstream::new(client.clone()).get_stream(stream).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut steps: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        verdict.stream_messages += 1;
        let id = (message.headers.get(outbox_core::headers::MSG_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let count = seen.entry(id.clone()).or_default();
        *count += 1;
        if *count > 1 {
            verdict.duplicated_in_stream += 1;
            continue;
        }
        match produced.get(&id) {
            Some(p) if p.keyed => steps.entry(p.order_id).or_default().push(p.seq),
            Some(_) => {}
            None if ghosts.contains(&id) => verdict.rolled_back_in_stream += 1,
            None => verdict.unknown_in_stream += 1,
        }
    }
    verdict.lost = produced.keys().filter(|id| !seen.contains_key(*id)).count();
    verdict.reordered_keys_in_stream = (steps.values())
        .filter(|seqs| !seqs.iter().zip(1..).all(|(seq, expected)| *seq == expected))
        .count();

    verdict.outbox_left = count(db, OUTBOX_LEFT).await?;
    verdict.relay_dead_letters = count(db, "SELECT COUNT(*) FROM outbox_dead_letters").await?;
    verdict.consumer_dead_letters =
        count(db, "SELECT COUNT(*) FROM outbox_inbox_dead_letters").await?;
    verdict.order_violations = count(db, "SELECT COUNT(*) FROM violations").await?;

    let mut applied: HashMap<String, usize> = HashMap::new();
    for row in rows(db, "SELECT event_id FROM effects").await? {
        *applied
            .entry(row.try_get_by_index::<String>(0)?)
            .or_default() += 1;
        verdict.effects += 1;
    }
    verdict.not_applied = produced
        .keys()
        .filter(|id| !applied.contains_key(*id))
        .count();
    verdict.applied_twice = applied.values().filter(|n| **n > 1).count();
    if let Some(group) = group {
        verdict.non_owner_effects = count(db, NON_OWNER_EFFECTS).await?;
        let lease_ms = i64::try_from(group.lease.as_millis()).unwrap_or(i64::MAX);
        let lived = format!(
            "SELECT COUNT(*) FROM lives WHERE LEAST(last_seen_ms, {}) - started_ms >= {} \
             AND NOT EXISTS (SELECT 1 FROM effects WHERE effects.applied_by = lives.applied_by)",
            group.flow_ended_ms,
            lease_ms.saturating_mul(i64::from(SHARE_WITHIN))
        );
        verdict.members_without_share = count(db, &lived).await?;
    }
    Ok(verdict)
}

/// A group's effects whose partition had another owner when they committed.
const NON_OWNER_EFFECTS: &str =
    "SELECT COUNT(*) FROM effects WHERE owner_seen IS NULL OR owner_seen <> applied_by";

/// Events not delivered yet, scheduled ones included.
const OUTBOX_LEFT: &str =
    "SELECT (SELECT COUNT(*) FROM outbox_messages) + (SELECT COUNT(*) FROM outbox_scheduled)";

/// Effects applied by each consumer process, most first.
pub(crate) async fn shares(db: &DatabaseConnection) -> Result<Vec<u64>> {
    let query = "SELECT COUNT(*) FROM effects GROUP BY applied_by ORDER BY COUNT(*) DESC";
    (rows(db, query).await?.into_iter())
        .map(|row| Ok(u64::try_from(row.try_get_by_index::<i64>(0)?).unwrap_or(0)))
        .collect()
}

/// How many effects the consumer has applied, and events the outbox holds.
pub(crate) async fn progress(db: &DatabaseConnection) -> Result<(u64, u64, u64)> {
    Ok((
        count(db, "SELECT COUNT(*) FROM produced").await?,
        count(db, "SELECT COUNT(*) FROM effects").await?,
        count(db, OUTBOX_LEFT).await?,
    ))
}

async fn rows(db: &DatabaseConnection, query: &str) -> Result<Vec<sea_orm::QueryResult>> {
    let backend = db.get_database_backend();
    Ok(db
        .query_all_raw(Statement::from_string(backend, query))
        .await?)
}

async fn count(db: &DatabaseConnection, query: &str) -> Result<u64> {
    let row = rows(db, query).await?.into_iter().next();
    let n: i64 = match row {
        Some(row) => row.try_get_by_index(0)?,
        None => 0,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}
