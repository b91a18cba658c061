//! The inbox consumer's deliveries against real databases and NATS
//! JetStream: once per event through redeliveries, failures, panics, poison
//! messages, database and NATS outages, restarts and replays, in per-key
//! order; each test has its own schema and its own namespace of streams.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use outbox_core::entity::inbox_dead_letter;
use outbox_core::inbox::{Handler, Metadata};
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::Consumer;
use outbox_tests::consumers::{
    InsertOrder, Recorder, dead_letters, inbox_rows, orders, publish_orders,
};
use outbox_tests::fixtures::{
    AppError, OrderCreated, Sequenced, StockReserved, emit_round, order, reserve_stock,
};
use outbox_tests::nats::{PrivateNats, TestNats};
use outbox_tests::{Setup, TestDb, emit_one, eventually, settled};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait};
use serde::{Deserialize, Serialize};

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

outbox_tests::on_postgres_and_mysql!(
    a_handler_failing_twice_then_succeeding_applies_once,
    a_panicking_handler_is_retried_then_dead_lettered_and_the_consumer_goes_on,
    poison_and_undecodable_messages_are_dead_lettered_and_later_ones_continue,
    a_database_failure_is_retried_and_never_dead_letters,
    events_emitted_by_a_handler_reach_the_outbox_only_when_it_commits,
    per_key_order_holds_with_8_in_flight_over_20_keys,
    a_replayed_dead_letter_is_handled_again_once,
    an_events_own_headers_travel_to_the_handler,
);
