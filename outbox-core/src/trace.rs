//! Trace context through the outbox (feature `opentelemetry`).
//!
//! `emit!` stores the W3C `traceparent` (and `tracestate`) of the current
//! `tracing` span among the event's headers; the relay sends them and links
//! its publish span to each; the consumer makes the handler's span a child of
//! the emitting span. One trace thus runs from the request that emitted an
//! event to the handler of it, and on to what that handler emits.
//!
//! The context is read through `tracing-opentelemetry`: a span carries one
//! only where the application installed its layer. Without it, nothing is
//! stored and nothing changes.

use std::collections::{BTreeMap, HashMap};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::entity::outbox_message;

/// The trace headers of the current span: empty when it carries no context.
pub(crate) fn current_headers() -> HashMap<String, String> {
    let context = tracing::Span::current().context();
    let mut headers = HashMap::new();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut headers);
    }
    headers
}

/// The trace context that `headers` (an event's, or a message's) carry; an
/// empty context when they carry none, or a malformed one.
pub fn extract(headers: &BTreeMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Makes `span` a child of the context `headers` carry, if any.
pub(crate) fn set_parent(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    let context = extract(headers);
    if context.span().span_context().is_valid() {
        // Fails only when the span is disabled: then there is nothing to parent.
        let _ = span.set_parent(context);
    }
}

/// Links `span` to the context each event was emitted in.
pub(crate) fn link_events<'a>(
    span: &tracing::Span,
    events: impl IntoIterator<Item = &'a outbox_message::Model>,
) {
    if span.is_disabled() {
        return;
    }
    for event in events {
        let Some(json) = &event.headers else { continue };
        let Ok(headers) = serde_json::from_str::<BTreeMap<String, String>>(json) else {
            continue; // the publisher dead-letters such an event with the reason
        };
        let context = extract(&headers);
        let linked = context.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

struct Headers<'a>(&'a BTreeMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0.iter())
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
