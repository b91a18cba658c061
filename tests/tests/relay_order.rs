//! Per-key order across relays: three relays on one outbox, one hot key,
//! an event that becomes claimable late inside the round in flight, and a
//! claim that drops events a key's earlier one stops.

use std::time::Duration;

use outbox_core::entity::outbox_message;
use outbox_core::relay::{Batch, Delivery, Publisher};
use outbox_core::{emit, transactional};
use outbox_nats::JetStreamPublisher;
use outbox_tests::fixtures::{AppError, Sequenced, emit_round};
use outbox_tests::streamed::{assert_each_once, per_key, sequenced};
use outbox_tests::{Setup, drained, emit_one, fast};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, QueryOrder};

/// Events `from..to` of one key, in one transaction.
#[transactional]
async fn emit_run(db: &DatabaseConnection, key: &str, from: u32, to: u32) -> Result<(), AppError> {
    for n in from..to {
        emit!(Sequenced {
            key: key.to_owned(),
            n
        });
    }
    Ok(())
}

async fn three_relays_keep_per_key_commit_order(setup: Setup) {
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    let relays: Vec<_> = (0..3)
        .map(|_| fast(db, nats.publisher()).batch_size(200).spawn())
        .collect();
    for n in 0..100 {
        emit_round(db, n, 100).await.expect("commit");
    }
    drained(db, Duration::from_secs(120)).await;
    for relay in relays {
        relay.shutdown().await.expect("relay stops");
    }

    let messages = nats.messages(stream).await;
    assert_each_once(&messages, 10_000);
    let per_key = per_key(&messages);
    assert_eq!(per_key.len(), 100);
    for (key, ns) in per_key {
        assert_eq!(ns, (0..100).collect::<Vec<_>>(), "order of key {key}");
    }
    setup.finish().await;
}

async fn three_relays_keep_one_hot_key_in_order(setup: Setup) {
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    let relays: Vec<_> = (0..3)
        .map(|_| fast(db, nats.publisher()).batch_size(100).spawn())
        .collect();
    for from in (0..3_000).step_by(250) {
        emit_run(db, "hot", from, from + 250).await.expect("commit");
    }
    drained(db, Duration::from_secs(120)).await;
    for relay in relays {
        relay.shutdown().await.expect("relay stops");
    }
    let messages = nats.messages(stream).await;
    assert_each_once(&messages, 3_000);
    let order: Vec<u32> = sequenced(&messages).into_iter().map(|e| e.n).collect();
    assert_eq!(order, (0..3_000).collect::<Vec<_>>());
    setup.finish().await;
}

/// Makes key `late`'s first event claimable inside the span of the round in
/// flight, as an event committed late with a lower id would be, when the
/// relay publishes its first round; then commits key `late`'s next event.
/// An injected fault: no real transaction can be made to commit at that
/// exact moment.
struct LateInFirstRound {
    inner: JetStreamPublisher,
    db: DatabaseConnection,
    done: std::sync::atomic::AtomicBool,
}

impl Publisher for LateInFirstRound {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        self.inner.publish(events).await
    }

    async fn publish_in_key_order(&self, batch: &Batch<'_>) -> Vec<Option<Delivery>> {
        let events = batch.events();
        if !self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let (first, last) = (
                events[0].id.as_u128(),
                events[events.len() - 1].id.as_u128(),
            );
            let inside = uuid::Uuid::from_u128(first + (last - first) / 2);
            assert!(events.iter().all(|e| e.id != inside));
            self.db
                .execute_unprepared(&format!(
                    "UPDATE outbox_messages SET id = '{inside}', next_attempt_at = now() \
                     WHERE partition_key = 'late'"
                ))
                .await
                .expect("move the late event into the span");
            let late = Sequenced {
                key: "late".into(),
                n: 1,
            };
            emit_one(&self.db, late).await.expect("commit");
        }
        self.inner.publish_in_key_order(batch).await
    }
}

/// The claim beside a round in flight skips that round's id span; an event
/// that becomes claimable inside it is published by a later round of the
/// same drain, and a newer event of its key waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_claimable_late_inside_the_round_in_flight_is_not_passed_over() {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    let late = Sequenced {
        key: "late".into(),
        n: 0,
    };
    emit_one(db, late).await.expect("commit");
    db.execute_unprepared("UPDATE outbox_messages SET next_attempt_at = now() + interval '1 hour'")
        .await
        .expect("not due yet");
    for n in 0..3 {
        emit_round(db, n, 10).await.expect("commit");
    }
    let publisher = LateInFirstRound {
        inner: nats.publisher(),
        db: db.clone(),
        done: false.into(),
    };
    let relay = fast(db, publisher).batch_size(10).build();
    let report = relay.drain().await.expect("drain");

    assert_eq!(report.published, 32, "{report:?}");
    let messages = nats.messages(stream).await;
    assert_each_once(&messages, 32);
    for (key, ns) in per_key(&messages) {
        let expected: &[u32] = if key == "late" { &[0, 1] } else { &[0, 1, 2] };
        assert_eq!(ns, expected, "order of key {key}");
    }
    setup.finish().await;
}

/// On PostgreSQL the settle deletes the published rows by the ctids the claim
/// read: when the claim drops events whose key is stopped (here behind an
/// event backing off), their ctids go with them, and only the published rows
/// are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_drops_stopped_events_deletes_only_the_published_rows() {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    let stopped = |n| Sequenced {
        key: "stopped".into(),
        n,
    };
    emit_one(db, stopped(0)).await.expect("commit");
    db.execute_unprepared("UPDATE outbox_messages SET next_attempt_at = now() + interval '1 hour'")
        .await
        .expect("backing off");
    for n in 1..3 {
        emit_one(db, stopped(n)).await.expect("commit");
    }
    emit_round(db, 0, 10).await.expect("commit");
    let relay = fast(db, nats.publisher()).build();

    let report = relay.process_batch().await.expect("round");

    assert_eq!(report.published, 10, "{report:?}");
    assert_each_once(&nats.messages(stream).await, 10);
    let left: Vec<(String, u32)> = outbox_message::Entity::find()
        .order_by_asc(outbox_message::Column::Id)
        .all(db)
        .await
        .expect("outbox")
        .iter()
        .map(|row| serde_json::from_slice::<Sequenced>(&row.payload).expect("payload"))
        .map(|event| (event.key, event.n))
        .collect();
    let stopped_key = |n| ("stopped".to_owned(), n);
    assert_eq!(left, [stopped_key(0), stopped_key(1), stopped_key(2)]);
    setup.finish().await;
}

outbox_tests::on_postgres_and_mysql!(
    three_relays_keep_per_key_commit_order,
    three_relays_keep_one_hot_key_in_order,
);
