//! `outbox relay --source logical`, `outbox status` and `outbox slot drop`
//! as processes, on a private PostgreSQL started with `wal_level = logical`.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use outbox_tests::eventually;
use outbox_tests::fixtures::emit_round;
use outbox_tests::nats::{TestNats, nats_url};
use outbox_tests::private_postgres::PrivatePostgres;

fn outbox(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--database-url", url])
        .args(args)
        .output()
        .expect("run outbox")
}

fn slots(url: &str, thresholds: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["status", "--json"];
    args.extend(thresholds);
    let output = outbox(url, &args);
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    (output.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logical_relay_process_shows_in_status_and_its_slot_drops_losing_nothing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pg = PrivatePostgres::start(dir.path())
        .await
        .expect("a private PostgreSQL");
    let (url, db) = pg.outbox().await.expect("a migrated outbox");
    let nats = TestNats::shared().await;
    let stream = nats.provision_orders().await;
    let relay_args = [
        "--database-url",
        &url,
        "relay",
        "--source",
        "logical",
        "--nats-url",
        &nats_url(),
        "--namespace",
        &nats.namespace,
        "--no-migrate",
    ];
    let mut relay = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(relay_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay");
    for n in 0..10 {
        emit_round(&db, n, 1).await.expect("commit");
    }
    let count = async || nats.messages(&stream).await.len();
    eventually("the relay publishes the first events", async || {
        count().await == 10
    })
    .await;
    let (code, report) = slots(&url, &["--max-slot-lag-seconds", "60"]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["slots"][0]["name"], "outbox_public");
    assert_eq!(report["slots"][0]["active"], true);
    assert_eq!(report["slots"][0]["capturing"], true);

    // kill -9: the events committed since wait in the slot.
    relay.kill().expect("kill the relay");
    relay.wait().expect("reap it");
    for n in 10..20 {
        emit_round(&db, n, 1).await.expect("commit");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, report) = slots(&url, &["--max-slot-lag-seconds", "1"]);
    assert_eq!(code, Some(1), "a stalled slot breaches: {report}");
    assert_eq!(
        report["breached"],
        serde_json::json!(["max_slot_lag_seconds"])
    );
    assert_eq!(report["slots"][0]["active"], false);

    let dropped = outbox(
        &url,
        &[
            "slot",
            "drop",
            "--nats-url",
            &nats_url(),
            "--namespace",
            &nats.namespace,
        ],
    );
    assert!(dropped.status.success(), "{dropped:?}");
    assert_eq!(
        count().await,
        20,
        "what the slot held was published before it went"
    );
    let (_, report) = slots(&url, &[]);
    assert_eq!(report["slots"], serde_json::json!([]));
    db.close().await.expect("close");
    nats.finish().await;
}
