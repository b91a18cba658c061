//! The inbox consumer's loop, the same for every broker: it pulls messages
//! through a [`Transport`], runs their handlers through the inbox
//! ([`crate::inbox`]) so that each takes effect once per event, and keeps
//! per-key order, retries, dead letters, replays and the inbox's purge.
//!
//! `outbox-nats` builds a consumer on JetStream (`outbox_nats::Consumer`)
//! and starts this loop with [`spawn`]. What each part holds:
//!
//! - `transport`: the seam a broker implements;
//! - `held`: a message the consumer holds, its metadata and its dead letter;
//! - `keys` and `pending`: per-key order, ready batches and retry delays,
//!   state machines without I/O;
//! - `worker`: the loop, its state in a struct with a method per step;
//! - [`group`]: one consumer name in several processes, the partitions'
//!   ownership, leases and fence.

pub mod group;
mod held;
mod keys;
mod pending;
mod transport;
mod worker;

use std::time::Duration;

use sea_orm::DatabaseConnection;

pub use transport::{Message, Pull, PullError, Pulled, Settle, Span, Transport};

use crate::Backoff;
use crate::background::Background;
use crate::inbox::{self, ConsumerGuard, DuplicateHandler, Handlers, Taken};
use group::{GroupConfig, GroupError, Member};
use worker::Ownership;

/// How long [`spawn`] waits for a second connection of the pool: longer
/// than opening one takes, short enough that a misconfigured pool fails fast.
const POOL_CHECK_WAIT: Duration = Duration::from_secs(5);

/// How a consumer runs. The defaults are those of `Default`; a transport's
/// builder sets the fields (`outbox_nats::ConsumerBuilder`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Transactions at once, each a batch of messages (default 8).
    pub max_in_flight: usize,
    /// Messages handled in one transaction, at most (default 32).
    pub batch_size: usize,
    /// Deliveries of a failing message before it is dead-lettered (default 5).
    pub max_deliveries: u64,
    /// Delay before a failed message is tried again (default 1 s doubling to 60 s).
    pub retry_backoff: Backoff,
    /// How long the broker waits for an ack before redelivering (default
    /// 30 s); held messages' deadlines are extended every half of it.
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged, at most (default 1,000).
    pub max_ack_pending: usize,
    /// How long inbox rows are kept (default 7 days); must outlast any redelivery.
    pub inbox_retention: Duration,
    /// Acknowledge and count, rather than dead-letter, messages of an event
    /// type or version no handler takes (default: dead-letter).
    pub skip_unhandled: bool,
    /// Run as a member of the consumer name's group, sharing its partitions
    /// with the other processes running it (default: `None`, the one process
    /// running the name). See [`group`].
    pub group: Option<GroupConfig>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 8,
            batch_size: 32,
            max_deliveries: 5,
            retry_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1_000,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            skip_unhandled: false,
            group: None,
        }
    }
}

/// What a consumer is called and what it reads, as its inbox rows, dead
/// letters and logs name them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Identity {
    /// The consumer's name: its key in the inbox, stable across deployments.
    pub name: String,
    /// The stream it reads, as its dead letters record it.
    pub stream: String,
    /// The subject prefix the relay's publisher wrote under, taken off the
    /// subjects handlers see.
    pub namespace: Option<String>,
    /// The stream sequence a new group's partitions start after (0: the
    /// stream's first message), as the transport resolved the user's start
    /// position; a group that exists keeps its positions.
    pub start_after: u64,
}

impl Identity {
    /// Consumer `name` of `stream`, without a namespace, from the stream's start.
    pub fn new(name: impl Into<String>, stream: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            stream: stream.into(),
            namespace: None,
            start_after: 0,
        }
    }
}

/// Why a consumer could not start, whatever its broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// No handler was registered.
    #[error("consumer `{0}` has no handlers")]
    NoHandlers(String),
    /// Two handlers claim one event type and version.
    #[error(transparent)]
    DuplicateHandler(#[from] DuplicateHandler),
    /// Another process runs this consumer name: per-key order needs one.
    #[error(
        "consumer `{0}` is already running in another process; run one process per consumer name (per-key order depends on it)"
    )]
    AlreadyRunning(String),
    /// The database pool cannot hold the consumer's lock and run a handler
    /// at once: started, the consumer would handle nothing.
    #[error(
        "consumer `{consumer}` needs at least {needs} connections of its database pool at once \
         (one holds its lock, the others run handlers: max_in_flight + 2 for full speed), but the \
         pool gave no second connection within {waited:?}; raise the pool's max_connections"
    )]
    PoolTooSmall {
        /// The consumer.
        consumer: String,
        /// The connections it needs at least.
        needs: u32,
        /// How long it waited for the second one.
        waited: Duration,
    },
    /// The name runs as a group in other processes (`group` set there),
    /// or, asked to join its group, as a single consumer: the two cannot
    /// share a name, each keeping key order its own way.
    #[error(
        "consumer `{consumer}` runs {elsewhere} elsewhere; start every process of one consumer name the same way (with or without `group`)"
    )]
    MixedWithGroup {
        /// The consumer.
        consumer: String,
        /// How it runs elsewhere: `as a group` or `as a single consumer`.
        elsewhere: &'static str,
    },
    /// The consumer's group could not be joined.
    #[error("cannot join the group of consumer `{consumer}`")]
    Group {
        /// The consumer.
        consumer: String,
        /// Why.
        #[source]
        source: GroupError,
    },
    /// The database could not be asked for the consumer's lock.
    #[error("cannot take the lock of consumer `{consumer}` in the database")]
    Guard {
        /// The consumer.
        consumer: String,
        /// What the database said.
        #[source]
        source: sea_orm::DbErr,
    },
}

/// Checks `handlers` before anything is set up for them: a conflict `on`
/// met while registering, or none registered at all.
pub fn check_handlers(
    name: &str,
    handlers: &Handlers,
    conflict: Option<DuplicateHandler>,
) -> Result<(), StartError> {
    if let Some(conflict) = conflict {
        return Err(conflict.into());
    }
    if handlers.is_empty() {
        return Err(StartError::NoHandlers(name.to_owned()));
    }
    Ok(())
}

/// Starts consumer `identity` over `transport`: checks that the pool can
/// hold its lock and run a handler at once, takes its lock (one process per
/// name), then runs its loop on a task of its own. With
/// [`ConsumerConfig::group`], it joins the name's group instead, and takes
/// its partitions at its first look at the group.
pub async fn spawn<T: Transport>(
    transport: T,
    db: DatabaseConnection,
    handlers: Handlers,
    identity: Identity,
    config: ConsumerConfig,
) -> Result<ConsumerHandle, StartError> {
    let Identity {
        name,
        stream,
        namespace,
        start_after,
    } = identity;
    check_handlers(&name, &handlers, None)?;
    let ownership = match config.group {
        Some(group) => Ownership::Group(member(&db, &name, group, start_after).await?),
        None => Ownership::Sole(sole(&db, &name).await?),
    };
    let member = match &ownership {
        Ownership::Group(member) => Some(member.id().to_owned()),
        Ownership::Sole(_) => None,
    };
    let worker = worker::Worker {
        transport,
        db,
        handlers,
        name,
        stream_name: stream,
        namespace,
        settles: config.group.is_none(),
        config,
    };
    let task = Background::spawn(|stopped| worker.run(ownership, stopped));
    Ok(ConsumerHandle { task, member })
}

/// Joins consumer `name`'s group, unless a single consumer runs the name.
async fn member(
    db: &DatabaseConnection,
    name: &str,
    group: GroupConfig,
    start_after: u64,
) -> Result<Member, StartError> {
    let guard_error = |source| StartError::Guard {
        consumer: name.to_owned(),
        source,
    };
    let (guard, taken) = ConsumerGuard::take(db, name).await.map_err(guard_error)?;
    guard.release().await;
    if taken == Taken::Elsewhere {
        return Err(StartError::MixedWithGroup {
            consumer: name.to_owned(),
            elsewhere: "as a single consumer",
        });
    }
    Member::join(db, name, group, start_after)
        .await
        .map_err(|source| StartError::Group {
            consumer: name.to_owned(),
            source,
        })
}

/// Makes this process the one running consumer `name`: checks that the name
/// does not run as a group and that the pool can hold its lock and run a
/// handler at once, then takes the lock.
async fn sole(db: &DatabaseConnection, name: &str) -> Result<ConsumerGuard, StartError> {
    let guard_error = |source| StartError::Guard {
        consumer: name.to_owned(),
        source,
    };
    // Without the groups' table (a schema before migration 6), no group runs.
    let now = chrono::Utc::now().timestamp_millis();
    if !(group::members(db, name, now).await)
        .unwrap_or_default()
        .is_empty()
    {
        return Err(StartError::MixedWithGroup {
            consumer: name.to_owned(),
            elsewhere: "as a group",
        });
    }
    let waited = POOL_CHECK_WAIT;
    if !(inbox::pool_is_large_enough(db, waited).await).map_err(guard_error)? {
        return Err(StartError::PoolTooSmall {
            consumer: name.to_owned(),
            needs: inbox::CONNECTIONS_NEEDED,
            waited,
        });
    }
    // Taken last: nothing after it can fail, so a held lock is never left
    // behind by a failed `spawn` (MySQL's would stay on a pooled connection).
    let (guard, taken) = ConsumerGuard::take(db, name).await.map_err(guard_error)?;
    if taken == Taken::Elsewhere {
        return Err(StartError::AlreadyRunning(name.to_owned()));
    }
    Ok(guard)
}

/// A running consumer. Dropping it leaves the consumer running; call
/// [`shutdown`](Self::shutdown) to stop it cleanly.
#[derive(Debug)]
pub struct ConsumerHandle {
    task: Background,
    member: Option<String>,
}

impl ConsumerHandle {
    /// This process's id in its consumer group, as `outbox status` and the
    /// logs name it; `None` for a single consumer. Each start joins as a
    /// new member.
    pub fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }

    /// Stops taking messages, lets the handlers in flight finish (commit and
    /// ack), returns the messages not started to the broker for redelivery,
    /// then stops. Fails only if the consumer's task panicked, like
    /// `RelayHandle::shutdown`.
    pub async fn shutdown(self) -> Result<(), tokio::task::JoinError> {
        self.task.shutdown().await
    }
}
