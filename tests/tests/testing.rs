//! The test kit (`outbox_core::testing`) on each database, the way a
//! service's own tests would use it: no NATS anywhere in this file.

use std::time::Duration;

use outbox_core::entity::outbox_dead_letter;
use outbox_core::inbox::{DeadLetterReason, Metadata, Processed};
use outbox_core::relay::{Delivery, Relay};
use outbox_core::testing::{
    MemoryPublisher, TestConsumer, TestDatabase, emitted, emitted_in_full, relayed,
};
use outbox_core::{Error, emit, transactional};
use outbox_tests::Backend;
use outbox_tests::fixtures::{AppError, OrderCreated, Sequenced, order};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection, DatabaseTransaction};
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait, Statement};

/// The service code under test: an order and its event, or neither.
#[transactional]
async fn place_order(db: &DatabaseConnection, id: i64, total_cents: i64) -> Result<(), AppError> {
    if total_cents < 0 {
        return Err(AppError::Rejected);
    }
    order::ActiveModel {
        id: Set(id),
        total_cents: Set(total_cents),
    }
    .insert(db)
    .await?;
    emit!(OrderCreated {
        order_id: id,
        total_cents
    });
    Ok(())
}

/// An order with a tenant header, and a reminder for an hour later.
#[transactional]
async fn place_with_reminder(
    db: &DatabaseConnection,
    id: i64,
) -> Result<(uuid::Uuid, uuid::Uuid), AppError> {
    let placed = emit!(
        OrderCreated {
            order_id: id,
            total_cents: 1
        },
        headers = [("Tenant-Id", "acme")]
    );
    let reminder = emit!(
        OrderCreated {
            order_id: id,
            total_cents: 0
        },
        after = Duration::from_secs(3600)
    );
    Ok((placed, reminder))
}

/// `emitted_in_full` shows what `emitted` leaves out: each event's id,
/// subject, key and headers, and the events scheduled for later with their
/// time; `Metadata::for_event` builds a handler's metadata in one call.
async fn the_test_kit_shows_headers_and_scheduled_events(db: &DatabaseConnection) {
    let (placed, reminder) = place_with_reminder(db, 7).await.expect("placed");
    let all = emitted_in_full::<OrderCreated>(db).await.expect("outbox");
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].id, all[1].id), (placed, reminder));
    assert_eq!(all[0].subject, "orders.order.7.created");
    assert_eq!(all[0].key.as_deref(), Some("7"));
    assert_eq!(
        all[0].headers.get("Tenant-Id").map(String::as_str),
        Some("acme")
    );
    assert_eq!(all[0].deliver_at, None);
    let due = all[1].deliver_at.expect("scheduled");
    assert!(
        due > chrono::Utc::now() + chrono::Duration::minutes(59),
        "{due}"
    );
    assert_eq!(
        emitted::<OrderCreated>(db).await.expect("outbox").len(),
        1,
        "emitted: the outbox only"
    );

    let event = &all[0].event;
    let meta = Metadata::for_event(event).expect("valid subject");
    assert_eq!(
        (
            meta.event_type.as_str(),
            meta.version,
            meta.subject.as_str()
        ),
        ("OrderCreated", 1, "orders.order.7.created")
    );
    assert_eq!((meta.key.as_deref(), meta.delivery_count), (Some("7"), 1));

    // Two handlers for one event type on one consumer: refused, not ignored.
    let twice = (TestConsumer::new(db.clone(), "twice"))
        .on::<OrderCreated, _>(record_order)
        .expect("the first")
        .on::<OrderCreated, _>(record_order);
    let error = twice.expect_err("a second handler for OrderCreated");
    assert!(
        error
            .to_string()
            .contains("two handlers for event `OrderCreated`"),
        "{error}"
    );
}

async fn placing_an_order_emitted_exactly_this_event(db: &DatabaseConnection) {
    place_order(db, 1, 100).await.expect("placed");
    assert!(place_order(db, 2, -5).await.is_err(), "rejected");
    place_order(db, 3, 300).await.expect("placed");

    let events = emitted::<OrderCreated>(db).await.expect("outbox");
    let expected = |order_id, total_cents| OrderCreated {
        order_id,
        total_cents,
    };
    assert_eq!(events, [expected(1, 100), expected(3, 300)]);
    assert!(
        emitted::<Sequenced>(db).await.expect("outbox").is_empty(),
        "no event of another type"
    );
}

async fn the_memory_publisher_records_and_rejects_what_it_is_told_to(db: &DatabaseConnection) {
    for id in 1..=3 {
        place_order(db, id, id * 100).await.expect("placed");
    }
    let publisher = MemoryPublisher::new().answer(
        |event| event.partition_key.as_deref() == Some("2"),
        Delivery::Rejected("no room".into()),
    );
    let relay = Relay::builder(db.clone(), publisher.clone())
        .max_attempts(1)
        .build();
    relay.drain().await.expect("drained");

    let keys: Vec<_> = (publisher.published().into_iter())
        .map(|event| event.partition_key)
        .collect();
    assert_eq!(keys, [Some("1".to_owned()), Some("3".to_owned())]);
    let letters = outbox_dead_letter::Entity::find()
        .all(db)
        .await
        .expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].partition_key.as_deref(), Some("2"));
    assert_eq!(letters[0].last_error, "no room");
    assert!(
        emitted::<OrderCreated>(db)
            .await
            .expect("outbox")
            .is_empty()
    );
}

async fn relayed_waits_for_the_relay_and_fails_without_one(db: &DatabaseConnection) {
    place_order(db, 1, 100).await.expect("placed");
    let waited = relayed(db, Duration::from_millis(100)).await;
    assert!(
        matches!(&waited, Err(Error::NotRelayed(late)) if late.pending == 1),
        "{waited:?}"
    );

    let publisher = MemoryPublisher::new();
    let relay = Relay::builder(db.clone(), publisher.clone())
        .poll_interval(Duration::from_millis(10))
        .spawn();
    relayed(db, Duration::from_secs(10)).await.expect("relayed");
    assert_eq!(publisher.published().len(), 1);
    relay.shutdown().await.expect("stopped");
}

/// Inserts the order; rejects a negative total.
async fn record_order(
    event: OrderCreated,
    _: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    if event.total_cents < 0 {
        return Err(AppError::Rejected);
    }
    let row = order::ActiveModel {
        id: Set(event.order_id),
        total_cents: Set(event.total_cents),
    };
    row.insert(db).await?;
    Ok(())
}

async fn a_test_consumer_handles_each_event_once_without_a_broker(db: &DatabaseConnection) {
    let billing = (TestConsumer::new(db.clone(), "billing"))
        .on::<OrderCreated, _>(record_order)
        .expect("one handler");
    let order = |order_id, total_cents| OrderCreated {
        order_id,
        total_cents,
    };
    let (first, bad) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let deliver = async |id, event| billing.deliver(id, &event).await.expect("delivered");
    assert_eq!(deliver(first, order(1, 100)).await, Processed::Handled);
    assert_eq!(deliver(first, order(1, 100)).await, Processed::Duplicate);
    assert!(matches!(
        deliver(bad, order(2, -1)).await,
        Processed::Failed(_)
    ));
    let stranger = Metadata::new(uuid::Uuid::now_v7(), "Mystery", 1, "orders.mystery");
    let answer = billing.deliver_raw(stranger, b"{}").await;
    assert!(
        matches!(&answer, Processed::Unhandled(unhandled) if unhandled.reason() == DeadLetterReason::UnknownType),
        "{answer:?}"
    );
    assert_eq!(order::Entity::find().count(db).await.expect("orders"), 1);
}

/// A handler's error wrapping a database error, as a service writes it.
#[derive(Debug)]
struct ReserveFailed(outbox_core::Error);

impl std::fmt::Display for ReserveFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot reserve stock")
    }
}

impl std::error::Error for ReserveFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Reads a table that does not exist.
async fn reserve_from_nowhere(
    _: OrderCreated,
    _: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), ReserveFailed> {
    let statement =
        Statement::from_string(db.get_database_backend(), "SELECT * FROM no_such_table");
    (db.query_all_raw(statement).await).map_err(|error| ReserveFailed(error.into()))?;
    Ok(())
}

/// The text a failed handler leaves (in logs and dead letters; what
/// `ErrorReport` makes of `Processed::Failed`) holds its whole chain, down
/// to the database's words:
/// `outbox_core::Error` returned as it is, and wrapped in the service's own.
async fn a_failed_handler_keeps_the_database_error_it_failed_with(db: &DatabaseConnection) {
    let order = OrderCreated {
        order_id: 1,
        total_cents: 1,
    };
    let wrapped = (TestConsumer::new(db.clone(), "wrapped"))
        .on::<OrderCreated, _>(reserve_from_nowhere)
        .expect("one handler");
    let bare = (TestConsumer::new(db.clone(), "bare"))
        .on::<OrderCreated, _>(
            async |event, meta, db: &DatabaseTransaction| -> outbox_core::Result<()> {
                reserve_from_nowhere(event, meta, db)
                    .await
                    .map_err(|error| error.0)
            },
        )
        .expect("one handler");
    for (consumer, starts) in [
        (wrapped, "cannot reserve stock: database error: "),
        (bare, "database error: "),
    ] {
        let answer = consumer.deliver(uuid::Uuid::now_v7(), &order).await;
        let Ok(Processed::Failed(failure)) = answer else {
            panic!("the handler failed: {answer:?}");
        };
        let text = outbox_core::ErrorReport(&failure).to_string();
        assert!(
            text.starts_with(starts) && text.contains("no_such_table"),
            "{text}"
        );
    }
}

outbox_tests::on_each_backend!(
    the_test_kit_shows_headers_and_scheduled_events,
    a_failed_handler_keeps_the_database_error_it_failed_with,
    placing_an_order_emitted_exactly_this_event,
    the_memory_publisher_records_and_rejects_what_it_is_told_to,
    relayed_waits_for_the_relay_and_fails_without_one,
    a_test_consumer_handles_each_event_once_without_a_broker,
);

/// Whether the test database `name` (a schema, a database, or a file)
/// still exists on `backend`.
async fn still_there(backend: Backend, name: &str) -> bool {
    let admin = match backend {
        Backend::Postgres => outbox_tests::postgres_url(),
        Backend::MySql => outbox_tests::mysql_url(),
        Backend::Sqlite => return std::env::temp_dir().join(format!("{name}.sqlite")).exists(),
    };
    let admin = sea_orm::Database::connect(admin).await.expect("the server");
    let sql = "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = ";
    let statement = Statement::from_string(admin.get_database_backend(), format!("{sql}'{name}'"));
    let row = admin
        .query_one_raw(statement)
        .await
        .expect("ask the catalogue");
    let count: i64 = row.expect("a row").try_get_by_index(0).expect("a count");
    count > 0
}

/// `TestDatabase`: a fresh, migrated database per test, gone after
/// `finish`, and gone too when a failing test drops it unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_database_is_fresh_migrated_and_dropped_after() {
    for backend in Backend::ALL {
        let server = match backend {
            Backend::Postgres => outbox_tests::postgres_url(),
            Backend::MySql => outbox_tests::mysql_url(),
            Backend::Sqlite => "sqlite::memory:".to_owned(),
        };
        let finished = TestDatabase::new(&server).await.expect("a test database");
        let dropped = TestDatabase::new(&server).await.expect("a second");
        assert_ne!(finished.name(), dropped.name(), "{backend:?}: one per test");
        outbox_core::check_schema(finished.db())
            .await
            .expect("migrated");
        place_order(finished.db(), 1, 5)
            .await
            .expect_err("no orders table: only the outbox's");
        let names = [finished.name().to_owned(), dropped.name().to_owned()];
        for name in &names {
            assert!(still_there(backend, name).await, "{backend:?} {name}");
        }
        finished.finish().await.expect("dropped");
        drop(dropped); // as a panicking test would
        for name in &names {
            assert!(
                !still_there(backend, name).await,
                "{backend:?}: {name} is gone"
            );
        }
    }
}
