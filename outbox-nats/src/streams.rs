//! Stream provisioning: one stream per exchange, capturing `<exchange>.>`,
//! with a duplicate window longer than the relay's retry horizon.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::stream::Config;
use outbox_core::registry::RegistryError;

/// A stream the relay needs, and the subjects it must capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// The stream's name.
    pub name: String,
    /// Subjects it must capture, e.g. `orders.>`.
    pub subjects: Vec<String>,
}

impl StreamSpec {
    /// The stream for one exchange: `<exchange>.>`, both under `namespace` if given.
    pub fn for_exchange(stream: &str, exchange: &str, namespace: Option<&str>) -> Self {
        Self {
            name: stream_name(stream, namespace),
            subjects: vec![namespaced(&format!("{exchange}.>"), namespace)],
        }
    }
}

/// A stream's name under `namespace`: `NAMESPACE_<stream>`.
pub(crate) fn stream_name(stream: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{}_{stream}", ns.to_uppercase()),
        None => stream.to_owned(),
    }
}

/// A subject under `namespace`: `namespace.<subject>`.
pub(crate) fn namespaced(subject: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => [ns, ".", subject].concat(),
        None => subject.to_owned(),
    }
}

/// The streams of every event type in the program's registry, after checking
/// that no two types conflict (the error names both).
pub fn streams_from_registry(namespace: Option<&str>) -> Result<Vec<StreamSpec>, RegistryError> {
    let registry = outbox_core::registry();
    registry.validate()?;
    let mut streams: BTreeMap<String, StreamSpec> = BTreeMap::new();
    for event in registry.iter() {
        let spec = StreamSpec::for_exchange(event.stream, event.exchange, namespace);
        let entry = streams
            .entry(spec.name.clone())
            .or_insert_with(|| StreamSpec {
                name: spec.name,
                subjects: Vec::new(),
            });
        for subject in spec.subjects {
            if !entry.subjects.contains(&subject) {
                entry.subjects.push(subject);
            }
        }
    }
    Ok(streams.into_values().collect())
}

/// A stream that cannot serve the relay as it is configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The stream exists, but does not capture a subject the relay publishes to.
    #[error(
        "stream `{stream}` exists but its subjects {actual:?} do not capture `{required}`: \
         add `{required}` to its subjects, or set the event's `stream` to another one"
    )]
    SubjectsNotCaptured {
        /// The stream.
        stream: String,
        /// Its subjects.
        actual: Vec<String>,
        /// The subject it lacks.
        required: String,
    },
    /// The stream's duplicate window is shorter than the relay may take to publish an event again.
    #[error(
        "stream `{stream}` has a duplicate window of {actual:?}, shorter than the relay's retry \
         horizon of {required:?}, so a re-published event could be stored twice: raise the \
         stream's duplicate_window, or lower the relay's max_attempts or backoff"
    )]
    DuplicateWindowTooShort {
        /// The stream.
        stream: String,
        /// Its duplicate window.
        actual: Duration,
        /// The window the relay needs.
        required: Duration,
    },
    /// JetStream refused a request.
    #[error("JetStream refused to provision stream `{stream}`: {error}")]
    JetStream {
        /// The stream.
        stream: String,
        /// What JetStream said.
        error: String,
    },
}

/// Creates missing streams, and checks existing ones capture the subjects and
/// keep duplicates for at least `duplicate_window`.
pub async fn provision(
    context: &Context,
    streams: &[StreamSpec],
    duplicate_window: Duration,
) -> Result<(), ProvisionError> {
    for spec in streams {
        let refused = |error: &dyn std::fmt::Display| ProvisionError::JetStream {
            stream: spec.name.clone(),
            error: error.to_string(),
        };
        match context.get_stream(&spec.name).await {
            Ok(mut stream) => {
                let config = &stream.info().await.map_err(|e| refused(&e))?.config;
                check(spec, config, duplicate_window)?;
            }
            Err(error) if is_missing(&error) => {
                let config = Config {
                    name: spec.name.clone(),
                    subjects: spec.subjects.clone(),
                    duplicate_window,
                    ..Config::default()
                };
                context
                    .create_stream(config)
                    .await
                    .map_err(|e| refused(&e))?;
                tracing::info!(stream = %spec.name, subjects = ?spec.subjects, "created stream");
            }
            Err(error) => return Err(refused(&error)),
        }
    }
    Ok(())
}

fn is_missing(error: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(error.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn check(
    spec: &StreamSpec,
    config: &Config,
    duplicate_window: Duration,
) -> Result<(), ProvisionError> {
    for required in &spec.subjects {
        if !config.subjects.iter().any(|s| captures(s, required)) {
            return Err(ProvisionError::SubjectsNotCaptured {
                stream: spec.name.clone(),
                actual: config.subjects.clone(),
                required: required.clone(),
            });
        }
    }
    if config.duplicate_window < duplicate_window {
        return Err(ProvisionError::DuplicateWindowTooShort {
            stream: spec.name.clone(),
            actual: config.duplicate_window,
            required: duplicate_window,
        });
    }
    Ok(())
}

/// Whether a stream subject `filter` captures every subject `wanted` matches.
fn captures(filter: &str, wanted: &str) -> bool {
    let mut filter = filter.split('.');
    let mut wanted = wanted.split('.');
    loop {
        match (filter.next(), wanted.next()) {
            (Some(">"), _) => return true,
            (Some("*"), Some(w)) if w != ">" => {}
            (Some(f), Some(w)) if f == w => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_capture_follows_nats_wildcards() {
        assert!(captures("orders.>", "orders.>"));
        assert!(captures(">", "orders.>"));
        assert!(captures("*.>", "orders.>"));
        assert!(!captures("orders.*", "orders.>"));
        assert!(!captures("orders.created", "orders.>"));
        assert!(!captures("billing.>", "orders.>"));
    }

    #[test]
    fn namespaced_streams_are_apart() {
        let spec = StreamSpec::for_exchange("ORDERS", "orders", Some("t1"));
        assert_eq!(spec.name, "T1_ORDERS");
        assert_eq!(spec.subjects, ["t1.orders.>"]);
    }
}
