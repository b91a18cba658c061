//! Events emitted for later (`emit!(event, at = ...)` / `after = ...`) on
//! each database: held until due, kept across relays, cancellable, and never
//! in the way of their key's events of today. Relayed through the test
//! kit's `MemoryPublisher`: what is under test is the outbox, not the broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::entity::{outbox_message, outbox_scheduled};
use outbox_core::relay::{Delivery, Publisher, Relay};
use outbox_core::testing::MemoryPublisher;
use outbox_core::{cancel, emit, transactional};
use outbox_tests::fixtures::{AppError, Sequenced};
use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
use uuid::Uuid;

#[transactional]
async fn schedule_at(
    db: &DatabaseConnection,
    key: &str,
    n: u32,
    at: DateTime<Utc>,
) -> Result<Uuid, AppError> {
    let key = key.to_owned();
    Ok(emit!(Sequenced { key, n }, at = at))
}

#[transactional]
async fn schedule_after(
    db: &DatabaseConnection,
    key: &str,
    n: u32,
    after: Duration,
) -> Result<Uuid, AppError> {
    let key = key.to_owned();
    let headers = [("Scheduled", "yes")];
    Ok(emit!(
        Sequenced { key, n },
        after = after,
        headers = headers
    ))
}

#[transactional]
async fn emit_now(db: &DatabaseConnection, key: &str, n: u32) -> Result<Uuid, AppError> {
    let key = key.to_owned();
    Ok(emit!(Sequenced { key, n }))
}

#[transactional]
async fn schedule_then_fail(db: &DatabaseConnection) -> Result<(), AppError> {
    emit!(
        Sequenced {
            key: "gone".into(),
            n: 0
        },
        after = Duration::from_secs(1)
    );
    Err(AppError::Rejected)
}

/// A [`MemoryPublisher`] that also notes the time each event reached it.
#[derive(Clone, Default)]
struct Clocked {
    inner: MemoryPublisher,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

/// An event id and when it reached the publisher.
struct Arrival {
    id: Uuid,
    at: DateTime<Utc>,
}

impl Publisher for Clocked {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        let now = Utc::now();
        let arrived = events.iter().map(|event| Arrival {
            id: event.id,
            at: now,
        });
        (self.arrivals.lock().expect("not poisoned")).extend(arrived);
        self.inner.publish(events).await
    }
}

impl Clocked {
    fn published_at(&self, id: Uuid) -> Option<DateTime<Utc>> {
        let arrivals = self.arrivals.lock().expect("not poisoned");
        arrivals
            .iter()
            .find(|arrival| arrival.id == id)
            .map(|arrival| arrival.at)
    }

    /// `(key, n)` of the stored events, in publish order.
    fn sequence(&self) -> Vec<(String, u32)> {
        (self.inner.published().iter())
            .map(|event| {
                let event: Sequenced = serde_json::from_slice(&event.payload).expect("payload");
                (event.key, event.n)
            })
            .collect()
    }
}

fn seq(items: &[(&str, u32)]) -> Vec<(String, u32)> {
    (items.iter())
        .map(|(key, n)| ((*key).to_owned(), *n))
        .collect()
}

async fn pending_scheduled(db: &DatabaseConnection) -> u64 {
    outbox_scheduled::Entity::find()
        .count(db)
        .await
        .expect("count")
}

/// Waits until `publisher` stored `id`, at most `limit`.
async fn wait_published(publisher: &Clocked, id: Uuid, limit: Duration) -> DateTime<Utc> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(at) = publisher.published_at(id) {
            return at;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not published within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delivered_not_before_its_time(db: &DatabaseConnection) {
    schedule_then_fail(db).await.expect_err("rolled back");
    assert_eq!(
        pending_scheduled(db).await,
        0,
        "a rollback schedules nothing"
    );

    let publisher = Clocked::default();
    let relay = Relay::builder(db.clone(), publisher.clone());
    let due = Utc::now() + chrono::TimeDelta::milliseconds(1_500);
    let later = schedule_at(db, "k", 1, due).await.expect("scheduled");
    let past = schedule_at(db, "p", 1, Utc::now() - chrono::TimeDelta::hours(1))
        .await
        .expect("a past time");
    let relay = relay.build();
    relay.drain().await.expect("drained");
    assert_eq!(publisher.sequence(), seq(&[("p", 1)]), "a past time is now");
    assert!(publisher.published_at(past).is_some());
    assert_eq!(pending_scheduled(db).await, 1);

    // A poll interval far longer than the test: only the due time can wake it.
    let running = Relay::builder(db.clone(), publisher.clone())
        .poll_interval(Duration::from_secs(600))
        .spawn();
    let published = wait_published(&publisher, later, Duration::from_secs(10)).await;
    running.shutdown().await.expect("relay stopped");
    assert!(published >= due, "published at {published}, due at {due}");
    assert_eq!(publisher.sequence(), seq(&[("p", 1), ("k", 1)]));
    assert_eq!(pending_scheduled(db).await, 0);
}

async fn not_lost_across_a_relay_restart(db: &DatabaseConnection) {
    let publisher = Clocked::default();
    let id = schedule_after(db, "k", 1, Duration::from_millis(1_500))
        .await
        .expect("scheduled");
    let first = Relay::builder(db.clone(), publisher.clone())
        .poll_interval(Duration::from_millis(50))
        .spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.shutdown().await.expect("first relay stopped");
    assert!(
        publisher.sequence().is_empty(),
        "not due before the restart"
    );

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let second = Relay::builder(db.clone(), publisher.clone()).spawn();
    wait_published(&publisher, id, Duration::from_secs(10)).await;
    second.shutdown().await.expect("second relay stopped");
    assert_eq!(publisher.sequence(), seq(&[("k", 1)]));
    let published = publisher.inner.published();
    assert_eq!(
        published[0].headers.as_deref(),
        Some(r#"{"Scheduled":"yes"}"#),
        "its headers wait with it"
    );
}

async fn cancelled_ones_are_never_published(db: &DatabaseConnection) {
    let after = Duration::from_millis(800);
    let cancelled = schedule_after(db, "k", 1, after).await.expect("scheduled");
    let kept = schedule_after(db, "k", 2, after).await.expect("scheduled");
    assert!(cancel(db, cancelled).await.expect("cancel"), "was pending");
    assert!(
        !cancel(db, cancelled).await.expect("cancel"),
        "already gone"
    );
    assert!(
        !cancel(db, Uuid::now_v7()).await.expect("cancel"),
        "unknown id"
    );
    let now = emit_now(db, "k", 3).await.expect("emitted");
    assert!(
        !cancel(db, now).await.expect("cancel"),
        "not a scheduled event"
    );

    tokio::time::sleep(after).await;
    let publisher = Clocked::default();
    Relay::builder(db.clone(), publisher.clone())
        .build()
        .drain()
        .await
        .expect("drained");
    assert_eq!(publisher.sequence(), seq(&[("k", 2), ("k", 3)]));
    assert!(
        !cancel(db, kept).await.expect("cancel"),
        "delivered already"
    );
}

async fn todays_events_of_the_same_key_are_not_held_back(db: &DatabaseConnection) {
    let tomorrow = Utc::now() + chrono::TimeDelta::days(1);
    schedule_at(db, "k", 1, tomorrow).await.expect("scheduled");
    schedule_after(db, "k", 2, Duration::from_millis(800))
        .await
        .expect("scheduled");
    emit_now(db, "k", 3).await.expect("emitted");
    let publisher = Clocked::default();
    let relay = Relay::builder(db.clone(), publisher.clone()).build();
    relay.drain().await.expect("drained");
    assert_eq!(
        publisher.sequence(),
        seq(&[("k", 3)]),
        "nothing holds 3 back"
    );

    // Once due, a scheduled event goes before its key's events still waiting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    emit_now(db, "k", 4).await.expect("emitted");
    relay.drain().await.expect("drained");
    assert_eq!(publisher.sequence(), seq(&[("k", 3), ("k", 2), ("k", 4)]));
    assert_eq!(pending_scheduled(db).await, 1, "tomorrow's still waits");
}

/// Answers every event as if the broker were down: what it is given stays in the outbox.
struct BrokerDown;

impl Publisher for BrokerDown {
    async fn publish(&self, events: &[&outbox_message::Model]) -> Vec<Delivery> {
        (events.iter())
            .map(|_| Delivery::Unavailable("down on purpose".into()))
            .collect()
    }
}

/// An event scheduled yesterday for now has been pending since now, not
/// since yesterday: the oldest-pending age an operator alerts on counts
/// from when an event came due.
async fn a_scheduled_event_is_pending_from_its_time(db: &DatabaseConnection) {
    schedule_after(db, "k", 1, Duration::from_millis(200))
        .await
        .expect("scheduled");
    let yesterday = Utc::now() - chrono::TimeDelta::days(1);
    outbox_scheduled::Entity::update_many()
        .col_expr(
            outbox_scheduled::Column::CreatedAt,
            sea_orm::sea_query::Expr::value(yesterday),
        )
        .exec(db)
        .await
        .expect("as if emitted yesterday");
    let scheduled = (outbox_scheduled::Entity::find().one(db).await)
        .expect("read")
        .expect("the scheduled row");
    tokio::time::sleep(Duration::from_millis(300)).await;
    emit_now(db, "other", 0).await.expect("emitted");
    let round = Relay::builder(db.clone(), BrokerDown)
        .build()
        .process_batch()
        .await;
    assert!(round.is_err(), "nothing reached the broker: {round:?}");

    let stats = outbox_core::relay::stats(db).await.expect("stats");
    assert_eq!(stats.pending, 2);
    assert_eq!(stats.oldest_pending, Some(scheduled.deliver_at));
}

outbox_tests::on_each_backend!(
    a_scheduled_event_is_pending_from_its_time,
    delivered_not_before_its_time,
    not_lost_across_a_relay_restart,
    cancelled_ones_are_never_published,
    todays_events_of_the_same_key_are_not_held_back,
);
