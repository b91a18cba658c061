//! `outbox dead-letters` run as a process on a SQLite outbox: listing,
//! showing, replaying and discarding, in both tables, and the errors for an
//! unknown id or a missing selector.

use std::process::{Command, Output};

use chrono::Utc;
use outbox_core::entity::{inbox_dead_letter, inbox_message, outbox_dead_letter, outbox_message};
use sea_orm::{ActiveValue::Set, Database, DatabaseConnection, EntityTrait};
use uuid::Uuid;

fn outbox(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--database-url", url, "dead-letters"])
        .args(args)
        .output()
        .expect("run outbox dead-letters")
}

fn stdout(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failure(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn relay_letter(event_type: &str) -> outbox_dead_letter::Model {
    outbox_dead_letter::Model {
        id: Uuid::now_v7(),
        event_type: event_type.to_owned(),
        event_version: 1,
        exchange: "orders".into(),
        subject: "orders.created".into(),
        partition_key: Some("k1".into()),
        payload: br#"{"order_id":7}"#.to_vec(),
        headers: None,
        content_type: "application/json".into(),
        created_at: Utc::now(),
        attempts: 10,
        last_error: "stream not found".into(),
        failed_at: Utc::now(),
    }
}

async fn setup(dir: &std::path::Path) -> (String, DatabaseConnection) {
    let url = format!("sqlite://{}?mode=rwc", dir.join("outbox.sqlite").display());
    let db = Database::connect(&url).await.expect("open SQLite");
    outbox_core::migrate(&db).await.expect("migrate");
    (url, db)
}

#[tokio::test]
async fn relay_dead_letters_are_listed_shown_replayed_and_discarded() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, db) = setup(dir.path()).await;
    let (created, cancelled) = (relay_letter("OrderCreated"), relay_letter("OrderCancelled"));
    for letter in [&created, &cancelled] {
        outbox_dead_letter::Entity::insert(outbox_dead_letter::ActiveModel::from(letter.clone()))
            .exec(&db)
            .await
            .expect("insert a dead letter");
    }

    let list = stdout(&outbox(&url, &["list"]));
    assert!(
        list.contains(&created.id.to_string()) && list.contains("2 shown"),
        "{list}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&stdout(&outbox(&url, &["show", &created.id.to_string()])))
            .expect("one JSON record");
    assert_eq!(shown["payload"]["order_id"], 7);
    assert_eq!(shown["attempts"], 10);
    assert_eq!(shown["error"], "stream not found");

    let unknown = Uuid::now_v7().to_string();
    let error = failure(&outbox(&url, &["show", &unknown]));
    assert!(
        error.contains(&format!("no dead letter has the id {unknown}")),
        "{error}"
    );
    let error = failure(&outbox(&url, &["replay", &unknown]));
    assert!(error.contains(&unknown), "{error}");
    let error = failure(&outbox(&url, &["replay"]));
    assert!(error.contains("required"), "{error}");
    let error = failure(&outbox(&url, &["discard", "--all", "--event-type", "X"]));
    assert!(
        error.contains("--all") && error.contains("--event-type"),
        "{error}"
    );
    let error = failure(&outbox(&url, &["replay", "--consumer", "billing"]));
    assert!(error.contains("--inbox"), "{error}");

    let replayed = stdout(&outbox(&url, &["replay", "--event-type", "OrderCreated"]));
    assert!(replayed.contains(&created.id.to_string()), "{replayed}");
    assert!(
        replayed.contains("1 dead letter(s) moved back to the outbox"),
        "{replayed}"
    );
    let row = outbox_message::Entity::find_by_id(created.id)
        .one(&db)
        .await
        .expect("read the outbox")
        .expect("back in the outbox under its id");
    assert_eq!((row.attempts, row.last_error), (0, None));
    assert_eq!(row.payload, created.payload);

    let discarded = stdout(&outbox(&url, &["discard", "--all"]));
    assert!(discarded.contains(&cancelled.id.to_string()), "{discarded}");
    assert!(
        discarded.contains("1 dead letter(s) discarded"),
        "{discarded}"
    );
    let left = outbox_dead_letter::Entity::find()
        .all(&db)
        .await
        .expect("read");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn an_inbox_dead_letter_replayed_from_the_command_line_is_handed_back() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, db) = setup(dir.path()).await;
    let event_id = Uuid::now_v7();
    inbox_message::Entity::insert(inbox_message::ActiveModel {
        consumer: Set("billing".into()),
        event_id: Set(event_id),
        processed_at: Set(Utc::now()),
    })
    .exec(&db)
    .await
    .expect("insert the inbox row");
    let letter = inbox_dead_letter::Model {
        id: Uuid::now_v7(),
        consumer: "billing".into(),
        stream: "ORDERS".into(),
        stream_sequence: 42,
        subject: "orders.created".into(),
        event_id: Some(event_id),
        event_type: Some("OrderCreated".into()),
        event_version: Some(1),
        partition_key: None,
        payload: b"not json".to_vec(),
        headers: r#"{"Nats-Msg-Id":"x"}"#.into(),
        reason: "handler_failed".into(),
        error: "rejected".into(),
        deliveries: 5,
        failed_at: Utc::now(),
        replay_requested_at: None,
    };
    inbox_dead_letter::Entity::insert(inbox_dead_letter::ActiveModel::from(letter.clone()))
        .exec(&db)
        .await
        .expect("insert the dead letter");

    let shown: serde_json::Value = serde_json::from_str(&stdout(&outbox(
        &url,
        &["show", "--inbox", &letter.id.to_string()],
    )))
    .expect("one JSON record");
    assert_eq!(shown["payload"], "not json");
    assert_eq!(shown["headers"][outbox_core::headers::MSG_ID], "x");
    assert_eq!(shown["deliveries"], 5);
    // By the event's id too: the one that stays when a failed replay makes
    // a new dead letter (a new id) of the same event.
    let by_event: serde_json::Value = serde_json::from_str(&stdout(&outbox(
        &url,
        &["show", "--inbox", &event_id.to_string()],
    )))
    .expect("one JSON record");
    assert_eq!(by_event["id"], letter.id.to_string());

    let replayed = stdout(&outbox(
        &url,
        &["replay", "--inbox", "--consumer", "billing"],
    ));
    assert!(
        replayed.contains("1 dead letter(s) handed back to their consumers"),
        "{replayed}"
    );
    let inbox = inbox_message::Entity::find().all(&db).await.expect("read");
    assert!(
        inbox.is_empty(),
        "the inbox row is gone, so the handler runs again"
    );
    let letter = inbox_dead_letter::Entity::find_by_id(letter.id)
        .one(&db)
        .await
        .expect("read")
        .expect("kept until its consumer handles it");
    assert!(letter.replay_requested_at.is_some());
}
