//! `outbox status` as a probe, run as a process on a SQLite outbox: its JSON
//! report, and its exit status when a threshold is breached or an option is bad.

use std::process::{Command, Output};

use outbox_tests::fixtures::OrderCreated;
use outbox_tests::{TestDb, emit_one};

fn status(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--database-url", url, "status"])
        .args(args)
        .output()
        .expect("run outbox status")
}

fn report(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

#[tokio::test]
async fn status_reports_json_and_exits_1_when_a_threshold_is_breached() {
    let test = TestDb::sqlite().await;
    let (url, db) = (test.url.clone(), test.db.clone());
    emit_one(
        &db,
        OrderCreated {
            order_id: 1,
            total_cents: 100,
        },
    )
    .await
    .expect("commit");
    emit_one(
        &db,
        OrderCreated {
            order_id: 2,
            total_cents: 100,
        },
    )
    .await
    .expect("commit");

    let healthy = status(&url, &["--json", "--max-pending", "2", "--max-age", "3600"]);
    assert_eq!(healthy.status.code(), Some(0), "{healthy:?}");
    let json = report(&healthy);
    assert_eq!(json["pending"], 2);
    assert_eq!(json["dead_letters"], 0);
    assert!(
        json["oldest_pending_age_seconds"]
            .as_f64()
            .is_some_and(|age| age < 3600.0)
    );
    assert_eq!(json["breached"], serde_json::json!([]));

    let breached = status(&url, &["--json", "--max-pending", "1"]);
    assert_eq!(breached.status.code(), Some(1), "{breached:?}");
    assert_eq!(
        report(&breached)["breached"],
        serde_json::json!(["max_pending"])
    );

    let stale = status(&url, &["--max-age", "0"]);
    assert_eq!(stale.status.code(), Some(1), "{stale:?}");
    assert!(String::from_utf8_lossy(&stale.stdout).contains("breached:       max_age"));

    let bad = status(&url, &["--max-age", "-1"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--max-age") && stderr.contains("not a number of seconds"),
        "{stderr}"
    );
}

/// Commits one event for later.
#[outbox_core::transactional]
async fn schedule_one(
    db: &sea_orm::DatabaseConnection,
    at: chrono::DateTime<chrono::Utc>,
) -> outbox_core::Result<()> {
    outbox_core::emit!(
        OrderCreated {
            order_id: 9,
            total_cents: 1
        },
        at = at
    );
    Ok(())
}

/// Besides the relay's side, `status` reports the events scheduled for
/// later and each consumer's dead letters, in text and JSON, and
/// `--max-dead-letters` breaches on a consumer's as on the relay's.
#[tokio::test]
async fn status_reports_scheduled_events_and_each_consumers_dead_letters() {
    use outbox_core::entity::inbox_dead_letter;
    use sea_orm::EntityTrait;

    let test = TestDb::sqlite().await;
    let (url, db) = (test.url.clone(), test.db.clone());
    let due = chrono::Utc::now() + chrono::Duration::hours(1);
    schedule_one(&db, due).await.expect("schedule");
    for (consumer, sequence) in [("billing", 1), ("billing", 2), ("shipping", 3)] {
        let letter = inbox_dead_letter::Model {
            id: uuid::Uuid::now_v7(),
            consumer: consumer.into(),
            stream: "ORDERS".into(),
            stream_sequence: sequence,
            subject: "orders.created".into(),
            event_id: Some(uuid::Uuid::now_v7()),
            event_type: Some("OrderCreated".into()),
            event_version: Some(1),
            partition_key: None,
            payload: b"{}".to_vec(),
            headers: "{}".into(),
            reason: "handler_failed".into(),
            error: "rejected".into(),
            deliveries: 5,
            failed_at: chrono::Utc::now(),
            replay_requested_at: (sequence == 2).then(chrono::Utc::now),
        };
        inbox_dead_letter::Entity::insert(inbox_dead_letter::ActiveModel::from(letter))
            .exec(&db)
            .await
            .expect("a dead letter");
    }

    let within = status(&url, &["--json", "--max-dead-letters", "2"]);
    assert_eq!(within.status.code(), Some(0), "{within:?}");
    let json = report(&within);
    assert_eq!(json["scheduled"], 1);
    assert!(json["next_scheduled"].is_string(), "{json}");
    assert_eq!(json["dead_letters"], 0);
    assert_eq!(json["inbox_dead_letters"], 3);
    assert_eq!(
        json["consumers"],
        serde_json::json!([
            {"name": "billing", "dead_letters": 2, "replay_requested": 1},
            {"name": "shipping", "dead_letters": 1, "replay_requested": 0},
        ])
    );

    let breached = status(&url, &["--max-dead-letters", "1"]);
    assert_eq!(breached.status.code(), Some(1), "{breached:?}");
    let text = String::from_utf8_lossy(&breached.stdout);
    for line in [
        "scheduled:      1 (next due ",
        "consumer dead letters: 3",
        "  billing: 2 (1 replay requested)",
        "  shipping: 1 (0 replay requested)",
        "breached:       max_dead_letters",
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
}

/// A database that refuses connections: `status` is a probe and fails
/// within its own short timeout, naming the server and the cause, never
/// the password (the pool alone said "pool timed out" after 30 s).
#[test]
fn status_on_an_unreachable_database_names_the_server_and_the_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://app:pw-9f1c@127.0.0.1:{port}/app");
    let started = std::time::Instant::now();
    let output = status(&url, &[]);
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot reach the database at 127.0.0.1:{port}"))
            && stderr.to_lowercase().contains("refused"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("pw-9f1c"),
        "the password reached: {stderr}"
    );
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
}

/// A consumer group's members, who owns which partition and how far behind
/// the stream each is, from the group's tables as a member leaves them.
#[tokio::test]
async fn status_shows_each_groups_members_and_partitions() {
    use outbox_core::consumer::group;
    let test = TestDb::sqlite().await;
    let db = &test.db;
    let now = chrono::Utc::now().timestamp_millis();
    let until = now + 60_000;
    group::ensure_partitions(db, "billing", 4, 0)
        .await
        .expect("create");
    // Member `a` has read to sequence 120, and settled partition 0 through 100.
    group::renew(db, "billing", "a", now, until, Some(120))
        .await
        .expect("join");
    for partition in [0, 2] {
        let claim = (group::take(db, "billing", partition, "a", now, until).await)
            .expect("take")
            .expect("free");
        if partition == 0 {
            let advanced = group::advance(db, "billing", "a", &claim, 100).await;
            assert!(advanced.expect("advance"));
        }
    }

    let json = report(&status(&test.url, &["--json"]));
    let groups = json["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["name"], "billing");
    assert_eq!(groups[0]["members"], serde_json::json!(["a"]));
    let owners: Vec<_> = (groups[0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter())
    .map(|p| p["owner"].clone())
    .collect();
    assert_eq!(
        owners,
        serde_json::json!(["a", null, "a", null])
            .as_array()
            .expect("array")
            .clone()
    );
    assert_eq!(groups[0]["stream_end"], 120);
    let behind: Vec<_> = (groups[0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter())
    .map(|p| p["behind"].clone())
    .collect();
    assert_eq!(behind, [20, 120, 120, 120].map(serde_json::Value::from));

    let text = String::from_utf8_lossy(&status(&test.url, &[]).stdout).into_owned();
    assert!(
        text.contains(
            "consumer group billing: 1 members, 4 partitions (2 without owner, at most 120 messages behind)"
        ),
        "{text}"
    );
    assert!(text.contains("  a: partitions 0,2"), "{text}");
}
