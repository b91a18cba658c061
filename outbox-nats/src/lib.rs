//! NATS JetStream transport of the `outbox` framework.
//!
//! - [`JetStreamPublisher`] publishes outbox events for the relay of
//!   `outbox_core::relay`, with pipelined acknowledgements and the event id as
//!   `Nats-Msg-Id`, so that JetStream drops re-published copies.
//! - [`provision`] creates or checks the stream of each exchange.
//! - [`Namespace`] makes the publisher, the streams and the consumers of
//!   one namespace, said once.
//! - [`Consumer`] feeds JetStream messages to typed handlers through the
//!   inbox (`outbox_core::inbox`), so that each handler's effect happens once per event.
//! - [`NatsConfig`] connects to a server list with credentials and TLS,
//!   waiting for NATS at the first connection.
//! - The `outbox` command (feature `cli`, off by default: a library user gets
//!   neither clap nor the other databases' drivers) runs a relay as its own
//!   process: `cargo install outbox-nats --features cli`.
//!
//! Metrics go through the `metrics` facade. To serve them to Prometheus from
//! an application running a relay and consumers, install an exporter before
//! spawning them, e.g. `metrics_exporter_prometheus::PrometheusBuilder::new()
//! .with_http_listener(([0, 0, 0, 0], 9464)).install()?` (the command does
//! this with `--metrics-addr`).
//!
//! ```no_run
//! # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::relay::Relay;
//! use outbox_nats::{JetStreamPublisher, provision, streams_from_registry};
//!
//! use outbox_nats::async_nats;
//!
//! let publisher = JetStreamPublisher::new(async_nats::connect("127.0.0.1:4222").await?);
//! let relay = Relay::builder(db, publisher.clone()).build();
//! let window = relay.config().retry_horizon().max(std::time::Duration::from_secs(120));
//! provision(publisher.context(), &streams_from_registry(None)?, window).await?;
//! let handle = relay.spawn();
//! # handle.shutdown().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod acks;
mod connect;
mod consumer;
mod namespace;
mod publisher;
mod streams;

/// The async-nats this crate is built against. Its `Client` is what
/// [`JetStreamPublisher`] and [`Consumer`] take: use this one
/// (`outbox_nats::async_nats::connect`), or depend on the same version
/// (0.52), or the compiler will see two different `Client` types.
pub use async_nats;

pub use acks::{Refusal, Unanswered};
pub use connect::{ConnectError, NatsAuth, NatsConfig, NatsTls, Secret};
pub use consumer::{Consumer, ConsumerBuilder, ConsumerError, ConsumerHandle, StartAt};
pub use namespace::{Namespace, NamespaceProvisionError};
pub use publisher::{InvalidHeader, JetStreamPublisher, headers};
pub use streams::{
    ProvisionError, RegistryStreamsError, StreamSettings, StreamSpec, provision,
    streams_from_registry,
};
