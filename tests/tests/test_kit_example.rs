//! The README's test-kit example, verbatim: a service's test with SQLite in
//! memory and no broker.

use std::time::Duration;

use outbox_core::inbox::{Metadata, Processed};
use outbox_core::relay::{Delivery, Relay};
use outbox_core::testing::{MemoryPublisher, TestConsumer, emitted, relayed};
use outbox_core::{OutboxEvent, emit, transactional};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "shop", routing_key = "order.{order_id}.placed", key = order_id)]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
}

/// The service code under test.
#[transactional]
async fn place_order(
    db: &DatabaseConnection,
    order_id: i64,
    total_cents: i64,
) -> Result<(), outbox_core::Error> {
    db.execute_unprepared(&format!(
        "INSERT INTO orders VALUES ({order_id}, {total_cents})"
    ))
    .await?;
    emit!(OrderPlaced {
        order_id,
        total_cents
    });
    Ok(())
}

/// A consumer's handler under test.
async fn record_invoice(
    event: OrderPlaced,
    _: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), DbErr> {
    let sql = format!(
        "INSERT INTO invoices VALUES ({}, {})",
        event.order_id, event.total_cents
    );
    db.execute_unprepared(&sql).await.map(drop)
}

#[tokio::test]
async fn placing_an_order_emits_order_placed_and_bills_it_once()
-> Result<(), Box<dyn std::error::Error>> {
    // One connection: an in-memory SQLite database lives in its connection.
    let db = Database::connect(
        ConnectOptions::new("sqlite::memory:")
            .max_connections(1)
            .to_owned(),
    )
    .await?;
    outbox_core::migrate(&db).await?;
    db.execute_unprepared("CREATE TABLE orders (id BIGINT PRIMARY KEY, total_cents BIGINT)")
        .await?;
    db.execute_unprepared("CREATE TABLE invoices (order_id BIGINT PRIMARY KEY, cents BIGINT)")
        .await?;

    // The write path: exactly these events committed, with their orders.
    place_order(&db, 7, 1_250).await?;
    place_order(&db, 13, 990).await?;
    let placed = |order_id, total_cents| OrderPlaced {
        order_id,
        total_cents,
    };
    assert_eq!(
        emitted::<OrderPlaced>(&db).await?,
        [placed(7, 1_250), placed(13, 990)]
    );

    // The relay, against a publisher that keeps what it gets and rejects key "13".
    let rejects_13 = |event: &outbox_core::entity::outbox_message::Model| {
        event.partition_key.as_deref() == Some("13")
    };
    let publisher = MemoryPublisher::new().answer(rejects_13, Delivery::Rejected("full".into()));
    let relay = Relay::builder(db.clone(), publisher.clone())
        .max_attempts(1)
        .spawn();
    relayed(&db, Duration::from_secs(5)).await?; // bounded: Error::NotRelayed on timeout
    relay.shutdown().await?;
    assert_eq!(publisher.published().len(), 1, "13 was dead-lettered");

    // A consumer's handler, through the inbox: the same event id twice is handled once.
    let billing = TestConsumer::new(db.clone(), "billing").on::<OrderPlaced, _>(record_invoice)?;
    let id = uuid::Uuid::now_v7();
    assert_eq!(
        billing.deliver(id, &placed(7, 1_250)).await?,
        Processed::Handled
    );
    assert_eq!(
        billing.deliver(id, &placed(7, 1_250)).await?,
        Processed::Duplicate
    );
    Ok(())
}
