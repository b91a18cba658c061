//! The inbox without a broker: batches straight through
//! `Handlers::process_batch` (savepoints, a failing handler, a database that
//! fails mid-batch) and the inbox's rows, on each backend.

use chrono::Utc;
use outbox_core::OutboxEvent;
use outbox_core::inbox::{self, Handler, Metadata};
use outbox_tests::consumers::{InsertOrder, inbox_rows, orders};
use outbox_tests::fixtures::{AppError, OrderCreated, order};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait, PaginatorTrait,
    TransactionTrait,
};

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
