//! The inbox consumer on JetStream: a durable pull consumer, created and
//! read here, whose loop (key order, retries, dead letters, the inbox) is
//! `outbox_core::consumer`'s.

mod recovery;
mod transport;

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, Context};
use outbox_core::Backoff;
use outbox_core::OutboxEvent;
use outbox_core::consumer::group::GroupConfig;
use outbox_core::consumer::{self as core, ConsumerConfig, Identity, StartError};
use outbox_core::inbox::{DuplicateHandler, Handler, Handlers};
use sea_orm::DatabaseConnection;

pub use outbox_core::consumer::ConsumerHandle;

use crate::streams::{namespaced, stream_name};

/// Where a consumer name starts reading the stream the first time it runs,
/// when its durable JetStream consumer is created (or, for a group, its
/// partitions). Afterwards the name keeps its own positions: changing this
/// for an existing name does nothing (delete the durable, or the group's
/// rows in `outbox_consumer_partitions`, to start it anew).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartAt {
    /// Every event the stream holds (the default): a new consumer applies
    /// the history the stream keeps, as a new service catching up needs.
    #[default]
    All,
    /// Only events stored after the consumer was created: a trial consumer
    /// that must not re-apply history, or re-dead-letter old poison messages.
    New,
    /// Events stored at or after this time.
    Time(chrono::DateTime<chrono::Utc>),
    /// Events from this stream sequence on.
    Sequence(u64),
}

impl StartAt {
    /// The durable's deliver policy: a stream sequence for every start but
    /// the first, resolved by the server itself (an ordered consumer of the
    /// same policy says where it would start). The durable's configuration
    /// then keeps that sequence, which recovery reads as its floor: a new
    /// durable reports no ack floor until its first ack, and recovery must
    /// not read back the history it was told to skip.
    async fn deliver_policy(
        self,
        stream: &jetstream::stream::Stream,
    ) -> Result<DeliverPolicy, async_nats::Error> {
        let policy = match self {
            StartAt::All => return Ok(DeliverPolicy::All),
            StartAt::Sequence(sequence) => {
                return Ok(DeliverPolicy::ByStartSequence {
                    start_sequence: sequence.max(1),
                });
            }
            StartAt::New => DeliverPolicy::New,
            StartAt::Time(at) => {
                let nanos = i128::from(at.timestamp_micros()) * 1_000;
                DeliverPolicy::ByStartTime {
                    start_time: time::OffsetDateTime::from_unix_timestamp_nanos(nanos)?,
                }
            }
        };
        let probe = pull::OrderedConfig {
            deliver_policy: policy,
            ..Default::default()
        };
        let probe = stream.create_consumer(probe).await?;
        let start_sequence = probe.cached_info().delivered.stream_sequence + 1;
        let _ = stream.delete_consumer(&probe.cached_info().name).await;
        Ok(DeliverPolicy::ByStartSequence { start_sequence })
    }
}

/// Why a consumer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The consumer's inbox side could not start, whatever the broker: no
    /// handlers, two for one event type, its name running in another
    /// process, a pool too small, its lock in the database.
    #[error(transparent)]
    Inbox(#[from] StartError),
    /// The handlers' event types live in several streams; name one with `stream`.
    #[error(
        "consumer `{consumer}` handles events of several streams ({}); one consumer reads one stream",
        streams.join(", ")
    )]
    SeveralStreams {
        /// The consumer.
        consumer: String,
        /// The streams.
        streams: Vec<String>,
    },
    /// The stream does not exist: provision it first.
    #[error("stream `{0}` does not exist (provision it first)")]
    StreamNotFound(String),
    /// The stream could not be looked up.
    #[error("cannot look up stream `{stream}`")]
    Stream {
        /// The stream.
        stream: String,
        /// What JetStream said.
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    /// JetStream refused to create or look up the durable consumer.
    #[error("cannot create consumer `{consumer}` on stream `{stream}`")]
    Consumer {
        /// The consumer.
        consumer: String,
        /// The stream.
        stream: String,
        /// What JetStream said.
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    /// The NATS server is older than a configured feature needs.
    #[error(
        "consumer `{consumer}`: {feature} needs nats-server {needs} or later; this one is {server}"
    )]
    ServerTooOld {
        /// The consumer.
        consumer: String,
        /// What needs the newer server.
        feature: &'static str,
        /// The first version that has it.
        needs: &'static str,
        /// The server's version.
        server: String,
    },
    /// Where a new durable starts (`StartAt`) could not be resolved.
    #[error("cannot find where consumer `{consumer}` starts on stream `{stream}`")]
    Start {
        /// The consumer.
        consumer: String,
        /// The stream.
        stream: String,
        /// What JetStream said.
        #[source]
        source: async_nats::Error,
    },
}

/// Builds a [`Consumer`]: name it, add handlers, then [`build`](Self::build)
/// it, which checks the handlers, or [`spawn`](Self::spawn) it at once.
#[derive(Debug)]
pub struct ConsumerBuilder {
    client: async_nats::Client,
    db: DatabaseConnection,
    name: String,
    stream: Option<String>,
    namespace: Option<String>,
    filter_subjects: Vec<String>,
    handlers: Handlers,
    /// The first conflict `on` met, reported by `build`.
    conflict: Option<DuplicateHandler>,
    config: ConsumerConfig,
    start_at: StartAt,
}

/// The inbox consumer: a JetStream durable pull consumer whose handlers take
/// effect once per event.
///
/// Each message is handled by [`outbox_core::inbox::Handlers`] in one database
/// transaction that records `(consumer, event id)` in `outbox_inbox` before
/// the handler runs; the message is acknowledged only after that commit. A
/// redelivery (after a crash between commit and ack, say) finds the inbox row
/// and is acknowledged without running the handler again.
///
/// ```no_run
/// # use outbox_core::{OutboxEvent, inbox::Metadata};
/// # use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};
/// # #[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
/// # #[outbox(exchange = "orders", routing_key = "created", key = order_id)]
/// # struct OrderCreated { order_id: i64 }
/// async fn reserve_stock(event: OrderCreated, meta: Metadata, db: &DatabaseTransaction) -> Result<(), DbErr> {
///     // Writes through `db` commit with the inbox row: once per event.
///     Ok(())
/// }
///
/// # async fn run(db: DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("127.0.0.1:4222").await?;
/// let consumer = outbox_nats::Consumer::builder(client, db, "inventory")
///     .on::<OrderCreated, _>(reserve_stock)
///     .build()?; // a conflict between handlers, or none, is reported here
/// let running = consumer.spawn().await?;
/// // ...
/// running.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    client: async_nats::Client,
    db: DatabaseConnection,
    name: String,
    /// The stream, namespaced.
    stream: String,
    namespace: Option<String>,
    /// The subject filters, namespaced.
    filters: Vec<String>,
    handlers: Handlers,
    config: ConsumerConfig,
    start_at: StartAt,
}

impl Consumer {
    /// A consumer named `name`: its JetStream durable name and its key in the
    /// inbox, so keep it stable across deployments.
    pub fn builder(
        client: async_nats::Client,
        db: DatabaseConnection,
        name: impl Into<String>,
    ) -> ConsumerBuilder {
        ConsumerBuilder {
            client,
            db,
            name: name.into(),
            stream: None,
            namespace: None,
            filter_subjects: Vec::new(),
            handlers: Handlers::new(),
            conflict: None,
            config: ConsumerConfig::default(),
            start_at: StartAt::default(),
        }
    }
}

impl ConsumerBuilder {
    /// Handles events of type `E` (every event type an enum carries) at `E::VERSION`
    /// with `handler`: an `async fn(E, Metadata, &DatabaseTransaction) -> Result<(), Err>`
    /// or a type implementing [`Handler<E>`].
    pub fn on<E, H>(mut self, handler: H) -> Self
    where
        E: OutboxEvent,
        H: Handler<E>,
    {
        if let Err(error) = self.handlers.insert::<E, H>(handler) {
            self.conflict.get_or_insert(error);
        }
        self
    }

    /// The stream to read (default: the stream of the handled event types).
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// Reads the stream and subjects the relay's publisher wrote under this
    /// namespace (see `JetStreamPublisher::namespace`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Receives only messages on these subjects (without namespace; wildcards
    /// allowed). More than one needs nats-server 2.10 or later.
    pub fn filter_subjects<S: Into<String>>(
        mut self,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        self.filter_subjects = subjects.into_iter().map(Into::into).collect();
        self
    }

    /// Transactions handling messages at once (default 8); each takes a
    /// batch of up to [`batch_size`](Self::batch_size) messages of distinct keys.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n.max(1);
        self
    }

    /// Messages handled in one transaction, at most (default 32; 1 handles
    /// each message in a transaction of its own). A batch is what has
    /// arrived when a transaction starts, never waited for: its messages
    /// commit together, one WAL flush for all, each in a savepoint of its
    /// own so that a failing handler rolls back only its own effect.
    ///
    /// Past 64 savepoints that write, a PostgreSQL transaction overflows the
    /// subtransaction cache every snapshot consults: 128 measured slower than
    /// 32, and a `#[transactional]` handler takes a savepoint of its own.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n.max(1);
        self
    }

    /// Deliveries of a failing message before it is dead-lettered (default 5).
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.config.max_deliveries = n.max(1);
        self
    }

    /// The delay before a failed message is tried again (default 1 s doubling to 60 s).
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.config.retry_backoff = backoff;
        self
    }

    /// How long JetStream waits for an ack before redelivering (default 30 s).
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.config.ack_wait = ack_wait;
        self
    }

    /// How long inbox rows are kept before they are deleted (default 7 days);
    /// keep them longer than a message can be redelivered.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.config.inbox_retention = retention;
        self
    }

    /// Where this consumer name starts the first time it runs (default
    /// [`StartAt::All`]: every event the stream holds). See [`StartAt`].
    pub fn start_at(mut self, start: StartAt) -> Self {
        self.start_at = start;
        self
    }

    /// Runs this consumer name as a group: every process started with it
    /// shares the name's partitions (a message's partition is its key's
    /// hash), each key handled by one live process at a time, in order.
    /// Processes past the partition count stand by. Without it, one process
    /// runs the name and a second is refused. See `docs/consumer-groups.md`.
    pub fn group(mut self, group: GroupConfig) -> Self {
        self.config.group = Some(group);
        self
    }

    /// Acknowledges and counts (metric `outbox_inbox_messages_total{outcome="skipped"}`)
    /// messages whose event type or version no handler takes, instead of dead-lettering them.
    pub fn skip_unhandled(mut self) -> Self {
        self.config.skip_unhandled = true;
        self
    }

    /// Checks the handlers (a conflict between two, or none at all) and
    /// which stream they read; nothing is asked of NATS or the database yet.
    pub fn build(self) -> Result<Consumer, ConsumerError> {
        core::check_handlers(&self.name, &self.handlers, self.conflict)?;
        let stream = match self.stream {
            Some(stream) => stream,
            None => single_stream(&self.name, &self.handlers)?,
        };
        let ns = self.namespace.as_deref();
        let stream = stream_name(&stream, ns);
        let filters: Vec<String> = (self.filter_subjects.iter())
            .map(|subject| namespaced(subject, ns))
            .collect();
        Ok(Consumer {
            client: self.client,
            db: self.db,
            name: self.name,
            stream,
            namespace: self.namespace,
            filters,
            handlers: self.handlers,
            config: self.config,
            start_at: self.start_at,
        })
    }

    /// [`build`](Self::build)s the consumer and [`spawn`](Consumer::spawn)s it.
    pub async fn spawn(self) -> Result<ConsumerHandle, ConsumerError> {
        self.build()?.spawn().await
    }
}

impl Consumer {
    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream it reads, namespaced.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// How it runs.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Creates the durable consumer (or finds it) and starts handling messages.
    pub async fn spawn(self) -> Result<ConsumerHandle, ConsumerError> {
        let server = self.client.server_info().version;
        if self.filters.len() > 1 && !at_least(&server, (2, 10)) {
            return Err(ConsumerError::ServerTooOld {
                consumer: self.name,
                feature: "more than one filter subject",
                needs: "2.10",
                server,
            });
        }
        let context = jetstream::new(self.client.clone());
        let durable = Durable {
            stream: &self.stream,
            name: &self.name,
            filters: &self.filters,
            config: &self.config,
            start_at: self.start_at,
        };
        // A group member reads from its partitions' positions, kept in the
        // database; a new group's start there.
        let (stream_handle, consumer, start_after) = match self.config.group {
            Some(_) => {
                let stream = durable.stream(&context).await?;
                let start_after = durable.start_after(&stream).await?;
                (stream, None, start_after)
            }
            None => {
                let (stream, consumer) = durable.create(&context).await?;
                (stream, Some(consumer), 0)
            }
        };
        let transport = transport::JetStream {
            client: self.client,
            consumer,
            stream: stream_handle,
            filters: self.filters,
            name: self.name.clone(),
        };
        let mut identity = Identity::new(self.name, self.stream);
        identity.namespace = self.namespace;
        identity.start_after = start_after;
        let handle = core::spawn(transport, self.db, self.handlers, identity, self.config).await?;
        Ok(handle)
    }
}

/// Whether server version `version` (`2.9.10`, `2.11.0-RC.1`) is at least `(major, minor)`.
fn at_least(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

fn single_stream(consumer: &str, handlers: &Handlers) -> Result<String, ConsumerError> {
    let streams = handlers.streams();
    match streams.iter().next() {
        Some(stream) if streams.len() == 1 => Ok((*stream).to_owned()),
        _ => Err(ConsumerError::SeveralStreams {
            consumer: consumer.to_owned(),
            streams: streams.iter().map(|s| (*s).to_owned()).collect(),
        }),
    }
}

/// The durable JetStream consumer of a consumer name, as `spawn` creates it.
struct Durable<'a> {
    stream: &'a str,
    name: &'a str,
    filters: &'a [String],
    config: &'a ConsumerConfig,
    start_at: StartAt,
}

impl Durable<'_> {
    /// Looks the stream up.
    async fn stream(&self, context: &Context) -> Result<jetstream::stream::Stream, ConsumerError> {
        let stream = self.stream;
        context.get_stream(stream).await.map_err(|source| {
            if crate::streams::is_missing(&source) {
                ConsumerError::StreamNotFound(stream.to_owned())
            } else {
                ConsumerError::Stream {
                    stream: stream.to_owned(),
                    source,
                }
            }
        })
    }

    /// The stream sequence a new group starts after, as `start_at` gives it.
    async fn start_after(&self, stream: &jetstream::stream::Stream) -> Result<u64, ConsumerError> {
        let policy = (self.start_at.deliver_policy(stream).await).map_err(|source| {
            ConsumerError::Start {
                consumer: self.name.to_owned(),
                stream: self.stream.to_owned(),
                source,
            }
        })?;
        Ok(match policy {
            DeliverPolicy::ByStartSequence { start_sequence } => start_sequence.saturating_sub(1),
            _ => 0,
        })
    }

    /// Looks the stream up and creates the durable on it, or finds it.
    async fn create(
        self,
        context: &Context,
    ) -> Result<
        (
            jetstream::stream::Stream,
            jetstream::consumer::Consumer<pull::Config>,
        ),
        ConsumerError,
    > {
        let stream_handle = self.stream(context).await?;
        let Self {
            stream,
            name,
            filters,
            config,
            start_at,
        } = self;
        let (filter_subject, filter_subjects) = filter_fields(filters);
        // An existing durable keeps its position: where a new one would start
        // is looked up only for a name the stream does not know yet.
        let deliver_policy = match stream_handle.consumer_info(name).await {
            Ok(existing) => existing.config.deliver_policy,
            Err(_) => (start_at.deliver_policy(&stream_handle).await).map_err(|source| {
                ConsumerError::Start {
                    consumer: name.to_owned(),
                    stream: stream.to_owned(),
                    source,
                }
            })?,
        };
        let consumer_config = pull::Config {
            filter_subject,
            filter_subjects,
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy,
            ack_wait: config.ack_wait,
            // The consumer counts deliveries itself and dead-letters past its
            // bound; a server-side bound would stop redelivering silently.
            max_deliver: -1,
            max_ack_pending: i64::try_from(config.max_ack_pending).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let consumer = stream_handle
            .get_or_create_consumer(name, consumer_config)
            .await
            .map_err(|source| ConsumerError::Consumer {
                consumer: name.to_owned(),
                stream: stream.to_owned(),
                source,
            })?;
        Ok((stream_handle, consumer))
    }
}

/// Subject filters as JetStream's consumer configurations take them: one
/// subject, or several (nats-server 2.10 or later).
fn filter_fields(filters: &[String]) -> (String, Vec<String>) {
    match filters {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    }
}
