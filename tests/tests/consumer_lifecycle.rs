//! A consumer's start and stop against real databases and NATS JetStream:
//! what `build` and `spawn` refuse (no handlers, a conflict, a second
//! process, a pool too small, filters an old server lacks), where a new
//! consumer starts, and how it shuts down.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use outbox_core::consumer::StartError;
use outbox_core::inbox::{Handler, Metadata};
use outbox_nats::{Consumer, StartAt};
use outbox_tests::consumers::{InsertOrder, Recorder, orders};
use outbox_tests::fixtures::{AppError, OrderCreated, Sequenced, order, reserve_stock};
use outbox_tests::nats::TestNats;
use outbox_tests::{Setup, TestDb};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseTransaction};

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

outbox_tests::on_postgres_and_mysql!(
    a_second_process_of_a_running_consumer_refuses_to_start,
    a_consumer_refuses_a_pool_it_would_stall_on,
    a_new_consumer_starts_where_it_is_told,
    several_filter_subjects_need_a_2_10_server_and_say_so,
);
