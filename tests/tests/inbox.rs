//! The inbox consumer against real PostgreSQL and NATS JetStream; each test
//! has its own schema and its own namespace of streams.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use outbox_core::consumer::StartError;
use outbox_core::entity::{inbox_dead_letter, inbox_message};
use outbox_core::inbox::{self, Handler, Metadata};
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::{Consumer, StartAt};
use outbox_tests::fixtures::{
    AppError, OrderCreated, Sequenced, StockReserved, emit_round, order, reserve_stock,
};
use outbox_tests::nats::{PrivateNats, TestNats};
use outbox_tests::{Setup, TestDb, emit_one, eventually, settled};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter, TransactionTrait,
};
use serde::{Deserialize, Serialize};

async fn orders(db: &DatabaseConnection) -> u64 {
    order::Entity::find().count(db).await.expect("count orders")
}

async fn inbox_rows(db: &DatabaseConnection) -> u64 {
    inbox_message::Entity::find()
        .count(db)
        .await
        .expect("count inbox rows")
}

async fn dead_letters(db: &DatabaseConnection, consumer: &str) -> Vec<inbox_dead_letter::Model> {
    inbox_dead_letter::Entity::find()
        .filter(inbox_dead_letter::Column::Consumer.eq(consumer))
        .all(db)
        .await
        .expect("read dead letters")
}

/// Publishes an `OrderCreated` per `(order id, total cents)`, in order.
async fn publish_orders(setup: &Setup, orders: &[(i64, i64)]) {
    for &(order_id, total_cents) in orders {
        let order = OrderCreated {
            order_id,
            total_cents,
        };
        setup.publish(order).await;
    }
}

/// Inserts the order; counts its calls and the delivery counts it saw.
#[derive(Default, Clone)]
struct InsertOrder {
    calls: Arc<AtomicU32>,
    deliveries: Arc<Mutex<Vec<u64>>>,
    /// Fails while the delivery count is below this.
    succeed_from_delivery: u64,
    /// Always fails for this order.
    poison: Option<i64>,
}

impl Handler<OrderCreated> for InsertOrder {
    type Error = AppError;

    async fn handle(
        &self,
        event: OrderCreated,
        meta: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), AppError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.deliveries
            .lock()
            .expect("lock")
            .push(meta.delivery_count);
        if meta.delivery_count < self.succeed_from_delivery || self.poison == Some(event.order_id) {
            return Err(AppError::Rejected);
        }
        order::ActiveModel {
            id: Set(event.order_id),
            total_cents: Set(event.total_cents),
        }
        .insert(db)
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_commit_before_ack_changes_the_database_once() {
    // The fault — a commit whose ack never arrives — is real: the server
    // denies the first consumer's user publishing to `$JS.ACK.>`, so its acks
    // are dropped and JetStream redelivers what it already committed.
    let server = PrivateNats::start_with_config(Some(
        r#"authorization {
             users = [
               { user: admin, password: admin }
               { user: noack, password: noack, permissions: { publish: { deny: ["$JS.ACK.>"] } } }
             ]
           }"#,
    ))
    .await;
    let connect = |user: &'static str| {
        async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
            .connect(server.url.clone())
    };
    let admin = connect("admin").await.expect("connect as admin");
    let nats = TestNats {
        client: admin.clone(),
        namespace: "inbox".to_owned(),
    };
    let setup = Setup::new(TestDb::postgres().await, nats).await;
    let db = setup.db();
    setup
        .publish(OrderCreated {
            order_id: 1,
            total_cents: 100,
        })
        .await;

    let handler = InsertOrder::default();
    let lossy = connect("noack").await.expect("connect as noack");
    let first = Consumer::builder(lossy, db.clone(), "billing")
        .namespace("inbox")
        .ack_wait(Duration::from_secs(1))
        .on::<OrderCreated, _>(handler.clone())
        .spawn()
        .await
        .expect("start the consumer");
    let stream = jetstream::new(admin.clone())
        .get_stream(&setup.stream)
        .await
        .expect("stream");
    eventually("the lost ack causes a redelivery", async || {
        let info = stream.consumer_info("billing").await.expect("info");
        info.num_redelivered >= 1 && handler.deliveries.lock().expect("lock").len() == 1
    })
    .await;
    assert_eq!(orders(db).await, 1, "the first delivery committed");
    first.shutdown().await.expect("stop");

    let second = Consumer::builder(admin.clone(), db.clone(), "billing")
        .namespace("inbox")
        .on::<OrderCreated, _>(handler.clone())
        .spawn()
        .await
        .expect("restart the consumer");
    settled(&admin, &setup.stream, "billing").await;
    second.shutdown().await.expect("stop");

    let deliveries = handler.deliveries.lock().expect("lock").clone();
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    assert_eq!(deliveries, vec![1]);
    assert_eq!(orders(db).await, 1, "the effect happened once");
    assert_eq!(inbox_rows(db).await, 1);
    assert!(dead_letters(db, "billing").await.is_empty());
    setup.test.finish().await;
}

async fn a_handler_failing_twice_then_succeeding_applies_once(setup: Setup) {
    let db = setup.db();
    setup
        .publish(OrderCreated {
            order_id: 7,
            total_cents: 700,
        })
        .await;
    let handler = InsertOrder {
        succeed_from_delivery: 3,
        ..InsertOrder::default()
    };
    setup
        .consume("billing", |c| c.on::<OrderCreated, _>(handler.clone()))
        .await;

    let deliveries = handler.deliveries.lock().expect("lock").clone();
    assert_eq!(
        deliveries,
        vec![1, 2, 3],
        "the handler sees each delivery's count"
    );
    assert_eq!(orders(db).await, 1);
    assert_eq!(inbox_rows(db).await, 1);
    assert!(dead_letters(db, "billing").await.is_empty());
    setup.finish().await;
}

/// Inserts the order and notes the transaction it ran in; the first call
/// for orders 7 and 12 fails after the insert.
#[derive(Default, Clone)]
struct NotesTransaction {
    calls: Arc<Mutex<Vec<(i64, i64)>>>,
}

impl Handler<OrderCreated> for NotesTransaction {
    type Error = AppError;

    async fn handle(
        &self,
        event: OrderCreated,
        meta: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), AppError> {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT txid_current()::BIGINT",
            ))
            .await?
            .expect("a row");
        let txid: i64 = row.try_get_by_index(0)?;
        let order = event.order_id;
        let first = {
            let mut calls = self.calls.lock().expect("lock");
            calls.push((order, txid));
            calls.iter().filter(|(o, _)| *o == order).count() == 1
        };
        InsertOrder::default().handle(event, meta, db).await?;
        if first && (order == 7 || order == 12) {
            return Err(AppError::Rejected);
        }
        Ok(())
    }
}

/// Messages that arrive together are handled in one transaction, committed
/// once. A failing handler (order 7) rolls its batch back, and the rest runs
/// again with a savepoint per message; a handler failing there (order 12)
/// is rolled back to its savepoint, undoing its insert so that its retry can
/// insert again, while the others of the batch commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_together_and_a_failing_handler_rolls_back_only_its_own_effect() {
    let setup = Setup::postgres().await;
    let db = setup.db();
    for order_id in 1..=20 {
        let total_cents = 100;
        let order = OrderCreated {
            order_id,
            total_cents,
        };
        emit_one(db, order).await.expect("commit");
    }
    setup.relay().await;
    let handler = NotesTransaction::default();
    setup
        .consume("batched", |c| {
            c.max_in_flight(1)
                .batch_size(20)
                .on::<OrderCreated, _>(handler.clone())
        })
        .await;

    let calls = handler.calls.lock().expect("lock").clone();
    let txid_of = |order: i64, call: usize| {
        let mut of_order = calls.iter().filter(|(o, _)| *o == order);
        of_order.nth(call).map(|(_, txid)| *txid).expect("called")
    };
    let shared_with = |txid: i64, order: i64| {
        (calls.iter())
            .filter(|(o, t)| *t == txid && *o != order)
            .count()
    };
    assert!(
        shared_with(txid_of(7, 0), 7) > 0,
        "order 7 ran in a batch: {calls:?}"
    );
    let failed_12 = txid_of(12, 0);
    let committed_beside_12 = (1..=20).filter(|&order| {
        let last = calls.iter().rfind(|(o, _)| *o == order);
        order != 12 && last.is_some_and(|(_, txid)| *txid == failed_12)
    });
    assert!(
        committed_beside_12.count() > 0,
        "order 12 failed in a batch whose other orders committed: {calls:?}"
    );
    assert_eq!(orders(db).await, 20);
    assert_eq!(inbox_rows(db).await, 20);
    assert!(dead_letters(db, "batched").await.is_empty());
    setup.finish().await;
}

/// Panics on order 21; inserts the others.
#[derive(Clone)]
struct PanicsOn21;

impl Handler<OrderCreated> for PanicsOn21 {
    type Error = AppError;

    async fn handle(
        &self,
        event: OrderCreated,
        meta: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), AppError> {
        assert_ne!(event.order_id, 21, "a bug in the handler");
        InsertOrder::default().handle(event, meta, db).await
    }
}

/// A panic is a failed delivery, not a dead consumer: retried, then
/// dead-lettered with the panic's message, and the next event is handled.
async fn a_panicking_handler_is_retried_then_dead_lettered_and_the_consumer_goes_on(setup: Setup) {
    let db = setup.db();
    publish_orders(&setup, &[(21, 100), (22, 100)]).await;
    setup
        .consume("fragile", |c| {
            c.max_deliveries(2).on::<OrderCreated, _>(PanicsOn21)
        })
        .await;

    let letters = dead_letters(db, "fragile").await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].reason, "handler_failed");
    assert_eq!(letters[0].deliveries, 2);
    assert!(
        letters[0].error.starts_with("handler panicked: assertion"),
        "{}",
        letters[0].error
    );
    let ids: Vec<i64> = (order::Entity::find().all(db).await.expect("orders"))
        .iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(ids, [22]);
    setup.finish().await;
}

async fn poison_and_undecodable_messages_are_dead_lettered_and_later_ones_continue(setup: Setup) {
    let db = setup.db();
    setup
        .publish(OrderCreated {
            order_id: 13,
            total_cents: 1300,
        })
        .await;
    let id = |n: u8| format!("00000000-0000-7000-8000-0000000000{n:02}");
    let (undecodable, unknown, unsupported) = (id(1), id(2), id(3));
    let outbox = |id: &str, event_type: &'static str, version: &'static str| {
        [
            (outbox_core::headers::MSG_ID, id.to_owned()),
            (outbox_core::headers::EVENT_TYPE, event_type.to_owned()),
            (outbox_core::headers::EVENT_VERSION, version.to_owned()),
        ]
    };
    for (headers, payload) in [
        (outbox(&undecodable, "OrderCreated", "1"), &b"not json"[..]),
        (outbox(&unknown, "Mystery", "1"), b"{}"),
        (outbox(&unsupported, "OrderCreated", "9"), b"{}"),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        setup.publish_raw("orders.odd", &headers, payload).await;
    }
    setup.publish_raw("orders.odd", &[], b"no headers").await;
    setup
        .publish(OrderCreated {
            order_id: 14,
            total_cents: 1400,
        })
        .await;

    let handler = InsertOrder {
        poison: Some(13),
        ..InsertOrder::default()
    };
    setup
        .consume("strict", |c| {
            c.max_deliveries(2).on::<OrderCreated, _>(handler.clone())
        })
        .await;

    let letters = dead_letters(db, "strict").await;
    let by_reason: HashMap<&str, &inbox_dead_letter::Model> =
        letters.iter().map(|l| (l.reason.as_str(), l)).collect();
    assert_eq!(letters.len(), 5, "{letters:#?}");
    let poison = by_reason["handler_failed"];
    assert_eq!(poison.deliveries, 2);
    assert_eq!(poison.error, "rejected by the business rule");
    assert_eq!(
        serde_json::from_slice::<OrderCreated>(&poison.payload).expect("payload kept"),
        OrderCreated {
            order_id: 13,
            total_cents: 1300
        }
    );
    assert_eq!(by_reason["undecodable"].payload, b"not json");
    assert_eq!(
        by_reason["undecodable"].event_id.map(|i| i.to_string()),
        Some(undecodable)
    );
    assert!(
        by_reason["undecodable"]
            .error
            .contains("cannot decode event `OrderCreated` version 1")
    );
    assert_eq!(
        by_reason["unknown_type"].event_type.as_deref(),
        Some("Mystery")
    );
    assert_eq!(by_reason["unsupported_version"].event_version, Some(9));
    assert_eq!(by_reason["malformed"].payload, b"no headers");
    assert!(
        by_reason["malformed"]
            .error
            .contains(outbox_core::headers::MSG_ID),
        "{}",
        by_reason["malformed"].error
    );
    let rows = order::Entity::find().all(db).await.expect("orders");
    assert_eq!(
        rows.iter().map(|o| o.id).collect::<Vec<_>>(),
        vec![14],
        "the later message was handled"
    );

    // Configured to skip them, another consumer acks unknown types and
    // versions without a dead letter; undecodable and poison ones still get one.
    let lenient = setup
        .consumer("lenient")
        .max_deliveries(2)
        .skip_unhandled()
        .on::<OrderCreated, _>(InsertOrder {
            poison: Some(13),
            ..InsertOrder::default()
        })
        .spawn()
        .await
        .expect("start the consumer");
    setup.settled("lenient").await;
    lenient.shutdown().await.expect("stop");
    let reasons: BTreeSet<String> = dead_letters(db, "lenient")
        .await
        .into_iter()
        .map(|l| l.reason)
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["handler_failed", "malformed", "undecodable"].map(str::to_owned))
    );
    setup.finish().await;
}

async fn a_database_failure_is_retried_and_never_dead_letters(setup: Setup) {
    let db = setup.db();
    setup
        .publish(OrderCreated {
            order_id: 5,
            total_cents: 500,
        })
        .await;
    // A real failure of the inbox statement: its table is gone for a while.
    db.execute_unprepared("ALTER TABLE outbox_inbox RENAME TO outbox_inbox_away")
        .await
        .expect("hide the inbox table");
    let handler = InsertOrder::default();
    let consumer = setup
        .consumer("billing")
        .max_deliveries(2)
        .on::<OrderCreated, _>(handler.clone())
        .spawn()
        .await
        .expect("start the consumer");
    tokio::time::sleep(Duration::from_secs(1)).await;
    db.execute_unprepared("ALTER TABLE outbox_inbox_away RENAME TO outbox_inbox")
        .await
        .expect("restore the inbox table");
    setup.settled("billing").await;
    consumer.shutdown().await.expect("stop");

    let deliveries = handler.deliveries.lock().expect("lock").clone();
    assert_eq!(
        deliveries.len(),
        1,
        "the handler ran once the database was back"
    );
    assert!(
        deliveries[0] > 2,
        "after more failed deliveries ({}) than max_deliveries",
        deliveries[0]
    );
    assert_eq!(orders(db).await, 1);
    assert!(dead_letters(db, "billing").await.is_empty());
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_rides_out_a_nats_restart() {
    let mut server = PrivateNats::start().await;
    let client = async_nats::connect(&server.url).await.expect("connect");
    let nats = TestNats {
        client,
        namespace: "outage".to_owned(),
    };
    let setup = Setup::new(TestDb::postgres().await, nats).await;
    let publish = async |orders: std::ops::Range<i64>| {
        for order_id in orders {
            let total_cents = order_id * 100;
            emit_one(
                setup.db(),
                OrderCreated {
                    order_id,
                    total_cents,
                },
            )
            .await
            .expect("commit");
        }
        setup.relay().await;
    };
    publish(0..5).await;
    let handler = InsertOrder::default();
    // A killed server may come back without the acks it had not yet written
    // to disk: it redelivers those messages after `ack_wait`, and the inbox
    // skips them.
    let consumer = setup
        .consumer("billing")
        .ack_wait(Duration::from_secs(2))
        .on::<OrderCreated, _>(handler.clone())
        .spawn()
        .await
        .expect("start the consumer");
    setup.settled("billing").await;

    server.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    eventually("the client reconnects", async || {
        setup.nats.client.connection_state() == async_nats::connection::State::Connected
    })
    .await;
    publish(5..10).await;
    setup.settled("billing").await;
    consumer.shutdown().await.expect("stop");

    assert_eq!(orders(setup.db()).await, 10);
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        10,
        "each event handled once"
    );
    setup.test.finish().await;
}

async fn events_emitted_by_a_handler_reach_the_outbox_only_when_it_commits(setup: Setup) {
    let db = setup.db();
    publish_orders(&setup, &[(1, 100), (2, -1)]).await;
    setup
        .consume("inventory", |c| {
            c.max_deliveries(3).on::<OrderCreated, _>(reserve_stock)
        })
        .await;

    let emitted = outbox_core::testing::emitted::<StockReserved>(db)
        .await
        .expect("read the outbox");
    assert_eq!(
        emitted,
        [StockReserved { order_id: 1 }],
        "three failed attempts for order 2 emitted nothing"
    );
    let letters = dead_letters(db, "inventory").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].deliveries, 3);
    setup.finish().await;
}

/// An order placed for a tenant: the tenant and a correlation id travel as the event's headers.
#[transactional]
async fn place_for_tenant(
    db: &DatabaseConnection,
    order_id: i64,
    tenant: &str,
) -> Result<(), AppError> {
    let headers = [("Tenant-Id", tenant), ("X-Correlation-Id", "req-42")];
    emit!(
        OrderCreated {
            order_id,
            total_cents: 1
        },
        headers = headers
    );
    Ok(())
}

/// Notes the headers each handled event came with.
#[derive(Default, Clone)]
struct HeaderRecorder(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

impl Handler<OrderCreated> for HeaderRecorder {
    type Error = AppError;

    async fn handle(
        &self,
        _: OrderCreated,
        meta: Metadata,
        _: &DatabaseTransaction,
    ) -> Result<(), AppError> {
        self.0.lock().expect("lock").push(meta.headers);
        Ok(())
    }
}

async fn an_events_own_headers_travel_to_the_handler(setup: Setup) {
    let db = setup.db();
    place_for_tenant(db, 1, "acme").await.expect("placed");
    let refused = place_for_tenant(db, 2, "acme\r\nNats-Msg-Id: forged").await;
    match refused {
        Err(AppError::Outbox(outbox_core::Error::Header { name, .. })) => {
            assert_eq!(name, "Tenant-Id");
        }
        other => panic!("a value with a line break must fail the call: {other:?}"),
    }
    assert_eq!(
        outbox_core::testing::emitted::<OrderCreated>(db)
            .await
            .expect("outbox")
            .len(),
        1,
        "the refused call committed nothing"
    );
    setup.relay().await;

    let messages = setup.nats.messages(&setup.stream).await;
    assert_eq!(messages.len(), 1);
    let headers = messages[0].headers.clone();
    assert_eq!(
        headers.get("Tenant-Id").map(|value| value.as_str()),
        Some("acme"),
        "sent by the relay"
    );
    let recorder = HeaderRecorder::default();
    let handler = recorder.clone();
    setup
        .consume("billing", |c| c.on::<OrderCreated, _>(handler))
        .await;
    let expected = BTreeMap::from([
        ("Tenant-Id".to_owned(), "acme".to_owned()),
        ("X-Correlation-Id".to_owned(), "req-42".to_owned()),
    ]);
    assert_eq!(*recorder.0.lock().expect("lock"), [expected]);
    setup.finish().await;
}

/// Records each key's handled events; fails the first delivery of some;
/// tracks how many handlers ran at once.
#[derive(Default, Clone)]
struct Recorder {
    handled: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    running: Arc<AtomicUsize>,
    most_running: Arc<AtomicUsize>,
}

impl Handler<Sequenced> for Recorder {
    type Error = String;

    async fn handle(
        &self,
        event: Sequenced,
        meta: Metadata,
        _db: &DatabaseTransaction,
    ) -> Result<(), String> {
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(running, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(u64::from(event.n % 4) * 2)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if event.n % 7 == 3 && meta.delivery_count == 1 {
            return Err(format!("{} #{} fails once", event.key, event.n));
        }
        let mut handled = self.handled.lock().expect("lock");
        handled.entry(event.key).or_default().push(event.n);
        Ok(())
    }
}

/// More than one filter subject needs nats-server 2.10: on an older one the
/// consumer says so in one line at start, on a newer one it starts. (CI runs
/// this file on 2.15 and on Debian's 2.9.)
async fn several_filter_subjects_need_a_2_10_server_and_say_so(setup: Setup) {
    let version = setup.nats.client.server_info().version;
    let started = (setup.consumer("filtered"))
        .filter_subjects(["orders.seq.a", "orders.seq.b"])
        .on::<Sequenced, _>(Recorder::default())
        .spawn()
        .await;
    let old = version.starts_with("2.9.") || version.starts_with("2.8.");
    match started {
        Err(error @ outbox_nats::ConsumerError::ServerTooOld { .. }) if old => {
            let text = error.to_string();
            assert!(
                text.contains("needs nats-server 2.10") && text.contains(&version),
                "{text}"
            );
        }
        Ok(consumer) if !old => consumer.shutdown().await.expect("stop"),
        other => panic!("on nats-server {version}: {other:?}"),
    }
    setup.finish().await;
}

/// A new consumer name starts where it is told: every event the stream
/// holds (the default), only those stored after it was created, from a
/// time, or from a stream sequence.
async fn a_new_consumer_starts_where_it_is_told(setup: Setup) {
    let event = |n| Sequenced { key: "k".into(), n };
    // Stream sequences 1 and 2; event 2 is stored at sequence 3, later.
    setup.publish(event(0)).await;
    setup.publish(event(1)).await;
    let new_only = Recorder::default();
    let waiting = (setup.consumer("new-only"))
        .start_at(StartAt::New)
        .on::<Sequenced, _>(new_only.clone())
        .spawn()
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before_the_third = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    setup.publish(event(2)).await;
    setup.settled("new-only").await;
    waiting.shutdown().await.expect("stop");
    let handled = |recorder: &Recorder| recorder.handled.lock().expect("lock").get("k").cloned();
    assert_eq!(handled(&new_only), Some(vec![2]), "only what came after");
    for (name, start, expected) in [
        ("everything", StartAt::All, vec![0, 1, 2]),
        ("from-time", StartAt::Time(before_the_third), vec![2]),
        ("from-sequence", StartAt::Sequence(2), vec![1, 2]),
    ] {
        let recorder = Recorder::default();
        let builder = setup.consumer(name).on::<Sequenced, _>(recorder.clone());
        let builder = if start == StartAt::All {
            builder // the default
        } else {
            builder.start_at(start)
        };
        let consumer = builder.spawn().await.expect("start");
        setup.settled(name).await;
        consumer.shutdown().await.expect("stop");
        assert_eq!(handled(&recorder), Some(expected), "{name}");
    }
    setup.finish().await;
}

async fn per_key_order_holds_with_8_in_flight_over_20_keys(setup: Setup) {
    let (keys, per_key) = (20, 20);
    for n in 0..per_key {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    let recorder = Recorder::default();
    setup
        .consume("ledger", |c| {
            c.max_in_flight(8).on::<Sequenced, _>(recorder.clone())
        })
        .await;

    let handled = recorder.handled.lock().expect("lock").clone();
    assert_eq!(handled.len(), 20);
    for (key, ns) in &handled {
        assert_eq!(
            ns,
            &(0..per_key).collect::<Vec<_>>(),
            "key {key} out of order"
        );
    }
    let most = recorder.most_running.load(Ordering::SeqCst);
    assert!((2..=8).contains(&most), "{most} handlers ran at once");
    assert_eq!(inbox_rows(setup.db()).await, u64::from(keys * per_key));
    setup.finish().await;
}

/// A predecessor that took messages and died without acknowledging them:
/// JetStream would hand them out again only after `ack_wait` (a minute here),
/// long after the later events of their keys. The restarted consumer must
/// read them back from the stream and handle them first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_handles_what_its_predecessor_left_unacked_first() {
    let setup = Setup::postgres().await;
    let (keys, per_key) = (3, 6);
    for n in 0..per_key {
        emit_round(setup.db(), n, keys).await.expect("commit");
    }
    setup.relay().await;
    let ack_wait = Duration::from_secs(60);
    // The predecessor: the durable consumer the `Consumer` would create,
    // whose first five deliveries (every key's #0, and #1 of two keys) are
    // left unacknowledged.
    let stream = jetstream::new(setup.nats.client.clone())
        .get_stream(&setup.stream)
        .await
        .expect("stream");
    let predecessor = stream
        .get_or_create_consumer(
            "ledger",
            jetstream::consumer::pull::Config {
                durable_name: Some("ledger".to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .expect("durable consumer");
    let mut taken = predecessor
        .fetch()
        .max_messages(5)
        .messages()
        .await
        .expect("fetch");
    let mut left_unacked = 0;
    while let Some(message) = futures::StreamExt::next(&mut taken).await {
        message.expect("message");
        left_unacked += 1;
    }
    assert_eq!(left_unacked, 5);

    let recorder = Recorder::default();
    let consumer = setup
        .consumer("ledger")
        .ack_wait(ack_wait)
        .max_in_flight(4)
        .on::<Sequenced, _>(recorder.clone())
        .spawn()
        .await
        .expect("start the consumer");
    let total = (keys * per_key) as usize;
    eventually("every event is handled", async || {
        recorder
            .handled
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= total
    })
    .await;
    consumer.shutdown().await.expect("stop");

    let handled = recorder.handled.lock().expect("lock").clone();
    for (key, ns) in &handled {
        assert_eq!(
            ns,
            &(0..per_key).collect::<Vec<_>>(),
            "key {key} out of order"
        );
    }
    assert_eq!(inbox_rows(setup.db()).await, u64::from(keys * per_key));
    setup.finish().await;
}

/// Per-key order needs one process per consumer name: a second one refuses
/// to start while the first runs, and starts once it has stopped.
async fn a_second_process_of_a_running_consumer_refuses_to_start(setup: Setup) {
    let start = || {
        setup
            .consumer("ledger")
            .on::<Sequenced, _>(Recorder::default())
            .spawn()
    };
    let first = start().await.expect("the first one starts");
    // The lock belongs to a database session; the second consumer's is
    // another connection of the pool, as another process's would be.
    match start().await {
        Err(outbox_nats::ConsumerError::Inbox(StartError::AlreadyRunning(name))) => {
            assert_eq!(name, "ledger")
        }
        other => panic!("a second `ledger` started: {other:?}"),
    }
    first.shutdown().await.expect("stop");
    let again = start().await.expect("starts once the first one stopped");
    again.shutdown().await.expect("stop");
    setup.finish().await;
}

/// A pool of one connection cannot hold the consumer's lock and run a
/// handler: `spawn` refuses, saying how many the consumer needs, instead of
/// starting a consumer that handles nothing. It holds nothing afterwards: a
/// consumer on a pool of two starts.
async fn a_consumer_refuses_a_pool_it_would_stall_on(setup: Setup) {
    let with_pool = async |size| {
        let db = (setup.test)
            .pool(|options| {
                options
                    .max_connections(size)
                    .acquire_timeout(Duration::from_secs(30));
            })
            .await;
        Consumer::builder(setup.nats.client.clone(), db, "ledger")
            .namespace(setup.nats.namespace.clone())
            .on::<Sequenced, _>(Recorder::default())
            .spawn()
            .await
    };
    match with_pool(1).await {
        Err(
            error @ outbox_nats::ConsumerError::Inbox(StartError::PoolTooSmall { needs: 2, .. }),
        ) => {
            let text = error.to_string();
            assert!(text.contains("needs at least 2 connections"), "{text}");
        }
        other => panic!("started on a pool of one: {other:?}"),
    }
    let two = with_pool(2).await.expect("starts on a pool of two");
    two.shutdown().await.expect("stop");
    setup.finish().await;
}

/// Signals when it starts, then takes a while.
#[derive(Clone)]
struct Slow {
    started: Arc<tokio::sync::Notify>,
}

impl Handler<OrderCreated> for Slow {
    type Error = AppError;

    async fn handle(
        &self,
        event: OrderCreated,
        _meta: Metadata,
        db: &DatabaseTransaction,
    ) -> Result<(), AppError> {
        self.started.notify_one();
        tokio::time::sleep(Duration::from_millis(500)).await;
        order::ActiveModel {
            id: Set(event.order_id),
            total_cents: Set(event.total_cents),
        }
        .insert(db)
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_handler_in_flight_and_acks_it() {
    let setup = Setup::postgres().await;
    setup
        .publish(OrderCreated {
            order_id: 3,
            total_cents: 300,
        })
        .await;
    let started = Arc::new(tokio::sync::Notify::new());
    let consumer = setup
        .consumer("billing")
        .on::<OrderCreated, _>(Slow {
            started: Arc::clone(&started),
        })
        .spawn()
        .await
        .expect("start the consumer");
    started.notified().await;
    consumer.shutdown().await.expect("stop");
    assert_eq!(
        orders(setup.db()).await,
        1,
        "the handler in flight committed"
    );
    let info = jetstream::new(setup.nats.client.clone())
        .get_stream(&setup.stream)
        .await
        .expect("stream")
        .consumer_info("billing")
        .await
        .expect("info")
        .clone();
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "and it was acknowledged"
    );
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_leaves_the_consumer_running() {
    let setup = Setup::postgres().await;
    let handler = InsertOrder::default();
    drop(
        setup
            .consumer("billing")
            .on::<OrderCreated, _>(handler.clone())
            .spawn()
            .await
            .expect("start the consumer"),
    );
    setup
        .publish(OrderCreated {
            order_id: 6,
            total_cents: 600,
        })
        .await;
    setup.settled("billing").await;
    assert_eq!(orders(setup.db()).await, 1);
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_rows_are_deleted_after_the_retention_window() {
    let setup = Setup::postgres().await;
    let db = setup.db();
    setup
        .publish(OrderCreated {
            order_id: 4,
            total_cents: 400,
        })
        .await;
    let handler = InsertOrder::default();
    let consumer = setup
        .consumer("billing")
        .inbox_retention(Duration::from_secs(1))
        .on::<OrderCreated, _>(handler.clone())
        .spawn()
        .await
        .expect("start the consumer");
    setup.settled("billing").await;
    assert_eq!(orders(db).await, 1);
    eventually("the inbox row is purged", async || {
        inbox_rows(db).await == 0
    })
    .await;
    consumer.shutdown().await.expect("stop");
    setup.finish().await;
}

/// One enum, two event types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", key = order_id)]
enum Shipment {
    #[outbox(routing_key = "shipment.{order_id}.packed", name = "ShipmentPacked")]
    Packed { order_id: i64 },
    #[outbox(routing_key = "shipment.{order_id}.sent", name = "ShipmentSent")]
    Sent { order_id: i64, carrier: String },
}

#[derive(Default, Clone)]
struct Shipments(Arc<Mutex<Vec<(String, Shipment)>>>);

impl Handler<Shipment> for Shipments {
    type Error = String;

    async fn handle(
        &self,
        event: Shipment,
        meta: Metadata,
        _db: &DatabaseTransaction,
    ) -> Result<(), String> {
        let mut seen = self.0.lock().expect("lock");
        seen.push((meta.event_type, event));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_handler_takes_every_event_type_of_an_enum() {
    let setup = Setup::postgres().await;
    let sent = Shipment::Sent {
        order_id: 8,
        carrier: "rail".into(),
    };
    setup.publish(Shipment::Packed { order_id: 8 }).await;
    setup.publish(sent.clone()).await;
    let shipments = Shipments::default();
    setup
        .consume("shipping", |c| c.on::<Shipment, _>(shipments.clone()))
        .await;
    let seen = shipments.0.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            (
                "ShipmentPacked".to_owned(),
                Shipment::Packed { order_id: 8 }
            ),
            ("ShipmentSent".to_owned(), sent),
        ]
    );
    assert!(dead_letters(setup.db(), "shipping").await.is_empty());
    setup.finish().await;
}

#[tokio::test]
async fn a_consumer_without_handlers_or_with_two_for_one_type_does_not_start() {
    let nats = TestNats::shared().await;
    let test = TestDb::sqlite().await;
    let builder = || Consumer::builder(nats.client.clone(), test.db.clone(), "c");
    let error = builder().spawn().await.expect_err("no handlers");
    assert_eq!(error.to_string(), "consumer `c` has no handlers");
    let twice = || {
        builder()
            .on::<OrderCreated, _>(InsertOrder::default())
            .on::<OrderCreated, _>(reserve_stock)
    };
    let error = twice().spawn().await.expect_err("two handlers");
    assert_eq!(
        error.to_string(),
        "two handlers for event `OrderCreated` version 1 on one consumer"
    );
    // `build` reports both without asking NATS or the database anything.
    let built = twice().build().expect_err("two handlers, at build");
    assert_eq!(built.to_string(), error.to_string());
    assert!(builder().build().is_err(), "no handlers, at build");
    let consumer = builder()
        .namespace("ns")
        .on::<OrderCreated, _>(InsertOrder::default())
        .build()
        .expect("one handler");
    assert_eq!((consumer.name(), consumer.stream()), ("c", "NS_ORDERS"));
    let error = builder()
        .namespace(nats.namespace.clone())
        .on::<OrderCreated, _>(InsertOrder::default())
        .spawn()
        .await
        .expect_err("no stream");
    assert!(
        matches!(&error, outbox_nats::ConsumerError::StreamNotFound(name) if name.ends_with("_ORDERS")),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("(provision it first)"),
        "{error}"
    );
    test.finish().await;
}

/// An operator's replay hands a dead letter back to the running consumer:
/// its handler runs again once, however often the replay is asked for; a
/// replay that fails again is a dead letter again, with its new error.
async fn a_replayed_dead_letter_is_handled_again_once(setup: Setup) {
    use outbox_core::dead_letters::{self, Selection};
    let db = setup.db();
    for order_id in [13, 14] {
        let total_cents = order_id * 100;
        setup
            .publish(OrderCreated {
                order_id,
                total_cents,
            })
            .await;
    }
    let poisoned = InsertOrder {
        poison: Some(13),
        ..InsertOrder::default()
    };
    setup
        .consume("strict", |c| {
            c.max_deliveries(2).on::<OrderCreated, _>(poisoned.clone())
        })
        .await;
    let [letter] = &dead_letters(db, "strict").await[..] else {
        panic!("one dead letter");
    };
    assert_eq!(orders(db).await, 1, "order 14 went through");

    // Still poisoned: the replay fails twice more and is a dead letter again.
    let again = setup
        .consumer("strict")
        .max_deliveries(2)
        .on::<OrderCreated, _>(poisoned.clone())
        .spawn()
        .await
        .expect("start the consumer");
    let replayed = dead_letters::inbox::replay(db, &Selection::id(letter.id))
        .await
        .expect("replay");
    assert_eq!(replayed, [letter.id]);
    eventually("the replay failed again", async || {
        let letters = dead_letters(db, "strict").await;
        letters.len() == 1 && letters[0].id != letter.id
    })
    .await;
    again.shutdown().await.expect("stop");
    let [letter] = &dead_letters(db, "strict").await[..] else {
        panic!("one dead letter");
    };
    assert_eq!(letter.replay_requested_at, None);
    assert_eq!(letter.deliveries, 2);
    assert_eq!(poisoned.calls.load(Ordering::SeqCst), 2 + 1 + 2);

    // Fixed: two replays of the same letter run the handler once.
    let fixed = InsertOrder::default();
    let consumer = setup
        .consumer("strict")
        .on::<OrderCreated, _>(fixed.clone())
        .spawn()
        .await
        .expect("start the consumer");
    let selection = Selection::all()
        .consumer("strict")
        .event_type("OrderCreated");
    for _ in 0..2 {
        let replayed = dead_letters::inbox::replay(db, &selection)
            .await
            .expect("replay");
        assert!(replayed.len() <= 1, "{replayed:?}");
    }
    eventually("the replay was handled", async || {
        dead_letters(db, "strict").await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    consumer.shutdown().await.expect("stop");
    assert_eq!(
        fixed.calls.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    assert_eq!(orders(db).await, 2);
    let unknown = dead_letters::inbox::replay(db, &Selection::id(letter.id)).await;
    assert!(
        matches!(unknown, Err(dead_letters::DeadLetterError::NotFound(id)) if id == letter.id),
        "{unknown:?}"
    );
    setup.finish().await;
}

/// Inserts the order, then fails for order 2: only the batch's savepoint
/// can undo that insert (a `#[transactional]` handler would undo its own).
async fn insert_then_fail_on_2(
    event: OrderCreated,
    meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    let order_id = event.order_id;
    InsertOrder::default().handle(event, meta, db).await?;
    if order_id == 2 {
        return Err(AppError::Rejected);
    }
    Ok(())
}

/// A batch straight through `Handlers::process_batch`, no broker: the
/// failing handler's insert is undone, the others' commit with their inbox
/// rows, and the same events again are duplicates.
async fn a_batch_commits_all_but_the_failing_handlers_effect(db: &DatabaseConnection) {
    let mut handlers = inbox::Handlers::new();
    handlers
        .insert::<OrderCreated, _>(insert_then_fail_on_2)
        .expect("one handler");
    let orders: Vec<(OrderCreated, Metadata)> = (1..=3)
        .map(|order_id| {
            let event = OrderCreated {
                order_id,
                total_cents: 100,
            };
            let mut meta = Metadata::for_event(&event).expect("subject");
            meta.stream_sequence = u64::try_from(order_id).expect("positive");
            (event, meta)
        })
        .collect();
    let payloads: Vec<Vec<u8>> = (orders.iter())
        .map(|(event, _)| event.to_payload().expect("payload"))
        .collect();
    let batch = || {
        (orders.iter().zip(&payloads))
            .map(|((_, meta), payload)| inbox::Incoming {
                meta: meta.clone(),
                payload,
            })
            .collect()
    };

    // What became of each message of a batch, by name.
    let run = async || {
        let answers = handlers.process_batch(db, "billing", batch()).await;
        (answers.iter())
            .map(|answer| match answer {
                inbox::Processed::Handled => "handled",
                inbox::Processed::Duplicate => "duplicate",
                inbox::Processed::Failed(_) => "failed",
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run().await, ["handled", "failed", "handled"]);
    let ids: Vec<i64> = (order::Entity::find().all(db).await.expect("orders"))
        .iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(ids, [1, 3]);
    assert_eq!(inbox_rows(db).await, 2, "no inbox row for the failure");

    assert_eq!(run().await, ["duplicate", "failed", "duplicate"]);
    assert_eq!(order::Entity::find().count(db).await.expect("orders"), 2);

    // Two copies of one new event in a batch: the second waits for the first.
    let (event, meta) = &orders[0];
    let mut copy = meta.clone();
    copy.id = uuid::Uuid::now_v7();
    let order_4 = OrderCreated {
        order_id: 4,
        total_cents: event.total_cents,
    };
    let payload = order_4.to_payload().expect("payload");
    let twice = vec![
        inbox::Incoming {
            meta: copy.clone(),
            payload: &payload,
        },
        inbox::Incoming {
            meta: copy,
            payload: &payload,
        },
    ];
    let answers = handlers.process_batch(db, "billing", twice).await;
    assert!(
        matches!(
            answers.as_slice(),
            [
                inbox::Processed::Handled,
                inbox::Processed::Unavailable(inbox::Unavailable::InBatch(_))
            ]
        ),
        "{answers:?}"
    );
    assert_eq!(order::Entity::find().count(db).await.expect("orders"), 3);
}

/// Inserts the order; fails for order 12; for order 13 ends the batch's
/// transaction behind the consumer's back (a `ROLLBACK`), so that the
/// database fails at the next savepoint: a real database failure mid-batch.
async fn insert_fail_on_12_break_on_13(
    event: OrderCreated,
    meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    let order_id = event.order_id;
    if order_id == 13 {
        db.execute_unprepared("ROLLBACK")
            .await
            .map_err(outbox_core::Error::from)?;
        return Ok(());
    }
    InsertOrder::default().handle(event, meta, db).await?;
    if order_id == 12 {
        return Err(AppError::Rejected);
    }
    Ok(())
}

/// The database fails in the middle of a batch: nothing commits, and each
/// message keeps an answer of its own — those the transaction would have
/// committed are unavailable (retried, not blamed), the failed handler's
/// failure and the unhandled message's verdict stand.
async fn a_batch_the_database_fails_answers_each_message(db: &DatabaseConnection) {
    let mut handlers = inbox::Handlers::new();
    handlers
        .insert::<OrderCreated, _>(insert_fail_on_12_break_on_13)
        .expect("one handler");
    let mut messages = Vec::new();
    for order_id in [11, 12, 13, 0, 15] {
        let event = OrderCreated {
            order_id,
            total_cents: 100,
        };
        let mut meta = Metadata::for_event(&event).expect("subject");
        if order_id == 0 {
            meta.event_type = "NoSuchEvent".to_owned();
        }
        messages.push((meta, event.to_payload().expect("payload")));
    }
    let batch = (messages.iter())
        .map(|(meta, payload)| inbox::Incoming {
            meta: meta.clone(),
            payload,
        })
        .collect();
    let answers = handlers.process_batch(db, "billing", batch).await;
    let names: Vec<&str> = (answers.iter())
        .map(|answer| match answer {
            inbox::Processed::Unavailable(error) => {
                assert!(
                    matches!(error, inbox::Unavailable::Database(_)),
                    "the database's error is kept: {error:?}"
                );
                "unavailable"
            }
            inbox::Processed::Failed(_) => "failed",
            inbox::Processed::Unhandled { .. } => "unhandled",
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "unavailable",
            "failed",
            "unavailable",
            "unhandled",
            "unavailable"
        ]
    );
    assert_eq!(orders(db).await, 0, "nothing committed");
    assert_eq!(inbox_rows(db).await, 0);
}

async fn inbox_records_once_and_purges_by_age(db: &DatabaseConnection) {
    let id = uuid::Uuid::now_v7();
    let txn = db.begin().await.expect("begin");
    assert!(inbox::record(&txn, "a", id).await.expect("record"));
    assert!(!inbox::record(&txn, "a", id).await.expect("record again"));
    assert!(
        inbox::record(&txn, "b", id)
            .await
            .expect("another consumer")
    );
    txn.commit().await.expect("commit");
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        inbox::purge(db, "a", Utc::now() - chrono::Duration::hours(1))
            .await
            .expect("purge"),
        0
    );
    assert_eq!(inbox::purge(db, "a", later).await.expect("purge"), 1);
    assert_eq!(inbox_rows(db).await, 1, "only consumer a's row went");
}

outbox_tests::on_each_backend!(
    inbox_records_once_and_purges_by_age,
    a_batch_commits_all_but_the_failing_handlers_effect,
    a_batch_the_database_fails_answers_each_message,
);

outbox_tests::on_postgres_and_mysql!(
    a_handler_failing_twice_then_succeeding_applies_once,
    a_panicking_handler_is_retried_then_dead_lettered_and_the_consumer_goes_on,
    poison_and_undecodable_messages_are_dead_lettered_and_later_ones_continue,
    a_database_failure_is_retried_and_never_dead_letters,
    events_emitted_by_a_handler_reach_the_outbox_only_when_it_commits,
    per_key_order_holds_with_8_in_flight_over_20_keys,
    a_second_process_of_a_running_consumer_refuses_to_start,
    a_consumer_refuses_a_pool_it_would_stall_on,
    a_new_consumer_starts_where_it_is_told,
    several_filter_subjects_need_a_2_10_server_and_say_so,
    a_replayed_dead_letter_is_handled_again_once,
    an_events_own_headers_travel_to_the_handler,
);
