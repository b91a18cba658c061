//! The quickstart: a `#[transactional]` handler writes an order and its
//! `OrderCreated` event in one SQLite transaction; a rejected order leaves
//! neither. Prints what the outbox holds for the relay to deliver.
//!
//! Run with `cargo run --example quickstart`.

use outbox_core::entity::outbox_message;
use outbox_core::{OutboxEvent, emit, transactional};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, EntityTrait, QueryOrder,
    Statement,
};

#[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "orders", routing_key = "order.{order_id}.created", key = order_id)]
struct OrderCreated {
    order_id: i64,
    total_cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum PlaceOrderError {
    #[error(transparent)]
    Outbox(#[from] outbox_core::Error),
    #[error("an order must cost something")]
    EmptyOrder,
}

impl From<DbErr> for PlaceOrderError {
    fn from(error: DbErr) -> Self {
        Self::Outbox(error.into())
    }
}

/// Inserts the order and records its event; both commit, or neither.
#[transactional]
async fn place_order(
    db: &DatabaseConnection,
    order_id: i64,
    total_cents: i64,
) -> Result<(), PlaceOrderError> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO orders (id, total_cents) VALUES (?, ?)",
        [order_id.into(), total_cents.into()],
    ))
    .await?;
    emit!(OrderCreated {
        order_id,
        total_cents
    });
    if total_cents <= 0 {
        return Err(PlaceOrderError::EmptyOrder); // rolls back the order and its event
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One connection: every connection to `sqlite::memory:` is a database of its own.
    let mut options = ConnectOptions::new("sqlite::memory:");
    options.max_connections(1).sqlx_logging(false);
    let db = Database::connect(options).await?;
    outbox_core::migrate(&db).await?;
    db.execute_unprepared(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, total_cents BIGINT NOT NULL)",
    )
    .await?;

    for (order_id, total_cents) in [(1, 1250), (2, 0), (3, 990)] {
        match place_order(&db, order_id, total_cents).await {
            Ok(()) => println!("order {order_id}: committed with its event"),
            Err(error) => println!("order {order_id}: rolled back ({error}), no event"),
        }
    }

    println!("\noutbox, waiting for the relay:");
    let rows = outbox_message::Entity::find()
        .order_by_asc(outbox_message::Column::Id)
        .all(&db)
        .await?;
    for row in &rows {
        println!(
            "  {} {} v{} -> {} key={} {}",
            row.id,
            row.event_type,
            row.event_version,
            row.subject,
            row.partition_key.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(&row.payload),
        );
    }
    println!("{} events", rows.len());
    Ok(())
}
