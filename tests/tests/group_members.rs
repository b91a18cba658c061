//! Members of one consumer group in one process, over PostgreSQL or MariaDB
//! and NATS: they share the partitions, and each event is handled once, in its key's
//! order, through a member's clean exit. (Kills and pauses of member
//! processes belong to the fault suite.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::consumer::ConsumerHandle;
use outbox_core::consumer::group::GroupConfig;
use outbox_core::inbox::{Handler, Metadata};
use outbox_core::testing::Proxy;
use outbox_nats::Namespace;
use outbox_tests::consumers::inbox_rows;
use outbox_tests::fixtures::{Sequenced, emit_round};
use outbox_tests::{Setup, eventually};
use sea_orm::DatabaseTransaction;

/// A handler's run: the event's key and number, and the member that ran it.
#[derive(Debug)]
struct Ran {
    key: String,
    n: u32,
    member: &'static str,
}

/// Handled events in the order their handlers ran.
#[derive(Debug, Default, Clone)]
struct Log(Arc<Mutex<Vec<Ran>>>);

/// A member's handler: appends to the shared log.
#[derive(Debug, Clone)]
struct Member {
    name: &'static str,
    log: Log,
}

impl Handler<Sequenced> for Member {
    type Error = String;

    async fn handle(
        &self,
        event: Sequenced,
        _meta: Metadata,
        _db: &DatabaseTransaction,
    ) -> Result<(), String> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut log = self.log.0.lock().expect("lock");
        log.push(Ran {
            key: event.key,
            n: event.n,
            member: self.name,
        });
        Ok(())
    }
}

impl Log {
    fn len(&self) -> usize {
        self.0.lock().expect("lock").len()
    }

    fn ran_by(&self, member: &str) -> usize {
        let log = self.0.lock().expect("lock");
        log.iter().filter(|ran| ran.member == member).count()
    }

    /// Checks that every key's events ran once each, in order; returns how
    /// many each member ran.
    fn check(&self, keys: u32, per_key: u32) -> HashMap<&'static str, usize> {
        let log = self.0.lock().expect("lock");
        let mut by_key: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut by_member = HashMap::new();
        for ran in log.iter() {
            by_key.entry(&ran.key).or_default().push(ran.n);
            *by_member.entry(ran.member).or_insert(0) += 1;
        }
        assert_eq!(by_key.len(), keys as usize);
        for (key, ns) in by_key {
            assert_eq!(
                ns,
                (0..per_key).collect::<Vec<_>>(),
                "key {key}: each once, in order"
            );
        }
        by_member
    }
}

const GROUP: GroupConfig = {
    let mut group = GroupConfig::DEFAULT;
    group.partitions = 8;
    group.lease = Duration::from_secs(3);
    group
};

async fn member(setup: &Setup, name: &'static str, log: &Log) -> ConsumerHandle {
    let handler = Member {
        name,
        log: log.clone(),
    };
    setup
        .consumer("ledger")
        .group(GROUP)
        .max_in_flight(4)
        .on::<Sequenced, _>(handler)
        .spawn()
        .await
        .expect("join the group")
}

async fn two_members_share_the_partitions_and_keep_each_keys_order(setup: Setup) {
    let (keys, per_key) = (20, 30);
    let log = Log::default();
    let a = member(&setup, "a", &log).await;
    let b = member(&setup, "b", &log).await;
    // Both members have joined before the events come.
    tokio::time::sleep(GROUP.lease).await;
    for n in 0..per_key {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    let total = (keys * per_key) as usize;
    eventually("every event is handled", async || log.len() >= total).await;
    // The members report the stream's end, and every partition's lag falls
    // to 0 as they store their positions at their next looks.
    eventually("no partition is behind", async || {
        let status = outbox_core::status(setup.db()).await.expect("status");
        let group = &status.groups[0];
        group.stream_end == Some(total as u64)
            && group.partitions.iter().all(|p| p.behind == Some(0))
    })
    .await;
    a.shutdown().await.expect("stop");
    b.shutdown().await.expect("stop");

    let by_member = log.check(keys, per_key);
    assert!(
        by_member["a"] > 0 && by_member["b"] > 0,
        "shared: {by_member:?}"
    );
    assert_eq!(inbox_rows(setup.db()).await, u64::from(keys * per_key));
    setup.finish().await;
}

/// One member stops while both handle a backlog: it finishes what it holds
/// and hands its partitions over, and the other goes on from where it left
/// each of them.
async fn a_member_that_stops_hands_its_partitions_over(setup: Setup) {
    let (keys, per_key) = (20, 30);
    for n in 0..per_key {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    let log = Log::default();
    let a = member(&setup, "a", &log).await;
    let b = member(&setup, "b", &log).await;
    let total = (keys * per_key) as usize;
    eventually("a has handled some", async || log.ran_by("a") > 20).await;
    a.shutdown().await.expect("a stops");
    eventually("every event is handled", async || log.len() >= total).await;
    b.shutdown().await.expect("stop");

    let by_member = log.check(keys, per_key);
    assert!(
        by_member["a"] > 0 && by_member["b"] > 0,
        "shared: {by_member:?}"
    );
    assert_eq!(inbox_rows(setup.db()).await, u64::from(keys * per_key));
    setup.finish().await;
}

/// A new group starts where it is told (`StartAt::New`): the history the
/// stream holds is not handled, what comes after is, once each in order.
async fn a_new_group_starts_where_it_is_told(setup: Setup) {
    use outbox_nats::StartAt;
    let keys = 10;
    for n in 0..2 {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    let log = Log::default();
    let handler = Member {
        name: "a",
        log: log.clone(),
    };
    let a = (setup.consumer("ledger"))
        .group(GROUP)
        .start_at(StartAt::New)
        .on::<Sequenced, _>(handler)
        .spawn()
        .await
        .expect("join the group");
    for n in 2..5 {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    let after = (keys * 3) as usize;
    eventually("the new events are handled", async || log.len() >= after).await;
    // A look at the group later, nothing more has come.
    tokio::time::sleep(GROUP.renewal()).await;
    a.shutdown().await.expect("stop");
    {
        let ran = log.0.lock().expect("lock");
        assert_eq!(ran.len(), after, "only the events after the start");
        assert!(ran.iter().all(|ran| ran.n >= 2), "no history: {ran:?}");
    }
    setup.finish().await;
}

/// The owners of the `ledger` group's partitions, as `outbox status` shows them.
async fn owners(setup: &Setup) -> Vec<Option<String>> {
    let status = outbox_core::status(setup.db()).await.expect("status");
    (status.groups.iter())
        .flat_map(|group| group.partitions.iter().map(|p| p.owner.clone()))
        .collect()
}

/// A member cut off from NATS but not from the database (its connection
/// goes through a proxy the test cuts) hands its partitions over a lease
/// later, and the other member handles everything meanwhile; once it
/// reaches NATS again it takes its share back. Each event once, each key
/// in order, throughout.
async fn a_member_cut_off_from_nats_hands_its_partitions_over(setup: Setup) {
    let (keys, per_key) = (10, 10);
    let log = Log::default();
    let proxy = (Proxy::start(&outbox_tests::nats::nats_url()).await).expect("a proxy");
    let cut_off = async_nats::connect(proxy.url()).await.expect("connect");
    let handler = Member {
        name: "a",
        log: log.clone(),
    };
    let a = (Namespace::new(cut_off, setup.nats.namespace.clone()))
        .consumer(setup.db().clone(), "ledger")
        .group(GROUP)
        .max_in_flight(4)
        .on::<Sequenced, _>(handler)
        .spawn()
        .await
        .expect("a joins");
    let b = member(&setup, "b", &log).await;
    let (a_id, b_id) = (a.member().map(str::to_owned), b.member().map(str::to_owned));
    eventually("both own partitions", async || {
        let owners = owners(&setup).await;
        owners.contains(&a_id) && owners.contains(&b_id)
    })
    .await;

    proxy.cut();
    for n in 0..per_key {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    eventually("b owns every partition", async || {
        owners(&setup).await.iter().all(|owner| *owner == b_id)
    })
    .await;
    let total = (keys * per_key) as usize;
    eventually("b handles what a held", async || log.len() >= total).await;

    proxy.restore();
    eventually("a takes its share back", async || {
        owners(&setup).await.contains(&a_id)
    })
    .await;
    for n in per_key..2 * per_key {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    eventually("every event is handled", async || log.len() >= 2 * total).await;
    a.shutdown().await.expect("stop");
    b.shutdown().await.expect("stop");

    let by_member = log.check(keys, 2 * per_key);
    assert!(by_member["b"] > 0, "shared: {by_member:?}");
    assert_eq!(inbox_rows(setup.db()).await, u64::from(2 * keys * per_key));
    setup.finish().await;
}

/// One consumer name cannot run as a group in one process and alone in
/// another: each would keep key order its own way. Whichever starts second
/// is refused, naming how the name runs.
async fn a_name_runs_as_a_group_or_alone_not_both(setup: Setup) {
    use outbox_core::consumer::StartError;
    use outbox_nats::ConsumerError;
    let log = Log::default();
    let handler = |name| Member {
        name,
        log: log.clone(),
    };
    let grouped = member(&setup, "a", &log).await;
    let alone = (setup.consumer("ledger"))
        .on::<Sequenced, _>(handler("b"))
        .spawn()
        .await;
    match alone {
        Err(ConsumerError::Inbox(StartError::MixedWithGroup { elsewhere, .. })) => {
            assert_eq!(elsewhere, "as a group")
        }
        other => panic!("a single consumer beside a group: {other:?}"),
    }
    grouped.shutdown().await.expect("stop");

    let alone = (setup.consumer("ledger"))
        .on::<Sequenced, _>(handler("b"))
        .spawn()
        .await
        .expect("the group has left: the name may run alone");
    let grouped = (setup.consumer("ledger"))
        .group(GROUP)
        .on::<Sequenced, _>(handler("a"))
        .spawn()
        .await;
    match grouped {
        Err(ConsumerError::Inbox(StartError::MixedWithGroup { elsewhere, .. })) => {
            assert_eq!(elsewhere, "as a single consumer")
        }
        other => panic!("a member beside a single consumer: {other:?}"),
    }
    alone.shutdown().await.expect("stop");
    setup.finish().await;
}

outbox_tests::on_postgres_and_mysql!(
    two_members_share_the_partitions_and_keep_each_keys_order,
    a_member_that_stops_hands_its_partitions_over,
    a_name_runs_as_a_group_or_alone_not_both,
    a_new_group_starts_where_it_is_told,
    a_member_cut_off_from_nats_hands_its_partitions_over,
);
