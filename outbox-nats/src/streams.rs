//! Stream provisioning: one stream per exchange, capturing `<exchange>.>`,
//! with a duplicate window longer than the relay's retry horizon, and the
//! replicas, storage and limits an operator asks for.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{Config, StorageType};
use outbox_core::registry::RegistryError;

/// A stream the relay needs, and the subjects it must capture; made by
/// [`StreamSpec::for_exchange`] or [`streams_from_registry`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSpec {
    /// The stream's name.
    pub name: String,
    /// Subjects it must capture, e.g. `orders.>`.
    pub subjects: Vec<String>,
    /// Replicas, storage and limits, applied when the stream is created.
    pub settings: StreamSettings,
}

impl StreamSpec {
    /// The stream for one exchange: `<exchange>.>`, both under `namespace` if
    /// given, with default settings.
    pub fn for_exchange(stream: &str, exchange: &str, namespace: Option<&str>) -> Self {
        Self {
            name: stream_name(stream, namespace),
            subjects: vec![namespaced(&format!("{exchange}.>"), namespace)],
            settings: StreamSettings::default(),
        }
    }

    /// This stream with `settings`.
    pub fn with_settings(mut self, settings: StreamSettings) -> Self {
        self.settings = settings;
        self
    }
}

/// How a stream is kept. Each setting left unset takes the server's default
/// at creation (one replica, file storage, no limit of age or size) and is
/// not checked on an existing stream.
///
/// ```
/// use std::time::Duration;
/// use async_nats::jetstream::stream::StorageType;
///
/// let settings = outbox_nats::StreamSettings::default()
///     .replicas(3)
///     .storage(StorageType::File)
///     .max_age(Duration::from_secs(7 * 24 * 3600))
///     .max_bytes(10 << 30);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSettings {
    replicas: Option<usize>,
    storage: Option<StorageType>,
    max_age: Option<Duration>,
    max_bytes: Option<u64>,
}

impl StreamSettings {
    /// Copies of each message across the cluster's servers (1, 3 or 5 in practice).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// File (survives a restart) or memory storage.
    pub fn storage(mut self, storage: StorageType) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Messages older than this are removed. Keep it longer than a consumer
    /// may be down, or it misses events.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// The oldest messages are removed when the stream holds more bytes than this.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    fn apply(&self, config: &mut Config) {
        if let Some(replicas) = self.replicas {
            config.num_replicas = replicas;
        }
        if let Some(storage) = self.storage {
            config.storage = storage;
        }
        if let Some(max_age) = self.max_age {
            config.max_age = max_age;
        }
        if let Some(max_bytes) = self.max_bytes {
            config.max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
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

/// Why the registry gives no streams to provision.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryStreamsError {
    /// Two event types conflict; the error names both.
    #[error(transparent)]
    Conflict(#[from] RegistryError),
    /// No event type is registered in this program.
    #[error(
        "the event registry is empty: no `#[derive(OutboxEvent)]` type is linked into this \
         program. A type registers only when the binary links the crate that defines it, and \
         the linker drops a crate the binary never names: reference it from the binary (name \
         one of its items, or `extern crate my_events;`), or list the streams yourself with \
         `StreamSpec::for_exchange`"
    )]
    Empty,
}

/// The streams of every event type in the program's registry, after checking
/// that no two types conflict (the error names both).
///
/// An empty registry is an error, not an empty list: it means the crate
/// that derives the events is not linked into this binary (see
/// [`RegistryStreamsError::Empty`]), and provisioning nothing would leave
/// every publish to be rejected later.
pub fn streams_from_registry(
    namespace: Option<&str>,
) -> Result<Vec<StreamSpec>, RegistryStreamsError> {
    let registry = outbox_core::registry();
    registry.validate()?;
    if registry.iter().next().is_none() {
        return Err(RegistryStreamsError::Empty);
    }
    let mut streams: BTreeMap<String, StreamSpec> = BTreeMap::new();
    for event in registry.iter() {
        let spec = StreamSpec::for_exchange(event.stream, event.exchange, namespace);
        let entry = streams
            .entry(spec.name.clone())
            .or_insert_with(|| StreamSpec {
                subjects: Vec::new(),
                ..spec.clone()
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
    /// The stream exists with fewer or more replicas than asked for.
    #[error(
        "stream `{stream}` exists with {actual} replica(s), not the {required} asked for: \
         change the stream's replicas (`nats stream edit`), or ask for {actual}"
    )]
    Replicas {
        /// The stream.
        stream: String,
        /// Its replicas.
        actual: usize,
        /// The replicas asked for.
        required: usize,
    },
    /// JetStream refused a request.
    #[error("JetStream refused to provision stream `{stream}`")]
    JetStream {
        /// The stream.
        stream: String,
        /// What JetStream said.
        #[source]
        source: async_nats::Error,
    },
}

/// Creates missing streams with their settings, and checks existing ones:
/// an error if one does not capture the subjects, keeps duplicates for less
/// than `duplicate_window` or has other replicas than asked for; a warning
/// naming the setting if its storage, max age or max bytes differ (they do
/// not break a guarantee, and an operator may have changed them on purpose).
pub async fn provision(
    context: &Context,
    streams: &[StreamSpec],
    duplicate_window: Duration,
) -> Result<(), ProvisionError> {
    for spec in streams {
        let refused = |source: async_nats::Error| ProvisionError::JetStream {
            stream: spec.name.clone(),
            source,
        };
        match context.get_stream(&spec.name).await {
            Ok(mut stream) => {
                let config = &stream.info().await.map_err(|e| refused(e.into()))?.config;
                check(spec, config, duplicate_window)?;
            }
            Err(error) if is_missing(&error) => {
                let mut config = Config {
                    name: spec.name.clone(),
                    subjects: spec.subjects.clone(),
                    duplicate_window,
                    ..Config::default()
                };
                spec.settings.apply(&mut config);
                context
                    .create_stream(config)
                    .await
                    .map_err(|e| refused(e.into()))?;
                tracing::info!(stream = %spec.name, subjects = ?spec.subjects, settings = ?spec.settings, "created stream");
            }
            Err(error) => return Err(refused(error.into())),
        }
    }
    Ok(())
}

pub(crate) fn is_missing(error: &async_nats::jetstream::context::GetStreamError) -> bool {
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
    if let Some(required) = spec.settings.replicas
        && config.num_replicas.max(1) != required
    {
        return Err(ProvisionError::Replicas {
            stream: spec.name.clone(),
            actual: config.num_replicas.max(1),
            required,
        });
    }
    let mut wanted = config.clone();
    spec.settings.apply(&mut wanted);
    let differs = [
        ("storage", wanted.storage != config.storage),
        ("max_age", wanted.max_age != config.max_age),
        ("max_bytes", wanted.max_bytes != config.max_bytes),
    ];
    for (setting, _) in differs.iter().filter(|(_, differs)| *differs) {
        tracing::warn!(stream = %spec.name, setting, "an existing stream's setting differs from the one asked for; it is left as it is");
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
