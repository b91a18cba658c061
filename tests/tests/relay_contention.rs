//! Relays contending for one MariaDB outbox: three relays draining while
//! events keep coming, each on a pool of its own as each process would, get
//! every event out once without a failed round; and a deadlock, when the
//! database does break one, is known for the transient conflict it is.
//!
//! The drain has not deadlocked here even before the fix: the two-relay
//! settle test below reproduces the reported deadlock on cue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use outbox_core::entity::outbox_message;
use outbox_core::relay::{Delivery, Publisher, Relay};
use outbox_tests::fixtures::emit_round;
use outbox_tests::{Setup, TestDb, drained, emit_one};
use sea_orm::{EntityTrait, PaginatorTrait};

/// Whether a relay round failed on a lock conflict the database broke.
fn is_deadlock(error: &outbox_core::Error) -> bool {
    let text = outbox_core::ErrorReport(error).to_string();
    text.contains("1213") || text.to_lowercase().contains("deadlock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_mariadb_do_not_deadlock_each_other() {
    let setup = Setup::mysql().await;
    let test = &setup.test;
    let (deadlocks, other_errors) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let done = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    for _ in 0..3 {
        let pool = test.pool(|options| {
            options.max_connections(2);
        });
        let relay = Relay::builder(pool.await, setup.nats.publisher())
            .batch_size(25)
            .build();
        let (deadlocks, other_errors, done) =
            (deadlocks.clone(), other_errors.clone(), done.clone());
        relays.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                match relay.drain().await {
                    Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                    Err(error) if is_deadlock(&error) => {
                        deadlocks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        eprintln!("relay error: {}", outbox_core::ErrorReport(&error));
                        other_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // 1,000 transactions of 8 keyed events each, while the relays drain.
    for n in 0..1_000 {
        emit_round(&test.db, n, 8).await.expect("commit");
    }
    drained(&test.db, Duration::from_secs(120)).await;
    done.store(true, Ordering::Relaxed);
    for relay in relays {
        relay.await.expect("relay task");
    }
    assert_eq!(
        setup.nats.messages(&setup.stream).await.len(),
        8_000,
        "every event once"
    );
    let (deadlocks, other_errors) = (
        deadlocks.load(Ordering::Relaxed),
        other_errors.load(Ordering::Relaxed),
    );
    setup.finish().await;
    assert_eq!((deadlocks, other_errors), (0, 0), "deadlocks, other errors");
}

/// Stores everything, but only once both relays of the test are
/// publishing, telling the test when one starts: the moment the settles'
/// contention needs, which no real broker produces on cue (a fault at an
/// exact moment: the one stand-in here).
#[derive(Clone)]
struct AllAtOnce {
    publishing: Arc<tokio::sync::Notify>,
    barrier: Arc<tokio::sync::Barrier>,
}

impl Publisher for AllAtOnce {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        self.publishing.notify_one();
        // Bounded, so that a relay that claimed nothing fails the test
        // instead of hanging it.
        let met = tokio::time::timeout(Duration::from_secs(10), self.barrier.wait()).await;
        assert!(met.is_ok(), "the other relay never published");
        vec![Delivery::Stored { duplicate: false }; events.len()]
    }
}

/// Two relays settle at the same moment on MariaDB, one holding the older
/// events, the other those committed while the first was publishing. A
/// `DELETE ... WHERE id IN (...)` over half of a small table was planned as
/// a table scan, which waits on every row the other relay holds: each
/// waited for the other and InnoDB failed one round with a deadlock (1213),
/// every run of this test. Deleting by primary key, each settle reads only
/// its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_settling_at_once_on_mariadb_do_not_deadlock() {
    let test = TestDb::mysql().await;
    let publisher = AllAtOnce {
        publishing: Arc::new(tokio::sync::Notify::new()),
        barrier: Arc::new(tokio::sync::Barrier::new(2)),
    };
    let round = |publisher: AllAtOnce| {
        let relay = Relay::builder(test.db.clone(), publisher)
            .batch_size(20)
            .build();
        tokio::spawn(async move { relay.process_batch().await })
    };
    for n in 0..30 {
        emit_one(&test.db, Stray { n }).await.expect("commit");
    }
    let first = round(publisher.clone());
    publisher.publishing.notified().await;
    for n in 30..50 {
        emit_one(&test.db, Stray { n }).await.expect("commit");
    }
    let second = round(publisher.clone());
    for relay in [first, second] {
        let round = relay.await.expect("relay task");
        let round = round.map_err(|error| outbox_core::ErrorReport(&error).to_string());
        assert_eq!(round.map(|report| report.published), Ok(20));
    }
    let left = outbox_message::Entity::find()
        .count(&test.db)
        .await
        .expect("count");
    assert_eq!(left, 10, "the 10 events neither round took");
    test.finish().await;
}

/// An unkeyed event: rounds take it without looking at keys.
#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(exchange = "strays", routing_key = "stray")]
struct Stray {
    n: u32,
}

/// Provokes a real deadlock between two transactions on `db` (each locks
/// one row, then asks for the other's) and returns the loser's error.
async fn a_deadlock(db: &sea_orm::DatabaseConnection) -> outbox_core::Error {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    db.execute_unprepared("INSERT INTO orders (id, total_cents) VALUES (1, 0), (2, 0)")
        .await
        .expect("two rows");
    let lock = |id: i64| format!("UPDATE orders SET total_cents = total_cents + 1 WHERE id = {id}");
    let (first, second) = (
        db.begin().await.expect("begin"),
        db.begin().await.expect("begin"),
    );
    first
        .execute_unprepared(&lock(1))
        .await
        .expect("lock row 1");
    second
        .execute_unprepared(&lock(2))
        .await
        .expect("lock row 2");
    let (one, two) = (lock(1), lock(2));
    let (a, b) = tokio::join!(first.execute_unprepared(&two), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        second.execute_unprepared(&one).await
    });
    let error = a
        .err()
        .or(b.err())
        .expect("the database broke the deadlock");
    outbox_core::Error::from(error)
}

/// The relay retries a round the database failed to break a deadlock at
/// once, without backing off as from an outage: it must know one when it
/// sees one, on each database that locks rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_known_as_a_lock_conflict() {
    for test in [TestDb::mysql().await, TestDb::postgres().await] {
        let error = a_deadlock(&test.db).await;
        assert!(
            error.is_lock_conflict(),
            "{}",
            outbox_core::ErrorReport(&error)
        );
        let outage = outbox_core::Error::from(sea_orm::DbErr::ConnectionAcquire(
            sea_orm::ConnAcquireErr::Timeout,
        ));
        assert!(!outage.is_lock_conflict());
        test.finish().await;
    }
}
