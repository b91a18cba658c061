//! Waking relays: a commit in this process, only the relays of its database,
//! and PostgreSQL's `NOTIFY` from another. In a test binary of their own, where no other test commits
//! events, so that a wake-up can only come from what the test itself does;
//! and one test at a time, since a commit in one would wake the other's relay.

use std::time::Duration;

use outbox_core::inbox::{Metadata, Processed};
use outbox_core::relay::Relay;
use outbox_core::testing::{MemoryPublisher, TestConsumer};
use outbox_core::{CommitSignal, emit, transactional};
use outbox_tests::fixtures::{AppError, OrderCreated};
use outbox_tests::{Setup, TestDb, drained, emit_one, fast};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn commit_wakes_relays(db: &DatabaseConnection) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut signal = CommitSignal::subscribe();
    let order = OrderCreated {
        order_id: 1,
        total_cents: 10,
    };
    emit_one(db, order).await.expect("commit");
    tokio::time::timeout(Duration::from_secs(10), signal.committed())
        .await
        .expect("the commit signals relays in this process");
}

/// Emits one event in a savepoint of the caller's transaction, due `after`
/// from now if given.
#[transactional]
async fn emit_inside<C: TransactionTrait>(
    db: &C,
    order_id: i64,
    after: Option<Duration>,
) -> Result<(), AppError> {
    let event = OrderCreated {
        order_id,
        total_cents: 10,
    };
    match after {
        Some(after) => emit!(event, after = after),
        None => emit!(event),
    };
    Ok(())
}

/// Emits nothing itself: its one event comes from the nested call, whose
/// savepoint is released (and a relay woken) before this transaction
/// commits. The pause lets the woken relay's round, which cannot see the
/// event yet, end before the commit.
#[transactional]
async fn outer_emitting_through_a_nested_call(
    db: &DatabaseConnection,
    order_id: i64,
    after: Option<Duration>,
) -> Result<(), AppError> {
    emit_inside(db, order_id, after).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Waits up to 10 s for `publisher` to hold an event; returns how many it holds.
async fn published_within(publisher: &MemoryPublisher) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while publisher.published().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.published().len()
}

/// A relay over `db` that polls once an hour: only a wake-up makes it
/// deliver an event committed after its first round.
fn hourly(db: &DatabaseConnection, publisher: &MemoryPublisher) -> outbox_core::relay::RelayHandle {
    Relay::builder(db.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(3600))
        .spawn()
}

/// Starts a relay that polls once an hour and lets its first round find the
/// outbox empty, runs `commit`, and waits up to 10 s for the relay to publish
/// an event: returns how many it published.
async fn published_after(db: &DatabaseConnection, commit: impl AsyncFnOnce()) -> usize {
    let publisher = MemoryPublisher::new();
    let relay = hourly(db, &publisher);
    tokio::time::sleep(Duration::from_millis(300)).await;
    commit().await;
    let published = published_within(&publisher).await;
    relay.shutdown().await.expect("relay stops");
    published
}

/// Only a wake-up after the outer commit delivers the nested call's event
/// within the bound. (Without the outer transaction's own signal, the test
/// fails; the pause in the outer call is what makes it able to fail, and a
/// slower relay could only make it pass.)
async fn a_nested_calls_events_wake_relays_at_the_outer_commit(db: &DatabaseConnection) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let published = published_after(db, async || {
        outer_emitting_through_a_nested_call(db, 7, None)
            .await
            .expect("commit");
    })
    .await;
    assert_eq!(published, 1, "the outer commit wakes the relay");
}

/// The same for a scheduled event: the relay woken by the nested call looks
/// for scheduled events before the outer commit, finds none, and without a
/// second wake-up would not look again for an hour.
async fn a_nested_calls_scheduled_event_is_delivered_at_its_time(db: &DatabaseConnection) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let published = published_after(db, async || {
        outer_emitting_through_a_nested_call(db, 8, Some(Duration::from_millis(700)))
            .await
            .expect("commit");
    })
    .await;
    assert_eq!(published, 1, "delivered once due, not at the next poll");
}

/// A transaction the caller commits itself: the `#[transactional]` call in
/// it wakes the relay before the commit, and `wake_relays` after the commit
/// delivers the event without waiting for the relay's hourly poll. (Without
/// the call, the test fails.)
async fn wake_relays_after_committing_a_transaction_yourself(db: &DatabaseConnection) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let published = published_after(db, async || {
        let txn = db.begin().await.expect("begin");
        emit_inside(&txn, 9, None).await.expect("emit");
        tokio::time::sleep(Duration::from_millis(500)).await;
        txn.commit().await.expect("commit");
        outbox_core::wake_relays();
    })
    .await;
    assert_eq!(published, 1, "wake_relays wakes the relay");
}

/// A consumer's handler whose follow-up event, scheduled, comes from a
/// `#[transactional]` call in the handler's transaction. The pause lets the
/// relay woken by that call's savepoint look for scheduled events, and find
/// none yet, before the consumer commits.
async fn reserve_later(
    event: OrderCreated,
    _meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    emit_inside(db, event.order_id, Some(Duration::from_millis(300))).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// A handler's scheduled event: its savepoint wakes the relay before the
/// consumer's transaction commits; the consumer wakes it again after, and
/// the relay looks for scheduled events then. (Without the consumer's second
/// wake-up counting scheduled events, the test fails.)
async fn a_handlers_scheduled_event_is_delivered_at_its_time(db: &DatabaseConnection) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let consumer = TestConsumer::new(db.clone(), "stock")
        .on::<OrderCreated, _>(reserve_later)
        .expect("one handler");
    let published = published_after(db, async || {
        let order = OrderCreated {
            order_id: 11,
            total_cents: 10,
        };
        let processed = (consumer.deliver(uuid::Uuid::now_v7(), &order))
            .await
            .expect("delivered");
        assert_eq!(processed, Processed::Handled);
    })
    .await;
    assert_eq!(published, 1, "delivered once due, not at the next poll");
}

outbox_tests::on_each_backend!(
    commit_wakes_relays,
    a_nested_calls_events_wake_relays_at_the_outer_commit,
    a_nested_calls_scheduled_event_is_delivered_at_its_time,
    wake_relays_after_committing_a_transaction_yourself,
    a_handlers_scheduled_event_is_delivered_at_its_time
);

/// Two relays on two databases in one process: a commit on one wakes its
/// own relay, not the other's. The other's outbox holds an event that only a
/// wake-up delivers, which `wake_relays` finally gives, to show the relay
/// was able to. (With one signal for the whole process, the test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_only_the_relays_of_its_database() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (a, b) = (TestDb::sqlite().await, TestDb::mysql().await);
    let (to_a, to_b) = (MemoryPublisher::new(), MemoryPublisher::new());
    let (relay_a, relay_b) = (hourly(&a.db, &to_a), hourly(&b.db, &to_b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Committed without a wake-up after the commit: the savepoint's release
    // wakes relays before the event is visible, and the pause lets that
    // round end empty.
    let txn = b.db.begin().await.expect("begin");
    emit_inside(&txn, 1, None).await.expect("emit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    txn.commit().await.expect("commit");

    let order = OrderCreated {
        order_id: 2,
        total_cents: 10,
    };
    emit_one(&a.db, order).await.expect("commit");
    assert_eq!(
        published_within(&to_a).await,
        1,
        "a's commit wakes a's relay"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(to_b.published().is_empty(), "a's commit woke b's relay");

    outbox_core::wake_relays();
    assert_eq!(
        published_within(&to_b).await,
        1,
        "b's relay delivers once woken"
    );
    relay_a.shutdown().await.expect("relay stops");
    relay_b.shutdown().await.expect("relay stops");
    a.finish().await;
    b.finish().await;
}

/// The relay polls once an hour, nothing in this process commits events,
/// and the event is inserted after the relay's last round: only a
/// notification can make it deliver within the bound. (Without
/// `notify::enable`, the test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_a_relay_across_processes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    outbox_core::relay::notify::enable(db)
        .await
        .expect("install the trigger");
    // Another process's commits: plain INSERTs, which signal nothing in this process.
    let insert = async |order_id: i64| {
        db.execute_unprepared(&format!(
            "INSERT INTO outbox_messages (id, event_type, event_version, exchange, subject, \
             partition_key, payload, content_type, created_at, attempts, next_attempt_at) \
             VALUES ('{}', 'OrderCreated', 1, 'orders', 'orders.order.{order_id}.created', \
             '{order_id}', convert_to('{{\"order_id\":{order_id},\"total_cents\":5}}', 'UTF8'), \
             'application/json', now(), 0, now())",
            uuid::Uuid::now_v7()
        ))
        .await
        .expect("insert from another process");
    };
    insert(1).await;
    let relay = fast(db, nats.publisher())
        .poll_interval(Duration::from_secs(3600))
        .wake_on_notify()
        .spawn();
    // Its first rounds deliver the first event; then it waits for an hour.
    drained(db, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    insert(2).await;
    drained(db, Duration::from_secs(30)).await;
    relay.shutdown().await.expect("relay stops");
    assert_eq!(nats.messages(stream).await.len(), 2);
    setup.finish().await;
}
