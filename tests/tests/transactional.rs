//! `#[transactional]` and `emit!` against real PostgreSQL (a schema per test) and SQLite (a file per test).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use outbox_core::entity::{inbox_message, outbox_message, outbox_scheduled};
use outbox_core::{OutboxEvent, emit, inbox, transactional};
use outbox_tests::fixtures::{AppError, OrderCreated, order};
use outbox_tests::on_each_backend;
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryOrder,
    TransactionTrait,
};
use serde::{Deserialize, Serialize};

on_each_backend!(
    ok_commits_the_row_and_its_event,
    err_commits_nothing,
    question_mark_commits_nothing,
    panic_commits_nothing,
    cancelled_call_commits_nothing,
    nested_err_rolls_back_only_the_inner_part,
    nested_events_commit_with_the_outer_transaction,
    thousand_events_keep_emit_order,
    large_batches_span_several_statements,
    parallel_handlers_write_one_event_each,
    unserializable_payload_commits_nothing,
    invalid_subject_value_commits_nothing,
    a_partition_key_with_a_line_break_commits_nothing,
    methods_name_their_connection,
    times_keep_their_microseconds,
);

/// Joins a caller's transaction when called with one: generic over the connection.
#[transactional]
async fn place_order<C: TransactionTrait>(
    db: &C,
    id: i64,
    total_cents: i64,
) -> Result<i64, AppError> {
    insert_order(db, id, total_cents).await?;
    emit!(OrderCreated {
        order_id: id,
        total_cents
    });
    if total_cents < 0 {
        return Err(AppError::Rejected);
    }
    if total_cents == 13 {
        panic!("handler panicked after its writes");
    }
    Ok(id)
}

/// The handlers' business write: it joins whatever connection it is given.
async fn insert_order(
    db: &impl ConnectionTrait,
    id: i64,
    total_cents: i64,
) -> Result<(), AppError> {
    order::ActiveModel {
        id: Set(id),
        total_cents: Set(total_cents),
    }
    .insert(db)
    .await?;
    Ok(())
}

fn positive(total_cents: i64) -> Result<(), AppError> {
    if total_cents > 0 {
        Ok(())
    } else {
        Err(AppError::Rejected)
    }
}

#[transactional]
async fn place_checked(db: &DatabaseConnection, id: i64, total_cents: i64) -> Result<(), AppError> {
    insert_order(db, id, total_cents).await?;
    emit!(OrderCreated {
        order_id: id,
        total_cents
    });
    positive(total_cents)?;
    Ok(())
}

async fn orders(db: &DatabaseConnection) -> Vec<i64> {
    let rows = order::Entity::find()
        .order_by_asc(order::Column::Id)
        .all(db)
        .await
        .expect("read orders");
    rows.into_iter().map(|o| o.id).collect()
}

async fn events(db: &DatabaseConnection) -> Vec<outbox_message::Model> {
    outbox_message::Entity::find()
        .order_by_asc(outbox_message::Column::Id)
        .all(db)
        .await
        .expect("read outbox")
}

async fn event_order_ids(db: &DatabaseConnection) -> Vec<i64> {
    events(db)
        .await
        .iter()
        .map(|e| {
            serde_json::from_slice::<OrderCreated>(&e.payload)
                .expect("OrderCreated payload")
                .order_id
        })
        .collect()
}

async fn ok_commits_the_row_and_its_event(db: &DatabaseConnection) {
    assert_eq!(place_order(db, 7, 1250).await.ok(), Some(7));
    assert_eq!(orders(db).await, [7]);
    let events = events(db).await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.id.get_version_num(), 7, "event ids are UUIDv7");
    assert_eq!(event.event_type, "OrderCreated");
    assert_eq!(event.event_version, 1);
    assert_eq!(event.exchange, "orders");
    assert_eq!(event.subject, "orders.order.7.created");
    assert_eq!(event.partition_key.as_deref(), Some("7"));
    assert_eq!(event.content_type, "application/json");
    assert_eq!(event.attempts, 0);
    assert_eq!(event.next_attempt_at, event.created_at);
    assert_eq!(event.last_error, None);
    let payload: OrderCreated = serde_json::from_slice(&event.payload).expect("JSON payload");
    assert_eq!(
        payload,
        OrderCreated {
            order_id: 7,
            total_cents: 1250
        }
    );
}

async fn err_commits_nothing(db: &DatabaseConnection) {
    assert!(matches!(
        place_order(db, 1, -5).await,
        Err(AppError::Rejected)
    ));
    assert_eq!(orders(db).await, [0_i64; 0]);
    assert!(events(db).await.is_empty());
}

async fn question_mark_commits_nothing(db: &DatabaseConnection) {
    assert!(matches!(
        place_checked(db, 1, 0).await,
        Err(AppError::Rejected)
    ));
    assert!(orders(db).await.is_empty());
    assert!(events(db).await.is_empty());
    place_checked(db, 2, 5)
        .await
        .expect("a valid order commits");
    assert_eq!(orders(db).await, [2]);
}

async fn panic_commits_nothing(db: &DatabaseConnection) {
    let task = tokio::spawn({
        let db = db.clone();
        async move { place_order(&db, 1, 13).await }
    });
    let joined = task.await;
    assert!(joined.is_err_and(|e| e.is_panic()), "the handler panics");
    assert!(orders(db).await.is_empty());
    assert!(events(db).await.is_empty());
}

#[transactional]
async fn slow_order(db: &DatabaseConnection, id: i64) -> Result<(), AppError> {
    insert_order(db, id, 1).await?;
    emit!(OrderCreated {
        order_id: id,
        total_cents: 1
    });
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

async fn cancelled_call_commits_nothing(db: &DatabaseConnection) {
    let outcome = tokio::time::timeout(Duration::from_millis(200), slow_order(db, 1)).await;
    assert!(
        outcome.is_err(),
        "the call is cancelled while its transaction is open"
    );
    assert!(orders(db).await.is_empty());
    assert!(events(db).await.is_empty());
    // The connection went back to the pool rolled back: the same id can be used again.
    place_order(db, 1, 10).await.expect("later call commits");
    assert_eq!(orders(db).await, [1]);
}

#[transactional]
async fn outer(
    db: &DatabaseConnection,
    inner_total: i64,
    fail_after: bool,
) -> Result<(), AppError> {
    place_order(db, 1, 10).await?;
    let inner = place_order(db, 2, inner_total).await;
    assert_eq!(inner.is_err(), inner_total < 0);
    place_order(db, 3, 30).await?;
    if fail_after {
        return Err(AppError::Rejected);
    }
    Ok(())
}

async fn nested_err_rolls_back_only_the_inner_part(db: &DatabaseConnection) {
    outer(db, -1, false).await.expect("outer commits");
    assert_eq!(orders(db).await, [1, 3]);
    assert_eq!(event_order_ids(db).await, [1, 3]);
}

async fn nested_events_commit_with_the_outer_transaction(db: &DatabaseConnection) {
    assert!(outer(db, 20, true).await.is_err());
    assert!(
        orders(db).await.is_empty(),
        "the outer Err undoes the inner Ok"
    );
    assert!(events(db).await.is_empty());
    outer(db, 20, false).await.expect("outer commits");
    assert_eq!(orders(db).await, [1, 2, 3]);
    assert_eq!(event_order_ids(db).await, [1, 2, 3]);
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "numbered")]
struct Numbered {
    n: u32,
}

#[transactional]
async fn emit_many(db: &DatabaseConnection, count: u32) -> Result<(), AppError> {
    for n in 0..count {
        emit!(Numbered { n });
    }
    Ok(())
}

async fn persisted_sequence(db: &DatabaseConnection, count: u32) {
    emit_many(db, count).await.expect("commit");
    let numbers: Vec<u32> = events(db)
        .await
        .iter()
        .map(|e| {
            serde_json::from_slice::<Numbered>(&e.payload)
                .expect("payload")
                .n
        })
        .collect();
    assert_eq!(
        numbers,
        (0..count).collect::<Vec<_>>(),
        "ids sort in emit order"
    );
}

async fn thousand_events_keep_emit_order(db: &DatabaseConnection) {
    persisted_sequence(db, 1_000).await;
}

/// More events than one INSERT takes (2,340 of 14 columns) are split, still in order.
async fn large_batches_span_several_statements(db: &DatabaseConnection) {
    persisted_sequence(db, 6_001).await;
}

async fn parallel_handlers_write_one_event_each(db: &DatabaseConnection) {
    let tasks: Vec<_> = (0..100)
        .map(|id| {
            let db = db.clone();
            tokio::spawn(async move { place_order(&db, id, 100 + id).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("no panic").expect("commit");
    }
    let mut ids = event_order_ids(db).await;
    ids.sort_unstable();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    assert_eq!(orders(db).await.len(), 100);
}

/// JSON cannot have tuple map keys, so serializing this event fails.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "audit")]
struct Audit {
    by_pair: BTreeMap<(i32, i32), i32>,
}

#[transactional]
async fn audited_order(db: &DatabaseConnection, id: i64) -> Result<(), AppError> {
    place_order(db, id, 10).await?;
    emit!(Audit {
        by_pair: BTreeMap::from([((1, 2), 3)])
    });
    Ok(())
}

async fn unserializable_payload_commits_nothing(db: &DatabaseConnection) {
    let error = audited_order(db, 1).await.expect_err("serialization fails");
    assert!(
        matches!(
            &error,
            AppError::Outbox(outbox_core::Error::Serialize {
                event_type: "Audit",
                ..
            })
        ),
        "{error:?}"
    );
    assert!(orders(db).await.is_empty());
    assert!(events(db).await.is_empty());
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(
    exchange = "orders",
    routing_key = "order.{order_id}.shipped.{carrier}"
)]
struct OrderShipped {
    order_id: i64,
    carrier: String,
}

#[transactional]
async fn ship(db: &DatabaseConnection, carrier: &str) -> Result<(), AppError> {
    place_order(db, 1, 10).await?;
    emit!(OrderShipped {
        order_id: 1,
        carrier: carrier.to_owned()
    });
    Ok(())
}

async fn invalid_subject_value_commits_nothing(db: &DatabaseConnection) {
    let error = ship(db, "ups.ground").await.expect_err("'.' in a token");
    let text = match error {
        AppError::Outbox(e @ outbox_core::Error::Subject { .. }) => e.to_string(),
        other => panic!("expected a subject error, got {other:?}"),
    };
    assert!(
        text.contains("{carrier}") && text.contains("ups.ground"),
        "{text}"
    );
    assert!(events(db).await.is_empty());
    ship(db, "ups").await.expect("a valid carrier commits");
    assert_eq!(events(db).await[1].subject, "orders.order.1.shipped.ups");
}

/// Keyed by free text that its subject does not carry.
#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.noted", key = note)]
struct OrderNoted {
    note: String,
}

#[transactional]
async fn note(db: &DatabaseConnection, note: &str) -> Result<(), AppError> {
    place_order(db, 1, 10).await?;
    emit!(OrderNoted {
        note: note.to_owned()
    });
    Ok(())
}

async fn a_partition_key_with_a_line_break_commits_nothing(db: &DatabaseConnection) {
    let error = note(db, "gift\nwrap")
        .await
        .expect_err("a line break in the key");
    let text = match error {
        AppError::Outbox(e @ outbox_core::Error::PartitionKey { .. }) => e.to_string(),
        other => panic!("expected a partition key error, got {other:?}"),
    };
    assert!(
        text.contains("OrderNoted") && text.contains("gift\\nwrap"),
        "{text}"
    );
    assert!(orders(db).await.is_empty());
    assert!(events(db).await.is_empty());
    note(db, "gift wrap")
        .await
        .expect("a key without line breaks commits");
    let keys: Vec<Option<String>> = (events(db).await.into_iter())
        .filter(|e| e.event_type == "OrderNoted")
        .map(|e| e.partition_key)
        .collect();
    assert_eq!(keys, [Some("gift wrap".to_owned())]);
}

struct OrderService {
    db: DatabaseConnection,
}

impl OrderService {
    /// The connection lives in `self`: name it, and the body's `self.db` is the transaction.
    #[transactional(conn = self.db)]
    async fn place(&self, id: i64) -> Result<usize, AppError> {
        place_order(&self.db, id, 1).await?;
        place_order(&self.db, id + 1, -1)
            .await
            .expect_err("inner rejects");
        Ok(order::Entity::find().count(&self.db).await? as usize)
    }
}

async fn methods_name_their_connection(db: &DatabaseConnection) {
    let service = OrderService { db: db.clone() };
    assert_eq!(
        service.place(5).await.ok(),
        Some(1),
        "the body sees its own uncommitted row"
    );
    assert_eq!(orders(db).await, [5]);
}

#[test]
fn every_event_type_of_this_program_is_registered() {
    let registry = outbox_core::registry();
    registry
        .validate()
        .expect("no conflicts among the test events");
    let created = registry
        .get("OrderCreated", 1)
        .expect("OrderCreated is registered");
    assert!(
        created.rust_type.ends_with("::OrderCreated"),
        "{}",
        created.rust_type
    );
    assert_eq!(created.stream, "ORDERS");
    assert_eq!(created.subject_pattern(), "orders.order.{order_id}.created");
    let decoded = (created.decode)(br#"{"order_id":3,"total_cents":4}"#).expect("decodes");
    assert_eq!(
        decoded.downcast_ref::<OrderCreated>(),
        Some(&OrderCreated {
            order_id: 3,
            total_cents: 4
        })
    );
    let names: Vec<_> = registry.iter().map(|d| d.name).collect();
    for name in [
        "Audit",
        "Numbered",
        "OrderCreated",
        "OrderShipped",
        "Sequenced",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

/// Emits one event now and one an hour from now.
#[transactional]
async fn emit_now_and_later(db: &DatabaseConnection) -> Result<(), AppError> {
    emit!(OrderCreated {
        order_id: 1,
        total_cents: 10,
    });
    emit!(
        OrderCreated {
            order_id: 2,
            total_cents: 10,
        },
        after = Duration::from_secs(3600)
    );
    Ok(())
}

/// The times the framework stores lie between instants read before and
/// after the call that stored them, to the microsecond: an event's
/// `created_at` and `next_attempt_at`, a scheduled event's `created_at`, an
/// inbox row's `processed_at`. (MySQL's `TIMESTAMP` had whole seconds, which
/// made an event due up to half a second after its commit where the server
/// rounds; without migration 000005 the test fails on MariaDB, which
/// truncates.)
async fn times_keep_their_microseconds(db: &DatabaseConnection) {
    let within = |before: DateTime<Utc>, after: DateTime<Utc>, at: DateTime<Utc>, what: &str| {
        assert!(
            before.trunc_subsecs(6) <= at && at <= after,
            "{what} {at} is outside {before} ..= {after}"
        );
    };
    let before = Utc::now();
    emit_now_and_later(db).await.expect("commit");
    let after = Utc::now();
    let event = events(db).await.pop().expect("one event");
    within(before, after, event.created_at, "created_at");
    within(before, after, event.next_attempt_at, "next_attempt_at");
    let scheduled = outbox_scheduled::Entity::find()
        .one(db)
        .await
        .expect("read outbox_scheduled")
        .expect("one scheduled event");
    within(before, after, scheduled.created_at, "scheduled created_at");

    let before = Utc::now();
    let txn = db.begin().await.expect("begin");
    inbox::record(&txn, "billing", event.id)
        .await
        .expect("record");
    txn.commit().await.expect("commit");
    let after = Utc::now();
    let row = inbox_message::Entity::find()
        .one(db)
        .await
        .expect("read inbox")
        .expect("one inbox row");
    within(before, after, row.processed_at, "processed_at");
}
