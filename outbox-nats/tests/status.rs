//! `outbox status` as a probe, run as a process on a SQLite outbox: its JSON
//! report, and its exit status when a threshold is breached or an option is bad.

use std::process::{Command, Output};

use outbox_tests::emit_one;
use outbox_tests::fixtures::OrderCreated;
use sea_orm::Database;

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
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("outbox.sqlite").display()
    );
    let db = Database::connect(&url).await.expect("open SQLite");
    outbox_core::migrate(&db).await.expect("migrate");
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
    db.close().await.expect("close");

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
