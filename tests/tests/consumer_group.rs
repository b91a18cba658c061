//! The consumer group's tables on every backend: partitions created once
//! with their count, taken only when free or expired, and the fence that
//! keeps a member that lost a partition from committing for it.

use std::time::Duration;

use outbox_core::consumer::group::{self, Claim, GroupError};
use outbox_core::entity::inbox_message;
use outbox_tests::TestDb;
use sea_orm::{
    ActiveValue, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait,
    Statement, TransactionTrait,
};

const LEASE_MS: i64 = 10_000;

/// Takes partition 0 for `member` at `now_ms`.
async fn take(db: &DatabaseConnection, member: &str, now_ms: i64) -> Option<Claim> {
    group::take(db, "billing", 0, member, now_ms, now_ms + LEASE_MS)
        .await
        .expect("take")
}

/// Writes an effect (an inbox row), then checks the fence, in one
/// transaction that commits only if the fence holds: what a batch does.
async fn commit_fenced(db: &DatabaseConnection, member: &str, claim: &Claim) -> bool {
    let txn = db.begin().await.expect("begin");
    effect(&txn).await;
    let holds = group::fence(&txn, "billing", member, std::slice::from_ref(claim))
        .await
        .expect("fence");
    match holds {
        true => txn.commit().await.expect("commit"),
        false => txn.rollback().await.expect("rollback"),
    }
    holds
}

async fn effect(db: &impl sea_orm::ConnectionTrait) {
    let row = inbox_message::ActiveModel {
        consumer: ActiveValue::Set("billing".to_owned()),
        event_id: ActiveValue::Set(uuid::Uuid::now_v7()),
        processed_at: ActiveValue::Set(chrono::Utc::now()),
    };
    inbox_message::Entity::insert(row)
        .exec_without_returning(db)
        .await
        .expect("the effect");
}

async fn effects(db: &DatabaseConnection) -> u64 {
    inbox_message::Entity::find()
        .count(db)
        .await
        .expect("count")
}

/// Partitions are created once, with their count and where the group starts
/// (a member started later, told to start elsewhere, changes nothing).
async fn partitions_are_created_once_with_their_count(db: &DatabaseConnection) {
    group::ensure_partitions(db, "billing", 4, 41)
        .await
        .expect("create");
    group::ensure_partitions(db, "billing", 4, 99)
        .await
        .expect("again: nothing to do");
    let rows = group::partitions(db, "billing").await.expect("read");
    let indexes: Vec<_> = rows.iter().map(|row| row.partition_index).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    assert!(rows.iter().all(|row| row.owner.is_none() && row.epoch == 0));
    assert!(rows.iter().all(|row| row.position == 41), "{rows:?}");
    match group::ensure_partitions(db, "billing", 8, 0).await {
        Err(GroupError::PartitionCount {
            stored: 4,
            configured: 8,
            ..
        }) => {}
        other => panic!("another count must be refused, got {other:?}"),
    }
    group::ensure_partitions(db, "shipping", 2, 0)
        .await
        .expect("another name, its own count");
}

async fn a_partition_is_taken_only_when_free_or_its_lease_ended(db: &DatabaseConnection) {
    group::ensure_partitions(db, "billing", 2, 0)
        .await
        .expect("create");
    let now = 1_000_000;
    let a = take(db, "a", now).await.expect("free: a takes it");
    assert_eq!((a.partition, a.epoch, a.position), (0, 1, 0));
    assert_eq!(take(db, "b", now + 1).await, None, "a's lease holds");
    assert!(
        group::advance(db, "billing", "a", &a, 41)
            .await
            .expect("advance")
    );

    let later = now + LEASE_MS + 1;
    let b = take(db, "b", later)
        .await
        .expect("a's lease ended: b takes it");
    assert_eq!(
        (b.epoch, b.position),
        (2, 41),
        "a new epoch, from where a left it"
    );
    assert!(
        !group::advance(db, "billing", "a", &a, 99)
            .await
            .expect("advance"),
        "a lost it"
    );
    assert!(
        !group::release(db, "billing", "a", &a, 99)
            .await
            .expect("release"),
        "a lost it"
    );

    assert!(
        group::release(db, "billing", "b", &b, 50)
            .await
            .expect("release")
    );
    let c = take(db, "c", later).await.expect("released: free at once");
    assert_eq!((c.epoch, c.position), (3, 50));
}

async fn renewing_keeps_a_members_partitions_and_shows_it_alive(db: &DatabaseConnection) {
    group::ensure_partitions(db, "billing", 2, 0)
        .await
        .expect("create");
    let now = 1_000_000;
    group::renew(db, "billing", "a", now, now + LEASE_MS, None)
        .await
        .expect("join");
    group::renew(db, "billing", "b", now, now + 10, None)
        .await
        .expect("join");
    take(db, "a", now).await.expect("a takes partition 0");
    let later = now + LEASE_MS / 2;
    let owned = group::renew(db, "billing", "a", later, later + LEASE_MS, None)
        .await
        .expect("renew");
    assert_eq!(owned, 1, "a still owns its partition");
    assert_eq!(
        group::members(db, "billing", later).await.expect("members"),
        ["a"],
        "b's lease ended"
    );
    assert_eq!(
        take(db, "b", now + LEASE_MS + 1).await,
        None,
        "renewed: still a's"
    );
}

/// A member whose partition was taken after its lease ended (a paused
/// process) commits nothing more for it, while its earlier batch stands.
async fn a_member_that_lost_its_partition_commits_nothing(db: &DatabaseConnection) {
    group::ensure_partitions(db, "billing", 1, 0)
        .await
        .expect("create");
    let now = 1_000_000;
    let a = take(db, "a", now).await.expect("a takes it");
    assert!(
        commit_fenced(db, "a", &a).await,
        "a holds it: its batch commits"
    );
    take(db, "b", now + LEASE_MS + 1).await.expect("b takes it");
    assert!(!commit_fenced(db, "a", &a).await, "a is fenced");
    assert_eq!(effects(db).await, 1, "a's second batch rolled back");
}

/// A take waits for the batch in flight: the batch, fenced in time,
/// commits, and the take sees its end. (Without the fence's lock, the take
/// goes through at once and the test fails.)
async fn a_take_waits_for_the_batch_in_flight(db: &DatabaseConnection) {
    group::ensure_partitions(db, "billing", 1, 0)
        .await
        .expect("create");
    let now = 1_000_000;
    let a = take(db, "a", now).await.expect("a takes it");
    let txn = db.begin().await.expect("begin");
    effect(&txn).await;
    assert!(
        group::fence(&txn, "billing", "a", &[a])
            .await
            .expect("fence")
    );
    let taking = tokio::spawn({
        let db = db.clone();
        async move { take(&db, "b", now + LEASE_MS + 1).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!taking.is_finished(), "the take waits for a's batch");
    txn.commit().await.expect("a's batch commits");
    let b = taking.await.expect("join").expect("then b takes it");
    assert_eq!(b.epoch, a.epoch + 1);
    assert_eq!(effects(db).await, 1);
}

/// A batch that does not end (its process paused mid-commit) holds a take
/// back for a second, not for the database's lock wait (MySQL's default is
/// 50 s): the take fails, to be tried again at the next look, and succeeds
/// once the batch ends. MySQL's wait is a session setting: the taker's only
/// connection has its default back afterwards.
async fn a_take_gives_up_on_a_batch_that_does_not_end(test: &TestDb) {
    let db = &test.db;
    group::ensure_partitions(db, "billing", 1, 0)
        .await
        .expect("create");
    let now = 1_000_000;
    let a = take(db, "a", now).await.expect("a takes it");
    let paused = db.begin().await.expect("begin");
    effect(&paused).await;
    assert!(
        group::fence(&paused, "billing", "a", &[a])
            .await
            .expect("fence")
    );

    let mut options = sea_orm::ConnectOptions::new(&test.url);
    options.max_connections(1).sqlx_logging(false);
    let taker = sea_orm::Database::connect(options).await.expect("connect");
    let later = now + LEASE_MS + 1;
    let attempt = group::take(&taker, "billing", 0, "b", later, later + LEASE_MS);
    let gave_up = tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .expect("the take gives up well before the database's own lock wait");
    assert!(gave_up.is_err(), "the take fails: {gave_up:?}");
    if taker.get_database_backend() == DbBackend::MySql {
        let wait = taker
            .query_one_raw(Statement::from_string(
                DbBackend::MySql,
                "SELECT @@SESSION.innodb_lock_wait_timeout = @@GLOBAL.innodb_lock_wait_timeout",
            ))
            .await
            .expect("read the setting")
            .expect("a row");
        let restored: i64 = wait.try_get_by_index(0).expect("a number");
        assert_eq!(
            restored, 1,
            "the session's lock wait is back to its default"
        );
    }
    paused.commit().await.expect("the paused batch ends");
    let b = group::take(&taker, "billing", 0, "b", later, later + LEASE_MS).await;
    assert_eq!(b.expect("take").expect("b takes it").epoch, a.epoch + 1);
    taker.close().await.expect("close");
}

mod a_take_gives_up_on_a_batch_that_does_not_end {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let test = outbox_tests::TestDb::postgres().await;
        super::a_take_gives_up_on_a_batch_that_does_not_end(&test).await;
        test.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        let test = outbox_tests::TestDb::mysql().await;
        super::a_take_gives_up_on_a_batch_that_does_not_end(&test).await;
        test.finish().await;
    }
}

outbox_tests::on_each_backend!(
    partitions_are_created_once_with_their_count,
    a_partition_is_taken_only_when_free_or_its_lease_ended,
    renewing_keeps_a_members_partitions_and_shows_it_alive,
    a_member_that_lost_its_partition_commits_nothing,
    a_take_waits_for_the_batch_in_flight,
);
