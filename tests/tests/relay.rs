//! The relay against real PostgreSQL/SQLite/MariaDB and NATS JetStream:
//! delivery with headers, crashes between publish and delete, shutdown and
//! broker restarts mid-delivery, kept deliveries, the in-flight window, a
//! pool of one, vacuuming; each test has its own schema (or SQLite file)
//! and its own namespace of streams.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::relay::{Delivery, Publisher};
use outbox_core::testing::MemoryPublisher;
use outbox_core::{emit, transactional};
use outbox_nats::JetStreamPublisher;
use outbox_tests::fixtures::{AppError, OrderCreated, emit_round};
use outbox_tests::nats::{PrivateNats, TestNats};
use outbox_tests::streamed::{assert_each_once, header, per_key};
use outbox_tests::{Setup, TestDb, drained, eventually, fast};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, TransactionTrait};

#[transactional]
async fn place_order<C: TransactionTrait>(
    db: &C,
    order_id: i64,
    total_cents: i64,
) -> Result<(), AppError> {
    emit!(OrderCreated {
        order_id,
        total_cents
    });
    if total_cents < 0 {
        return Err(AppError::Rejected);
    }
    Ok(())
}

outbox_tests::on_each_backend!(delivers_committed_events_with_their_headers);

async fn delivers_committed_events_with_their_headers(db: &DatabaseConnection) {
    let nats = TestNats::shared().await;
    let stream = &nats.provision_orders().await;
    let relay = fast(db, nats.publisher()).spawn();
    place_order(db, 7, 1250).await.expect("commit");
    assert!(place_order(db, 8, -1).await.is_err(), "rolled back");
    drained(db, Duration::from_secs(30)).await;
    relay.shutdown().await.expect("relay stops");

    let messages = nats.messages(stream).await;
    assert_eq!(
        messages.len(),
        1,
        "only the committed event reaches the stream"
    );
    let message = &messages[0];
    assert_eq!(
        message.subject.as_str(),
        format!("{}.orders.order.7.created", nats.namespace)
    );
    let id: uuid::Uuid = header(message, outbox_core::headers::MSG_ID)
        .parse()
        .expect("event id");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(
        header(message, outbox_core::headers::EVENT_TYPE),
        "OrderCreated"
    );
    assert_eq!(header(message, outbox_core::headers::EVENT_VERSION), "1");
    assert_eq!(header(message, outbox_core::headers::PARTITION_KEY), "7");
    assert_eq!(
        header(message, outbox_core::headers::CONTENT_TYPE),
        "application/json"
    );
    chrono::DateTime::parse_from_rfc3339(header(message, outbox_core::headers::OCCURRED_AT))
        .expect("RFC 3339 time");
    let payload: OrderCreated = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(
        payload,
        OrderCreated {
            order_id: 7,
            total_cents: 1250
        }
    );
    nats.finish().await;
}

/// Fault injection, since no real part can stop a relay at this exact point:
/// publishes for real, keeps what the broker answered for the test to check,
/// then panics before the relay can settle the batch.
struct CrashAfterPublish {
    publisher: JetStreamPublisher,
    stored: Arc<Mutex<Vec<bool>>>,
}

impl Publisher for CrashAfterPublish {
    async fn publish(
        &self,
        events: &[&outbox_core::entity::outbox_message::Model],
    ) -> Vec<Delivery> {
        let deliveries = self.publisher.publish(events).await;
        *self.stored.lock().expect("lock") = (deliveries.iter())
            .map(|d| matches!(d, Delivery::Stored { .. }))
            .collect();
        panic!("relay crashed between publish and delete");
    }
}

async fn crash_between_publish_and_delete_is_deduplicated(setup: Setup) {
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    emit_round(db, 0, 100).await.expect("commit");

    let stored = Arc::new(Mutex::new(Vec::new()));
    let crashing = CrashAfterPublish {
        publisher: nats.publisher(),
        stored: Arc::clone(&stored),
    };
    let crashing = fast(db, crashing).build();
    let crash = tokio::spawn(async move { crashing.process_batch().await }).await;
    assert!(crash.is_err_and(|e| e.is_panic()), "the relay crashed");
    assert_eq!(
        *stored.lock().expect("lock"),
        vec![true; 100],
        "the broker stored every event before the crash"
    );
    assert_eq!(
        nats.messages(stream).await.len(),
        100,
        "published before the crash"
    );
    assert_eq!(
        outbox_core::relay::stats(db).await.expect("stats").pending,
        100,
        "not deleted"
    );

    let report = fast(db, nats.publisher())
        .build()
        .process_batch()
        .await
        .expect("batch");
    assert_eq!(
        (report.published, report.duplicates),
        (100, 100),
        "{report:?}"
    );
    assert_each_once(&nats.messages(stream).await, 100);
    assert_eq!(
        outbox_core::relay::stats(db).await.expect("stats").pending,
        0
    );
    setup.finish().await;
}

/// An overlapped claim needs a second connection, which a pool of one never
/// gives: the relay waits out the acquire timeout once, settles the round it
/// has published, and goes on with rounds in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_connection_falls_back_to_rounds_in_turn() {
    let setup = Setup::postgres().await;
    let (nats, stream) = (&setup.nats, &setup.stream);
    for n in 0..3 {
        emit_round(setup.db(), n, 10).await.expect("commit");
    }
    let one = (setup.test)
        .pool(|options| {
            options
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(1));
        })
        .await;
    let relay = fast(&one, nats.publisher()).batch_size(10).build();
    let within = Duration::from_secs(30);
    let first = tokio::time::timeout(within, relay.drain()).await;
    let first = first.expect("no hang").expect("first drain");
    assert_eq!(
        first.published, 10,
        "the round published before the timeout"
    );
    let rest = tokio::time::timeout(within, relay.drain()).await;
    assert_eq!(rest.expect("no hang").expect("second drain").published, 20);

    let messages = nats.messages(stream).await;
    assert_each_once(&messages, 30);
    let per_key = per_key(&messages);
    for (key, ns) in per_key {
        assert_eq!(ns, [0, 1, 2], "order of key {key}");
    }
    one.close().await.expect("close the pool of one");
    setup.finish().await;
}

async fn shutdown_mid_delivery_loses_nothing_and_leaves_nothing_claimed(setup: Setup) {
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    for n in 0..30 {
        emit_round(db, n, 100).await.expect("commit");
    }
    let relay = fast(db, nats.publisher()).batch_size(250).spawn();
    while outbox_core::relay::stats(db).await.expect("stats").pending == 3_000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.shutdown().await.expect("relay stops");

    let pending = outbox_core::relay::stats(db).await.expect("stats").pending;
    assert_eq!(
        nats.messages(stream).await.len() as u64 + pending,
        3_000,
        "nothing lost"
    );
    let rest = fast(db, nats.publisher()).batch_size(5_000).build();
    let report = rest.process_batch().await.expect("batch");
    assert_eq!(
        report.claimed as u64, pending,
        "no row left locked by the stopped relay"
    );
    assert_each_once(&nats.messages(stream).await, 3_000);
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_delivery_delivers_each_event_once() {
    let mut server = PrivateNats::start().await;
    let setup = Setup::new(
        TestDb::postgres().await,
        TestNats::connect(&server.url).await,
    )
    .await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    for n in 0..50 {
        emit_round(db, n, 100).await.expect("commit");
    }
    let relay = fast(db, nats.publisher()).batch_size(100).spawn();
    while outbox_core::relay::stats(db).await.expect("stats").pending > 4_000 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        outbox_core::relay::stats(db).await.expect("stats").pending > 0,
        "stopped mid-delivery"
    );
    server.restart().await;
    drained(db, Duration::from_secs(120)).await;
    relay.shutdown().await.expect("relay stops");

    assert_each_once(&nats.messages(stream).await, 5_000);
    let stats = outbox_core::relay::stats(db).await.expect("stats");
    assert_eq!(stats.dead_letters, 0, "an outage is not the events' fault");
    setup.finish().await;
}

/// On PostgreSQL only a claim's first row is decoded with type checks (the
/// rest share its column types): a column that no longer fits must still
/// fail the claim, and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_columns_do_not_fit_fails_and_loses_nothing() {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    emit_round(db, 0, 3).await.expect("commit");
    db.execute_unprepared("ALTER TABLE outbox_messages ALTER COLUMN event_version TYPE BIGINT")
        .await
        .expect("alter the column");

    let claimed = fast(db, nats.publisher()).build().process_batch().await;
    let error = claimed.expect_err("an INT8 column read as i32 is refused");
    let error = outbox_core::ErrorReport(&error).to_string();
    assert!(error.contains("mismatched types"), "{error}");
    assert!(nats.messages(stream).await.is_empty(), "nothing published");
    assert_eq!(
        outbox_core::relay::stats(db).await.expect("stats").pending,
        3,
        "nothing lost"
    );
    setup.finish().await;
}

async fn kept_deliveries_are_marked_not_resent_then_cleaned_up(setup: Setup) {
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    emit_round(db, 0, 10).await.expect("commit");
    let relay = fast(db, nats.publisher())
        .keep_delivered(Duration::from_secs(3600))
        .batch_size(4)
        .build();
    // Rounds of 4, overlapped on PostgreSQL: marked rows must not come back in a later round.
    assert_eq!(relay.drain().await.expect("drain").published, 10);
    assert_eq!(
        relay.process_batch().await.expect("batch").claimed,
        0,
        "delivered rows are not claimed again"
    );
    let kept = outbox_core::entity::outbox_message::Entity::find()
        .all(db)
        .await
        .expect("rows");
    assert_eq!(kept.len(), 10);
    assert!(
        kept.iter().all(|row| row.delivered_at.is_some()),
        "kept rows are marked delivered"
    );
    assert_eq!(
        outbox_core::relay::stats(db).await.expect("stats").pending,
        0
    );
    assert_each_once(&nats.messages(stream).await, 10);

    // A zero retention: the running relay deletes them at its next housekeeping.
    let relay = fast(db, nats.publisher())
        .keep_delivered(Duration::ZERO)
        .spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !outbox_core::entity::outbox_message::Entity::find()
        .all(db)
        .await
        .expect("rows")
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expired rows were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    relay.shutdown().await.expect("relay stops");
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_larger_than_the_in_flight_bound_go_through_a_sliding_window() {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    emit_round(db, 0, 100).await.expect("commit");
    let narrow = JetStreamPublisher::new(nats.client.clone())
        .max_in_flight(16)
        .namespace(nats.namespace.clone());
    let relay = fast(db, narrow).batch_size(100).build();
    // The bound only turns a hang (sends waiting for slots no ack frees) into a failure.
    let report = tokio::time::timeout(Duration::from_secs(30), relay.process_batch())
        .await
        .expect("the batch completes")
        .expect("batch");
    assert_eq!(report.published, 100);
    assert_each_once(&nats.messages(stream).await, 100);
    setup.finish().await;
}

/// How often PostgreSQL has vacuumed this test's `outbox_messages` by hand (not autovacuum).
async fn vacuums(db: &DatabaseConnection) -> i64 {
    let count = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT vacuum_count FROM pg_stat_user_tables \
             WHERE relname = 'outbox_messages' AND schemaname = current_schema()",
        ))
        .await
        .expect("read the statistics")
        .expect("the table's row");
    count.try_get_by_index(0).expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_drain_vacuums_the_outbox_as_it_goes() {
    let test = TestDb::postgres().await;
    let db = &test.db;
    for n in 0..5 {
        emit_round(db, n, 20).await.expect("emitted");
    }
    assert_eq!(vacuums(db).await, 0);
    let relay = outbox_core::relay::Relay::builder(db.clone(), MemoryPublisher::new())
        .batch_size(10)
        .vacuum_after(Some(50))
        .build();
    assert_eq!(relay.drain().await.expect("drained").published, 100);
    eventually("the relay has vacuumed the outbox", async || {
        vacuums(db).await > 0
    })
    .await;
    test.finish().await;
}

outbox_tests::on_postgres_and_mysql!(
    crash_between_publish_and_delete_is_deduplicated,
    shutdown_mid_delivery_loses_nothing_and_leaves_nothing_claimed,
    kept_deliveries_are_marked_not_resent_then_cleaned_up,
);
