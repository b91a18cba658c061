//! Two services and three handlers, each effect once per event:
//!
//! 1. the orders service places an order and emits `OrderCreated` in one
//!    `#[transactional]` call;
//! 2. the inventory consumer reserves stock and emits `StockReserved`, in the
//!    transaction that records the event in its inbox;
//! 3. the orders service's own consumer marks the order reserved.
//!
//! One relay carries both services' events to JetStream. Run with
//! `cargo run --example order_flow` against PostgreSQL (`DATABASE_URL`,
//! default `postgres://root@127.0.0.1/test`; a schema of its own, dropped at
//! the end) and NATS (`NATS_URL`, default `127.0.0.1:4222`; streams under a
//! namespace of their own, deleted at the end).

use outbox_core::uuid;
use outbox_nats::async_nats;
use std::time::{Duration, Instant};

use outbox_core::inbox::Metadata;
use outbox_core::relay::Relay;
use outbox_core::{OutboxEvent, emit, transactional};
use outbox_nats::Namespace;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    Statement,
};

#[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
struct OrderCreated {
    order_id: i64,
    sku: String,
    quantity: i32,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "inventory", routing_key = "stock.{sku}.reserved", key = order_id)]
struct StockReserved {
    order_id: i64,
    sku: String,
    quantity: i32,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Outbox(#[from] outbox_core::Error),
    #[error("not enough `{0}` in stock")]
    OutOfStock(String),
}

impl From<DbErr> for AppError {
    fn from(error: DbErr) -> Self {
        Self::Outbox(error.into())
    }
}

/// The orders service: the order and its event commit together.
#[transactional]
async fn place_order(
    db: &DatabaseConnection,
    order_id: i64,
    sku: &str,
    quantity: i32,
) -> Result<(), AppError> {
    execute(
        db,
        "INSERT INTO orders (id, sku, quantity, status) VALUES ($1, $2, $3, 'placed')",
        [order_id.into(), sku.into(), quantity.into()],
    )
    .await?;
    emit!(OrderCreated {
        order_id,
        sku: sku.to_owned(),
        quantity
    });
    println!("orders     | placed order {order_id}: {quantity} x {sku}; emitted OrderCreated");
    Ok(())
}

/// The inventory service's handler: runs in the inbox's transaction, so the
/// reservation, its event and the inbox row commit together, once per event.
#[transactional]
async fn reserve_stock(
    event: OrderCreated,
    meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    let reserved = execute(
        db,
        "UPDATE stock SET available = available - $1 WHERE sku = $2 AND available >= $1",
        [event.quantity.into(), event.sku.as_str().into()],
    )
    .await?;
    if reserved == 0 {
        return Err(AppError::OutOfStock(event.sku));
    }
    emit!(StockReserved {
        order_id: event.order_id,
        sku: event.sku.clone(),
        quantity: event.quantity
    });
    println!(
        "inventory  | {} on {} (delivery {}): reserved {} x {}; emitted StockReserved",
        meta.event_type, meta.subject, meta.delivery_count, event.quantity, event.sku
    );
    Ok(())
}

/// The orders service's consumer of inventory events.
async fn mark_reserved(
    event: StockReserved,
    meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), DbErr> {
    execute(
        db,
        "UPDATE orders SET status = 'reserved' WHERE id = $1",
        [event.order_id.into()],
    )
    .await?;
    println!(
        "orders     | {} for order {}: status = reserved",
        meta.event_type, event.order_id
    );
    Ok(())
}

async fn execute<const N: usize>(
    db: &impl ConnectionTrait,
    sql: &str,
    values: [sea_orm::Value; N],
) -> Result<u64, DbErr> {
    let statement = Statement::from_sql_and_values(db.get_database_backend(), sql, values);
    Ok(db.execute_raw(statement).await?.rows_affected())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1/test".to_owned());
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
    let run = format!("order_flow_{}", uuid::Uuid::now_v7().simple());

    let admin = Database::connect(&url)
        .await
        .map_err(|e| format!("PostgreSQL at {url} is required: {e}"))?;
    admin
        .execute_unprepared(&format!("CREATE SCHEMA {run}"))
        .await?;
    let mut options = ConnectOptions::new(url);
    options
        .set_schema_search_path(run.clone())
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    let client = async_nats::connect(&nats_url)
        .await
        .map_err(|e| format!("NATS at {nats_url} is required: {e}"))?;

    // The namespace, said once: the publisher, the streams and the consumers follow it.
    let nats = Namespace::new(client, run.clone());
    let outcome = flow(&db, &nats).await;

    for stream in nats.streams_from_registry()? {
        let _ = nats.context().delete_stream(&stream.name).await;
    }
    db.close().await?;
    admin
        .execute_unprepared(&format!("DROP SCHEMA {run} CASCADE"))
        .await?;
    outcome
}

async fn flow(db: &DatabaseConnection, nats: &Namespace) -> Result<(), Box<dyn std::error::Error>> {
    outbox_core::migrate(db).await?;
    db.execute_unprepared(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, sku TEXT NOT NULL, quantity INT NOT NULL, status TEXT NOT NULL);
         CREATE TABLE stock (sku TEXT PRIMARY KEY, available INT NOT NULL);
         INSERT INTO stock VALUES ('widget', 10), ('gadget', 3);",
    )
    .await?;

    let relay = Relay::builder(db.clone(), nats.publisher()).build();
    let window = relay.config().retry_horizon().max(Duration::from_secs(120));
    nats.provision_registry(window).await?;
    let relay = relay.spawn();
    let inventory = (nats.consumer(db.clone(), "inventory"))
        .on::<OrderCreated, _>(reserve_stock)
        .spawn()
        .await?;
    let order_status = (nats.consumer(db.clone(), "order-status"))
        .on::<StockReserved, _>(mark_reserved)
        .spawn()
        .await?;

    let started = Instant::now();
    for (order_id, sku, quantity) in [(1, "widget", 2), (2, "gadget", 1), (3, "widget", 5)] {
        place_order(db, order_id, sku, quantity).await?;
    }
    let reserved = loop {
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM orders WHERE status = 'reserved'",
            ))
            .await?
            .ok_or("no count")?;
        let reserved: i64 = row.try_get("", "n")?;
        if reserved == 3 || started.elapsed() > Duration::from_secs(30) {
            break reserved;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    inventory.shutdown().await?;
    order_status.shutdown().await?;
    relay.shutdown().await?;
    if reserved != 3 {
        return Err(format!("only {reserved} of 3 orders were reserved within 30 s").into());
    }
    println!(
        "done       | 3 orders placed, reserved and confirmed in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}
