//! One trace from the request that emits an event to the handler of it, and
//! on to what that handler emits (feature `opentelemetry`): through a real
//! PostgreSQL outbox, the relay, NATS JetStream and the consumer, with spans
//! collected by OpenTelemetry's in-memory exporter.
//!
//! Its own test binary: the `tracing` subscriber is process-global here,
//! because the consumer's handlers run on the runtime's worker threads.

use std::collections::BTreeMap;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_core::entity::outbox_message;
use outbox_core::{emit, transactional};
use outbox_tests::Setup;
use outbox_tests::fixtures::{AppError, OrderCreated, reserve_stock};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[transactional]
async fn place_order(db: &DatabaseConnection, order_id: i64) -> Result<(), AppError> {
    emit!(OrderCreated {
        order_id,
        total_cents: 1
    });
    Ok(())
}

/// Every span ended so far, from a subscriber installed once for the process.
fn exporter() -> InMemorySpanExporter {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-tests"));
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with(layer);
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    exporter
}

fn the_span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let mut named = spans.iter().filter(|span| span.name == name);
    let span = named.next().unwrap_or_else(|| panic!("no span {name}"));
    assert!(named.next().is_none(), "one span {name}");
    span
}

/// The trace and parent span ids of the `traceparent` of the stored event
/// of `exchange` and order `key`.
async fn stored_traceparent(
    db: &DatabaseConnection,
    exchange: &str,
    key: &str,
) -> Option<(TraceId, SpanId)> {
    let row = outbox_message::Entity::find()
        .filter(outbox_message::Column::Exchange.eq(exchange))
        .filter(outbox_message::Column::PartitionKey.eq(key))
        .one(db)
        .await
        .expect("read the outbox")
        .expect("the event");
    let headers: BTreeMap<String, String> =
        serde_json::from_str(row.headers.as_deref()?).expect("a JSON object");
    let parent = headers.get("traceparent")?;
    let parts: Vec<&str> = parent.split('-').collect();
    Some((
        TraceId::from_hex(parts[1]).expect("trace id"),
        SpanId::from_hex(parts[2]).expect("span id"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handlers_span_is_a_child_of_the_emitting_span() {
    let exporter = exporter();
    let setup = Setup::postgres().await;
    let db = setup.db();

    // Outside any span: no trace context is stored.
    place_order(db, 1).await.expect("placed");
    assert_eq!(stored_traceparent(db, "orders", "1").await, None);
    setup.relay().await;

    let request = tracing::info_span!("http.request");
    place_order(db, 2)
        .instrument(request)
        .await
        .expect("placed");
    let spans = exporter.get_finished_spans().expect("spans");
    let request = the_span(&spans, "http.request").span_context.clone();
    assert_eq!(
        stored_traceparent(db, "orders", "2").await,
        Some((request.trace_id(), request.span_id())),
        "emit! stores the current span's context"
    );
    exporter.reset();
    setup.relay().await;
    setup
        .consume("inventory", |c| c.on::<OrderCreated, _>(reserve_stock))
        .await;

    let spans = exporter.get_finished_spans().expect("spans");
    let handlers: Vec<&SpanData> = (spans.iter())
        .filter(|span| span.name == "outbox.handler")
        .collect();
    assert_eq!(handlers.len(), 2, "orders 1 and 2 handled");
    let child = (handlers.iter())
        .find(|span| span.span_context.trace_id() == request.trace_id())
        .expect("order 2's handler in the request's trace");
    assert_eq!(
        child.parent_span_id,
        request.span_id(),
        "child of the emitting span"
    );
    assert!(child.parent_span_is_remote);
    let orphan = handlers
        .iter()
        .find(|span| span.span_context.trace_id() != request.trace_id());
    assert!(orphan.is_some(), "order 1 had no trace to join");

    let linked: Vec<TraceId> = (spans.iter())
        .filter(|span| span.name == "outbox.publish")
        .flat_map(|publish| publish.links.iter())
        .map(|link| link.span_context.trace_id())
        .collect();
    assert_eq!(
        linked,
        [request.trace_id()],
        "the relay links the traced event only"
    );

    // The handler's own event carries the trace on.
    let handled = stored_traceparent(db, "stock", "2").await;
    assert!(
        handled.is_some_and(|(trace, parent)| trace == request.trace_id()
            && handlers
                .iter()
                .any(|span| span.span_context.span_id() == parent)),
        "{handled:?}"
    );
    setup.finish().await;
}
