//! What the relay does with events that do not go through: rejected ones
//! hold back their key and are retried by their own attempts, poison,
//! oversized and untravelable ones are dead-lettered, and replayed dead
//! letters keep their id and order.

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use outbox_core::entity::{outbox_dead_letter, outbox_message};
use outbox_core::relay::{Batch, Delivery, Publisher};
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::{JetStreamPublisher, provision};
use outbox_tests::fixtures::{AppError, Sequenced, emit_round};
use outbox_tests::streamed::{assert_each_once, header, per_key, sequenced};
use outbox_tests::{Setup, drained, emit_one, fast};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryOrder};
use serde::{Deserialize, Serialize};

const WINDOW: Duration = Duration::from_secs(120);

/// Larger than NATS accepts (1 MiB by default) when `data` is.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "blob")]
struct Blob {
    data: String,
}

/// Commits a `Blob` of 2 MiB, over NATS' default 1 MiB max payload.
async fn emit_oversized(db: &DatabaseConnection) {
    let blob = Blob {
        data: "x".repeat(2 << 20),
    };
    emit_one(db, blob).await.expect("commit");
}

/// Its exchange has no stream in these tests, so JetStream rejects every publish.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "nowhere", routing_key = "stray", key = key)]
struct Stray {
    key: String,
}

/// Keyed by free text that its subject does not carry.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "noted", key = note)]
struct Noted {
    note: String,
}

async fn poison_events_are_dead_lettered_and_the_rest_delivered(setup: Setup) {
    // Nothing captures `nowhere.>`.
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    emit_oversized(db).await;
    emit_one(db, Stray { key: "k1".into() })
        .await
        .expect("commit");
    emit_one(
        db,
        Sequenced {
            key: "k1".into(),
            n: 1,
        },
    )
    .await
    .expect("commit");
    for n in 0..5 {
        emit_one(
            db,
            Sequenced {
                key: "k2".into(),
                n,
            },
        )
        .await
        .expect("commit");
    }
    let relay = fast(db, nats.publisher()).max_attempts(3).spawn();
    drained(db, Duration::from_secs(30)).await;
    relay.shutdown().await.expect("relay stops");

    let letters = outbox_dead_letter::Entity::find()
        .order_by_asc(outbox_dead_letter::Column::Id)
        .all(db)
        .await
        .expect("dead letters");
    let summary: Vec<_> = letters
        .iter()
        .map(|l| (l.event_type.as_str(), l.attempts))
        .collect();
    assert_eq!(
        summary,
        [("Blob", 1), ("Stray", 3)],
        "oversized at once, rejected after 3 attempts"
    );
    assert!(
        letters[0].last_error.contains("payload"),
        "{}",
        letters[0].last_error
    );
    assert_eq!(
        letters[0].payload.len(),
        (2 << 20) + r#"{"data":""}"#.len(),
        "payload kept"
    );

    let messages = nats.messages(stream).await;
    let delivered = sequenced(&messages);
    let k2: Vec<u32> = delivered
        .iter()
        .filter(|e| e.key == "k2")
        .map(|e| e.n)
        .collect();
    assert_eq!(k2, [0, 1, 2, 3, 4], "other keys are not held back");
    let k1 = messages
        .iter()
        .find(|m| header(m, outbox_core::headers::PARTITION_KEY) == "k1")
        .expect("the failing key's later event is delivered");
    let stored_at = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::from(k1.time));
    assert!(
        stored_at >= letters[1].failed_at,
        "k1's later event waited for the dead letter"
    );
    setup.finish().await;
}

/// Commits `count` strays of distinct keys in one transaction.
#[transactional]
async fn emit_strays(db: &DatabaseConnection, count: usize) -> Result<(), AppError> {
    for n in 0..count {
        emit!(Stray {
            key: format!("k{n}")
        });
    }
    Ok(())
}

/// A round whose every event is dead-lettered writes them all, however
/// large the batch: 6,000 dead letters of 13 columns are more bind values
/// than one statement may carry on any backend (SQLite 32,766, PostgreSQL
/// and MySQL 65,535), so the insert goes in several.
async fn a_round_of_dead_letters_larger_than_one_statement_is_written(db: &DatabaseConnection) {
    const EVENTS: usize = 6_000;
    emit_strays(db, EVENTS).await.expect("commit");
    let report = fast(db, RejectAll)
        .batch_size(EVENTS)
        .max_attempts(1)
        .build()
        .process_batch()
        .await
        .expect("the round settles");
    assert_eq!((report.claimed, report.dead_lettered), (EVENTS, EVENTS));
    let letters = outbox_dead_letter::Entity::find()
        .count(db)
        .await
        .expect("count");
    assert_eq!(letters, EVENTS as u64);
    let left = outbox_message::Entity::find()
        .count(db)
        .await
        .expect("count");
    assert_eq!(left, 0);
}

outbox_tests::on_each_backend!(a_round_of_dead_letters_larger_than_one_statement_is_written);

/// NATS header values cannot hold CR or LF, and async-nats panics on one:
/// a partition key with a line break must cost its own event a dead letter
/// (at once: no retry can succeed), not the relay its life. `emit!` refuses
/// such a key, so the row is written as another program (or an older
/// version) could have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_cannot_travel_as_nats_headers_is_dead_lettered_at_once() {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    db.execute_unprepared(&format!(
        "INSERT INTO outbox_messages (id, event_type, event_version, exchange, subject, \
         partition_key, payload, content_type, created_at, attempts, next_attempt_at) \
         VALUES ('{}', 'Noted', 1, 'orders', 'orders.noted', E'line\\nbreak', \
         convert_to('{{\"note\":\"?\"}}', 'UTF8'), 'application/json', now(), 0, now())",
        uuid::Uuid::now_v7()
    ))
    .await
    .expect("insert from another program");
    emit_one(
        db,
        Noted {
            note: "fine".into(),
        },
    )
    .await
    .expect("commit");
    let relay = fast(db, nats.publisher()).spawn();
    drained(db, Duration::from_secs(30)).await;
    relay.shutdown().await.expect("the relay did not die");

    let letters = outbox_dead_letter::Entity::find()
        .all(db)
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].partition_key.as_deref(), Some("line\nbreak"));
    assert_eq!(
        letters[0].attempts, 1,
        "dead-lettered at its first attempt, not retried"
    );
    assert!(
        letters[0]
            .last_error
            .contains(outbox_core::headers::PARTITION_KEY),
        "{}",
        letters[0].last_error
    );
    let delivered = nats.messages(stream).await;
    let keys: Vec<&str> = (delivered.iter())
        .map(|m| header(m, outbox_core::headers::PARTITION_KEY))
        .collect();
    assert_eq!(keys, ["fine"]);
    setup.finish().await;
}

/// Rejects the first attempt at key `hot`'s first event and publishes the rest.
/// An injected fault: no real broker rejects one chosen event on cue.
struct RejectHotOnce {
    inner: JetStreamPublisher,
    rejected: std::sync::atomic::AtomicBool,
}

impl Publisher for RejectHotOnce {
    async fn publish(
        &self,
        events: &[&outbox_core::entity::outbox_message::Model],
    ) -> Vec<Delivery> {
        let is_target = |e: &outbox_core::entity::outbox_message::Model| {
            let event: Sequenced = serde_json::from_slice(&e.payload).expect("payload");
            event.key == "hot" && event.n == 0
        };
        let target = events.iter().position(|e| is_target(e));
        let reject = target.is_some()
            && !self
                .rejected
                .swap(true, std::sync::atomic::Ordering::SeqCst);
        let rest: Vec<_> = (events.iter().enumerate())
            .filter(|(i, _)| !(reject && Some(*i) == target))
            .map(|(_, e)| *e)
            .collect();
        let mut published = self.inner.publish(&rest).await.into_iter();
        (0..events.len())
            .map(|i| match reject && Some(i) == target {
                true => Delivery::Rejected("rejected once on purpose".into()),
                false => published.next().expect("a delivery per event"),
            })
            .collect()
    }
}

/// Key `hot` gets every `spacing`-th event, in rounds of 10.
async fn a_rejected_event_holds_back_its_key_in_later_rounds(spacing: u32) {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    for n in 0..20 {
        emit_one(
            db,
            Sequenced {
                key: "hot".into(),
                n,
            },
        )
        .await
        .expect("commit");
        emit_round(db, n, spacing - 1).await.expect("commit");
    }
    let publisher = RejectHotOnce {
        inner: nats.publisher(),
        rejected: false.into(),
    };
    let relay = fast(db, publisher).batch_size(10).spawn();
    drained(db, Duration::from_secs(30)).await;
    relay.shutdown().await.expect("relay stops");
    let hot: Vec<u32> = sequenced(&nats.messages(stream).await)
        .into_iter()
        .filter(|e| e.key == "hot")
        .map(|e| e.n)
        .collect();
    assert_eq!(hot, (0..20).collect::<Vec<_>>());
    setup.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_holds_back_its_key_in_the_next_round() {
    // Every round of 10 holds one `hot` event, the first round the rejected #0.
    a_rejected_event_holds_back_its_key_in_later_rounds(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_holds_back_its_key_two_rounds_later() {
    // `hot` #1 lands two rounds after the rejected #0.
    a_rejected_event_holds_back_its_key_in_later_rounds(25).await;
}

/// Rejects every event, with an error that depends on its key: `left` for
/// k0, k1 and k3, `right` for the others.
struct RejectAll;

impl Publisher for RejectAll {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        (events.iter())
            .map(|e| {
                let side = match e.partition_key.as_deref() {
                    Some("k0" | "k1" | "k3") => "left",
                    _ => "right",
                };
                Delivery::Rejected(format!("rejected {side}").into())
            })
            .collect()
    }
}

/// The rejected events of a round are rescheduled a statement per attempt
/// count and error: each row still gets its own count, its own error and
/// the backoff of its own count, and events rejected alike come due together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_events_are_each_rescheduled_by_their_own_attempts_and_error() {
    let setup = Setup::postgres().await;
    let db = setup.db();
    for n in 0..6 {
        emit_one(
            db,
            Sequenced {
                key: format!("k{n}"),
                n,
            },
        )
        .await
        .expect("commit");
    }
    db.execute_unprepared(
        "UPDATE outbox_messages SET attempts = 2 WHERE partition_key IN ('k3', 'k4', 'k5')",
    )
    .await
    .expect("two earlier attempts");
    let hour = Duration::from_secs(3600);
    let before = chrono::Utc::now();
    let report = fast(db, RejectAll)
        .retry_backoff(outbox_core::Backoff {
            initial: hour,
            max: 100 * hour,
        })
        .build()
        .process_batch()
        .await
        .expect("round");
    assert_eq!((report.claimed, report.retried), (6, 6), "{report:?}");

    let rows = outbox_message::Entity::find()
        .order_by_asc(outbox_message::Column::Id)
        .all(db)
        .await
        .expect("rows");
    let hours =
        |row: &outbox_message::Model| (row.next_attempt_at - before).num_seconds() as f64 / 3600.0;
    let seen: Vec<(Option<&str>, i32, &str)> = (rows.iter())
        .map(|r| {
            (
                r.partition_key.as_deref(),
                r.attempts,
                r.last_error.as_deref().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Some("k0"), 1, "rejected left"),
            (Some("k1"), 1, "rejected left"),
            (Some("k2"), 1, "rejected right"),
            (Some("k3"), 3, "rejected left"),
            (Some("k4"), 3, "rejected right"),
            (Some("k5"), 3, "rejected right"),
        ]
    );
    for row in &rows[..3] {
        assert!(
            (0.49..=1.01).contains(&hours(row)),
            "first failure: {}",
            hours(row)
        );
    }
    for row in &rows[3..] {
        assert!(
            (1.99..=4.01).contains(&hours(row)),
            "third failure: {}",
            hours(row)
        );
    }
    assert_eq!(
        rows[0].next_attempt_at, rows[1].next_attempt_at,
        "rejected alike"
    );
    assert_eq!(
        rows[4].next_attempt_at, rows[5].next_attempt_at,
        "rejected alike"
    );
    setup.finish().await;
}

/// The JetStream publisher on its own: a key's next event goes out only once
/// the previous one is stored; a rejected one holds its key's next event back
/// and no other key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_publisher_sends_a_keys_next_event_once_the_previous_is_stored() {
    let setup = Setup::postgres().await;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    emit_one(db, Stray { key: "k1".into() }) // nothing captures `nowhere.>`
        .await
        .expect("commit");
    for (key, n) in [("k1", 1), ("k2", 0), ("k2", 1), ("k2", 2)] {
        let key = key.to_owned();
        emit_one(db, Sequenced { key, n }).await.expect("commit");
    }
    let rows = outbox_message::Entity::find()
        .order_by_asc(outbox_message::Column::Id)
        .all(db)
        .await
        .expect("rows");
    let batch = Batch::new(rows.iter().collect());
    let chains: Vec<_> = (0..batch.len()).map(|i| batch.after(i)).collect();
    assert_eq!(chains, [None, Some(0), None, Some(2), Some(3)]);
    let deliveries = nats.publisher().publish_in_key_order(&batch).await;

    let refusal = match &deliveries[0] {
        Some(Delivery::Rejected(error)) => error.get_ref().downcast_ref::<outbox_nats::Refusal>(),
        _ => None,
    };
    assert_eq!(
        refusal,
        Some(&outbox_nats::Refusal::NoStream),
        "{:?}",
        deliveries[0]
    );
    assert!(deliveries[1].is_none(), "k1's next event is held back");
    for delivery in &deliveries[2..] {
        assert!(
            matches!(delivery, Some(Delivery::Stored { duplicate: false })),
            "{delivery:?}"
        );
    }
    let delivered: Vec<(String, u32)> = sequenced(&nats.messages(stream).await)
        .into_iter()
        .map(|e| (e.key, e.n))
        .collect();
    assert_eq!(
        delivered,
        [("k2".into(), 0), ("k2".into(), 1), ("k2".into(), 2)]
    );
    setup.finish().await;
}

/// A replayed relay dead letter goes back to the outbox under its own event
/// id: it is delivered before the events of its key committed after the
/// replay, and JetStream drops it if it had stored it already. A discarded
/// one is gone.
async fn replayed_dead_letters_keep_their_id_and_order_and_are_stored_once(setup: Setup) {
    use outbox_core::dead_letters::{self, DeadLetterError, Selection, relay};
    type Letters = outbox_dead_letter::Entity;
    let (db, nats, stream) = (&setup.test.db, &setup.nats, &setup.stream);
    let deliver = async || {
        let relay = fast(db, nats.publisher()).max_attempts(1).build();
        while relay.process_batch().await.expect("relay").claimed > 0 {}
    };
    let key = |n| Sequenced {
        key: "k1".into(),
        n,
    };
    // The stray has no stream yet: a dead letter at its first attempt.
    emit_one(db, Stray { key: "k1".into() })
        .await
        .expect("commit");
    emit_one(db, key(0)).await.expect("commit");
    let first = outbox_message::Entity::find()
        .order_by_asc(outbox_message::Column::Id)
        .all(db)
        .await
        .expect("outbox rows")
        .pop()
        .expect("k1's first event");
    deliver().await;
    let [stray] = &dead_letters::list::<Letters>(db, &Selection::all(), 10)
        .await
        .expect("list")[..]
    else {
        panic!("one dead letter");
    };
    assert_eq!(
        dead_letters::show::<Letters>(db, stray.id)
            .await
            .expect("show"),
        *stray
    );

    // k1's first event was stored, but as if its acknowledgement had been
    // lost, it is a dead letter too.
    outbox_dead_letter::Entity::insert(outbox_dead_letter::ActiveModel::from(
        outbox_dead_letter::Model {
            id: first.id,
            event_type: first.event_type,
            event_version: first.event_version,
            exchange: first.exchange,
            subject: first.subject,
            partition_key: first.partition_key,
            payload: first.payload,
            headers: first.headers,
            content_type: first.content_type,
            created_at: first.created_at,
            attempts: 10,
            last_error: "the acknowledgement timed out".into(),
            failed_at: chrono::Utc::now(),
        },
    ))
    .exec(db)
    .await
    .expect("insert a dead letter");

    let nowhere = nats.stream("NOWHERE", "nowhere");
    provision(
        nats.publisher().context(),
        std::slice::from_ref(&nowhere),
        WINDOW,
    )
    .await
    .expect("provision the stray's stream");
    let mut replayed = relay::replay(db, &Selection::all()).await.expect("replay");
    replayed.sort();
    let mut expected = vec![stray.id, first.id];
    expected.sort();
    assert_eq!(replayed, expected);
    emit_one(db, key(1)).await.expect("commit after the replay");
    deliver().await;

    assert!(
        dead_letters::list::<Letters>(db, &Selection::all(), 10)
            .await
            .expect("list")
            .is_empty()
    );
    let orders = nats.messages(stream).await;
    assert_each_once(&orders, 2);
    assert_eq!(
        per_key(&orders)["k1"],
        [0, 1],
        "the stored copy was dropped"
    );
    let strays = nats.messages(&nowhere.name).await;
    let [stray_message] = &strays[..] else {
        panic!("the stray is stored once");
    };
    assert_eq!(
        header(stray_message, outbox_core::headers::MSG_ID),
        stray.id.to_string()
    );
    let stored_at = |m: &StreamMessage| std::time::SystemTime::from(m.time);
    assert!(
        stored_at(stray_message) <= stored_at(&orders[1]),
        "the replayed event went out before its key's event committed after the replay"
    );

    // Discarded: gone, and an unknown id is an error naming it.
    emit_oversized(db).await;
    deliver().await;
    let discarded = dead_letters::discard::<Letters>(db, &Selection::all().event_type("Blob"))
        .await
        .expect("discard");
    assert_eq!(discarded.len(), 1);
    let gone = dead_letters::show::<Letters>(db, discarded[0]).await;
    assert!(
        matches!(gone, Err(DeadLetterError::NotFound(id)) if id == discarded[0]),
        "{gone:?}"
    );
    let error = relay::replay(db, &Selection::id(discarded[0]))
        .await
        .expect_err("unknown id");
    assert!(
        error.to_string().contains(&discarded[0].to_string()),
        "{error}"
    );
    setup.finish().await;
}

outbox_tests::on_postgres_and_mysql!(
    replayed_dead_letters_keep_their_id_and_order_and_are_stored_once,
    poison_events_are_dead_lettered_and_the_rest_delivered,
);
