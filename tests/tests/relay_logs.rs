//! What the relay's log says of an event the broker rejects: a warning at
//! the first rejection, with the reason (the dead letter comes only after
//! every retry), and in JSON logs a reason that is a string, not a string
//! holding a quoted string.

use std::sync::{Arc, Mutex};

use outbox_core::relay::{Delivery, Relay};
use outbox_core::testing::MemoryPublisher;
use outbox_tests::fixtures::OrderCreated;
use outbox_tests::{FAST_RETRY, TestDb, emit_one};

/// Log lines written to memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The JSON lines whose message is `message`.
    fn lines(&self, message: &str) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().expect("log buffer").clone()).expect("UTF-8");
        (text.lines())
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
            .filter(|line| line["fields"]["message"] == message)
            .collect()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_rejected_event_is_logged_at_its_first_rejection_with_its_reason() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let test = TestDb::sqlite().await;
    let order = OrderCreated {
        order_id: 1,
        total_cents: 5,
    };
    emit_one(&test.db, order).await.expect("commit");
    let reason = "no JetStream stream captures orders.order.1.created";
    let publisher = MemoryPublisher::new().answer(|_| true, Delivery::Rejected(reason.into()));
    let relay = Relay::builder(test.db.clone(), publisher)
        .max_attempts(3)
        .retry_backoff(FAST_RETRY)
        .build();
    let first = relay.drain().await.expect("the first round");
    assert_eq!(first.retried, 1);
    let rejected = captured.lines("the broker rejected an event; it will be retried");
    assert_eq!(rejected.len(), 1, "one warning at the first rejection");
    assert_eq!(rejected[0]["level"], "WARN");
    assert_eq!(rejected[0]["fields"]["error"], reason);
    assert_eq!(rejected[0]["fields"]["event_type"], "OrderCreated");

    // Retried until dead-lettered: no second warning of the rejection, and
    // the dead letter's line holds the reason as a plain string.
    for _ in 0..50 {
        if !captured.lines("event dead-lettered").is_empty() {
            break;
        }
        tokio::time::sleep(FAST_RETRY.max).await;
        relay.drain().await.expect("a later round");
    }
    let dead = captured.lines("event dead-lettered");
    assert_eq!(dead.len(), 1, "dead-lettered once");
    assert_eq!(dead[0]["fields"]["error"], reason);
    assert_eq!(
        captured
            .lines("the broker rejected an event; it will be retried")
            .len(),
        1
    );
    test.finish().await;
}

/// A poll interval of 0 would poll without pause: the builder takes
/// `MIN_POLL_INTERVAL` instead (the binary refuses the value outright).
#[tokio::test(flavor = "current_thread")]
async fn a_zero_poll_interval_becomes_the_shortest_one() {
    let test = TestDb::sqlite().await;
    let relay = Relay::builder(test.db.clone(), MemoryPublisher::new())
        .poll_interval(std::time::Duration::ZERO)
        .build();
    assert_eq!(
        relay.config().poll_interval,
        outbox_core::relay::MIN_POLL_INTERVAL
    );
    test.finish().await;
}
