//! The logical relay against a private PostgreSQL started with
//! `wal_level = logical` (the shared server runs `replica`) and the shared
//! NATS server, each test with its own server and stream names.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use outbox_core::relay::logical::{LogicalError, LogicalRelay, retire, slot_status};
use outbox_core::relay::{Publisher, RelayHandle};
use outbox_nats::JetStreamPublisher;
use outbox_tests::fixtures::{AppError, Sequenced, StockReserved, emit_round};
use outbox_tests::nats::TestNats;
use outbox_tests::private_postgres::PrivatePostgres;
use outbox_tests::{TestDb, emit_one, eventually, fast};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};

/// A private server, its outbox migrated, and a NATS namespace with the
/// `ORDERS` stream.
struct Logical {
    db: DatabaseConnection,
    url: String,
    nats: TestNats,
    stream: String,
    pg: PrivatePostgres,
    _dir: tempfile::TempDir,
}

impl Logical {
    async fn start() -> Self {
        Self::with_window(Duration::from_secs(120)).await
    }

    /// With the stream's duplicate window set to `window`.
    async fn with_window(window: Duration) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pg = PrivatePostgres::start(dir.path())
            .await
            .expect("a private PostgreSQL");
        let (url, db) = pg.outbox().await.expect("a migrated outbox");
        let nats = TestNats::shared().await;
        let spec = nats.stream("ORDERS", "orders");
        outbox_nats::provision(
            nats.publisher().context(),
            std::slice::from_ref(&spec),
            window,
        )
        .await
        .expect("provision the stream");
        Self {
            db,
            url,
            nats,
            stream: spec.name,
            pg,
            _dir: dir,
        }
    }

    fn relay(&self) -> LogicalRelay<JetStreamPublisher> {
        self.relay_with(self.nats.publisher())
    }

    fn relay_with<P: Publisher>(&self, publisher: P) -> LogicalRelay<P> {
        let relay = fast(&self.db, publisher).max_attempts(2).build();
        LogicalRelay::new(relay, &self.url)
            .expect("a valid URL")
            .heartbeat(Duration::from_millis(200))
            .standby_poll(Duration::from_millis(100))
    }

    async fn messages(&self) -> Vec<StreamMessage> {
        self.nats.messages(&self.stream).await
    }

    /// Waits until the stream holds `count` messages.
    async fn stored(&self, count: u64) {
        let context = async_nats::jetstream::new(self.nats.client.clone());
        let mut stream = context.get_stream(&self.stream).await.expect("stream");
        eventually(&format!("the stream holds {count} messages"), async || {
            stream.info().await.expect("stream info").state.messages >= count
        })
        .await;
    }

    async fn rows(&self, table: &str) -> i64 {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                format!("SELECT count(*) FROM {table}"),
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get_by_index(0).expect("a count")
    }

    async fn finish(self) {
        self.db.close().await.expect("close");
        self.nats.finish().await;
    }
}

/// Each key's `n`s in stream order, and every message id once.
fn per_key(messages: &[StreamMessage]) -> HashMap<String, Vec<u32>> {
    let mut ids = HashSet::new();
    let mut keys: HashMap<String, Vec<u32>> = HashMap::new();
    for message in messages {
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .expect("a message id")
            .to_string();
        assert!(ids.insert(id.clone()), "event {id} is in the stream twice");
        let event: Sequenced = serde_json::from_slice(&message.payload).expect("a Sequenced event");
        keys.entry(event.key).or_default().push(event.n);
    }
    keys
}

/// Writes `n` to the `written` table and emits it for keys `k0` and `k1`.
#[outbox_core::transactional]
async fn emit_written(db: &DatabaseConnection, n: u32) -> Result<(), AppError> {
    db.execute_unprepared(&format!("INSERT INTO written (n) VALUES ({n})"))
        .await?;
    for k in 0..2 {
        outbox_core::emit!(Sequenced {
            key: format!("k{k}"),
            n
        });
    }
    Ok(())
}

/// Whether `n` is in the `written` table (false while it cannot be read).
async fn was_written(db: &DatabaseConnection, n: u32) -> bool {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT 1 FROM written WHERE n = {n}"),
        ))
        .await;
    matches!(row, Ok(Some(_)))
}

/// Emits an event, then fails: the transaction rolls back.
#[outbox_core::transactional]
async fn emit_then_fail(db: &DatabaseConnection, n: u32) -> Result<(), AppError> {
    outbox_core::emit!(Sequenced {
        key: "rolled-back".into(),
        n
    });
    Err(AppError::Rejected)
}

async fn shut(handle: RelayHandle) {
    handle.shutdown().await.expect("the relay stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_event_arrives_once_in_commit_order_and_no_rolled_back_one() {
    let test = Logical::start().await;
    // Written before any logical relay ran: rows in the table, drained first.
    for n in 0..5 {
        emit_round(&test.db, n, 3).await.expect("commit");
    }
    let relay = test.relay().spawn();
    for n in 5..100 {
        emit_round(&test.db, n, 3).await.expect("commit");
        if n % 10 == 0 {
            assert!(emit_then_fail(&test.db, n).await.is_err());
        }
    }
    test.stored(300).await;
    shut(relay).await;
    let messages = test.messages().await;
    assert_eq!(messages.len(), 300, "every committed event, once");
    let keys = per_key(&messages);
    assert!(
        !keys.contains_key("rolled-back"),
        "no event of a rolled-back transaction"
    );
    for k in 0..3 {
        assert_eq!(
            keys[&format!("k{k}")],
            (0..100).collect::<Vec<_>>(),
            "key k{k} in commit order"
        );
    }
    assert_eq!(
        test.rows("outbox_messages").await,
        0,
        "captured events leave no row"
    );
    let header = |name: &str| messages[0].headers.get(name).map(|v| v.to_string());
    assert_eq!(header("Outbox-Event-Type").as_deref(), Some("Sequenced"));
    assert_eq!(header("Outbox-Partition-Key").as_deref(), Some("k0"));
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_postgres_while_events_flow_loses_none_and_keeps_order() {
    let test = Logical::start().await;
    test.db
        .execute_unprepared("CREATE TABLE written (n INT PRIMARY KEY)")
        .await
        .expect("create table");
    let relay = test.relay().spawn();
    let writer = {
        let db = test.db.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while n < 300 {
                // A commit cut by the crash may have happened: the row says.
                if emit_written(&db, n).await.is_ok() || was_written(&db, n).await {
                    n += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await; // the pool reconnects
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    test.stored(100).await;
    test.pg
        .restart(Duration::from_secs(2))
        .await
        .expect("restart PostgreSQL");
    writer.await.expect("the writer");
    test.stored(600).await;
    shut(relay).await;
    let keys = per_key(&test.messages().await);
    for k in 0..2 {
        assert_eq!(keys[&format!("k{k}")], (0..300).collect::<Vec<_>>());
    }
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_sent_back_past_the_duplicate_window_publishes_nothing_twice() {
    // A duplicate window far shorter than the wait below: JetStream cannot
    // drop what a relay resends, so any copy would show in the stream.
    let test = Logical::with_window(Duration::from_millis(500)).await;
    let relay = test.relay().spawn();
    for n in 0..20 {
        emit_round(&test.db, n, 1).await.expect("commit");
    }
    test.stored(20).await;
    eventually("the slot is confirmed past the first events", async || {
        slot_status(&test.db, "outbox_public")
            .await
            .expect("status")
            .is_some_and(|s| s.lag_seconds.is_some())
    })
    .await;
    // The slot's position as it is now, kept in a copy.
    test.db
        .execute_unprepared(
            "SELECT pg_copy_logical_replication_slot('outbox_public', 'outbox_then')",
        )
        .await
        .expect("copy the slot");
    for n in 20..40 {
        emit_round(&test.db, n, 1).await.expect("commit");
    }
    test.stored(40).await;
    shut(relay).await;
    // The slot goes back to the copy, as a PostgreSQL crash can send it
    // back to its last checkpoint, and the relay stays down past the window.
    test.db
        .execute_unprepared(
            "SELECT pg_drop_replication_slot('outbox_public');
             SELECT pg_copy_logical_replication_slot('outbox_then', 'outbox_public');
             SELECT pg_drop_replication_slot('outbox_then');",
        )
        .await
        .expect("send the slot back");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let relay = test.relay().spawn();
    emit_round(&test.db, 40, 1).await.expect("commit");
    test.stored(41).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // time for stray copies to arrive
    shut(relay).await;
    let keys = per_key(&test.messages().await);
    assert_eq!(keys["k0"], (0..41).collect::<Vec<_>>());
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_reading_relay_stops() {
    let test = Logical::start().await;
    let first = test.relay().spawn();
    for n in 0..20 {
        emit_round(&test.db, n, 2).await.expect("commit");
    }
    test.stored(40).await;
    let second = test.relay().spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let readers: i64 = test
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            test.db.get_database_backend(),
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'outbox-logical-relay'",
        ))
        .await
        .expect("query")
        .expect("row")
        .try_get_by_index(0)
        .expect("count");
    assert_eq!(readers, 1, "one relay reads, the other stands by");
    shut(first).await;
    for n in 20..40 {
        emit_round(&test.db, n, 2).await.expect("commit");
    }
    test.stored(80).await;
    shut(second).await;
    let keys = per_key(&test.messages().await);
    assert_eq!(keys["k1"], (0..40).collect::<Vec<_>>());
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_database_from_retaining_wal() {
    let test = Logical::start().await;
    // Another database writes WAL; this one's outbox is idle.
    test.db
        .execute_unprepared("CREATE DATABASE busy")
        .await
        .expect("create database");
    let busy = Database::connect(test.pg.url("busy"))
        .await
        .expect("connect");
    let churn = async || {
        for _ in 0..4 {
            busy.execute_unprepared(
                "CREATE TABLE IF NOT EXISTS churn (n int); INSERT INTO churn SELECT generate_series(1, 100000)",
            )
            .await
            .expect("write WAL");
        }
    };
    let relay = test.relay().spawn();
    eventually("the slot exists", async || {
        slot_status(&test.db, "outbox_public")
            .await
            .expect("status")
            .is_some()
    })
    .await;
    churn().await;
    eventually("the slot's lag is under 1 MB", async || {
        let status = slot_status(&test.db, "outbox_public")
            .await
            .expect("status")
            .expect("slot");
        status.lag_bytes < 1_000_000 && status.lag_seconds.is_some_and(|s| s < 2.0)
    })
    .await;
    // Without the relay, the same writes stay retained: the check above can fail.
    shut(relay).await;
    churn().await;
    let status = slot_status(&test.db, "outbox_public")
        .await
        .expect("status")
        .expect("slot");
    assert!(
        status.lag_bytes > 10_000_000,
        "{} bytes behind",
        status.lag_bytes
    );
    assert!(!status.active && status.capturing);
    busy.close().await.expect("close");
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_no_stream_is_dead_lettered_and_the_others_flow() {
    let test = Logical::start().await;
    let relay = test.relay().spawn();
    emit_one(&test.db, StockReserved { order_id: 7 })
        .await
        .expect("commit");
    for n in 0..10 {
        emit_round(&test.db, n, 1).await.expect("commit");
    }
    test.stored(10).await;
    eventually("the stock event is dead-lettered", async || {
        test.rows("outbox_dead_letters").await == 1
    })
    .await;
    shut(relay).await;
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_the_slot_publishes_what_it_holds_then_drops_it() {
    let test = Logical::start().await;
    let relay = test.relay().spawn();
    emit_round(&test.db, 0, 1).await.expect("commit");
    test.stored(1).await;
    shut(relay).await;
    // Captured while no relay reads: in the slot only.
    for n in 1..10 {
        emit_round(&test.db, n, 1).await.expect("commit");
    }
    assert_eq!(test.rows("outbox_messages").await, 0);
    retire(test.relay()).await.expect("retire the slot");
    test.stored(10).await;
    assert_eq!(
        slot_status(&test.db, "outbox_public")
            .await
            .expect("status"),
        None
    );
    // Events are rows again, for a polling relay.
    emit_round(&test.db, 10, 1).await.expect("commit");
    assert_eq!(test.rows("outbox_messages").await, 1);
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_logical_wal_is_refused_with_the_fix() {
    // The shared server runs wal_level = replica.
    let test = TestDb::postgres().await;
    let nats = TestNats::shared().await;
    let relay = fast(&test.db, nats.publisher()).build();
    let relay = LogicalRelay::new(relay, &test.url).expect("a valid URL");
    let error = retire(relay).await.expect_err("refused");
    assert!(matches!(error, LogicalError::WalLevel { .. }), "{error}");
    assert!(error.to_string().contains("wal_level = logical"), "{error}");
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_are_messages_while_the_capture_is_on_and_rows_otherwise() {
    // This test's process only: nextest runs each test in a process of its own.
    outbox_core::capture::write_as_messages(true);
    let test = Logical::start().await;
    emit_round(&test.db, 0, 2).await.expect("commit");
    assert_eq!(
        test.rows("outbox_messages").await,
        2,
        "no capture yet: rows"
    );
    let relay = test.relay().spawn();
    test.stored(2).await;
    for n in 1..50 {
        emit_round(&test.db, n, 2).await.expect("commit");
    }
    assert_eq!(
        test.rows("outbox_messages").await,
        0,
        "a message per transaction, no row"
    );
    test.stored(100).await;
    shut(relay).await;
    let keys = per_key(&test.messages().await);
    assert_eq!(keys["k1"], (0..50).collect::<Vec<_>>());
    retire(test.relay()).await.expect("retire");
    emit_round(&test.db, 50, 2).await.expect("commit");
    assert_eq!(
        test.rows("outbox_messages").await,
        2,
        "the capture is off again: rows"
    );
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_refused_with_the_fix() {
    let test = Logical::start().await;
    test.db
        .execute_unprepared(
            "CREATE ROLE app LOGIN NOREPLICATION; GRANT ALL ON ALL TABLES IN SCHEMA public TO app",
        )
        .await
        .expect("create a role");
    let url = format!("postgres://app@127.0.0.1:{}/postgres", test.pg.port);
    let db = Database::connect(&url).await.expect("connect as app");
    let relay = fast(&db, test.nats.publisher()).build();
    let error = retire(LogicalRelay::new(relay, &url).expect("a valid URL"))
        .await
        .expect_err("refused");
    assert!(
        matches!(error, LogicalError::NoReplication { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("ALTER ROLE app REPLICATION"),
        "{error}"
    );
    db.close().await.expect("close");
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_another_relay_is_delivering_go_before_the_slot_s_events() {
    let test = Logical::start().await;
    // The slot first: creating one waits for the transactions open at the time.
    test.db
        .execute_unprepared("CREATE PUBLICATION outbox_public")
        .await
        .expect("create the publication");
    test.db
        .execute_unprepared(
            "SELECT pg_create_logical_replication_slot('outbox_public', 'pgoutput')",
        )
        .await
        .expect("create the slot");
    // Rows written before any capture.
    for n in 0..3 {
        emit_round(&test.db, n, 1).await.expect("commit");
    }
    // Another relay's claim in progress: the oldest row locked, as a
    // polling relay (or a logical one draining before it stands by) holds it.
    let claim = test.db.begin().await.expect("begin");
    claim
        .execute_unprepared("SELECT id FROM outbox_messages ORDER BY id LIMIT 1 FOR UPDATE")
        .await
        .expect("lock the oldest row");
    let relay = test.relay().spawn();
    eventually("the capture is on", async || {
        slot_status(&test.db, "outbox_public")
            .await
            .expect("status")
            .is_some_and(|s| s.capturing)
    })
    .await;
    // Captured into the slot, behind the locked row's key.
    for n in 3..6 {
        emit_round(&test.db, n, 1).await.expect("commit");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    claim.rollback().await.expect("let the row go");
    test.stored(6).await;
    shut(relay).await;
    assert_eq!(
        per_key(&test.messages().await)["k0"],
        (0..6).collect::<Vec<_>>()
    );
    test.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_slot_a_relay_reads_is_refused_and_leaves_the_capture_on() {
    let test = Logical::start().await;
    let relay = test.relay().spawn();
    let status = async || {
        slot_status(&test.db, "outbox_public")
            .await
            .expect("status")
    };
    eventually("a relay reads the slot", async || {
        status().await.is_some_and(|s| s.active)
    })
    .await;
    let error = retire(test.relay()).await.expect_err("refused");
    assert!(matches!(error, LogicalError::SlotInUse(_)), "{error}");
    assert!(
        status().await.is_some_and(|s| s.capturing),
        "the trigger stays"
    );
    emit_round(&test.db, 0, 1).await.expect("commit");
    test.stored(1).await;
    shut(relay).await;
    test.finish().await;
}
