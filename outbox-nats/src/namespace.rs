//! One place to say which namespace a service's publisher, streams and
//! consumers live under, instead of once for each.

use std::time::Duration;

use async_nats::jetstream::{self, Context};
use sea_orm::DatabaseConnection;

use crate::consumer::{Consumer, ConsumerBuilder};
use crate::publisher::JetStreamPublisher;
use crate::streams::{
    ProvisionError, RegistryStreamsError, StreamSpec, provision, streams_from_registry,
};

/// A NATS client and the namespace (subject and stream-name prefix) of
/// everything made from it: the relay's publisher, the streams and the
/// consumers. Several deployments (staging and production, or one per
/// test) then share one NATS account without seeing each other.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_nats::{Namespace, async_nats};
///
/// let nats = Namespace::new(async_nats::connect("127.0.0.1:4222").await?, "staging");
/// let publisher = nats.publisher(); // subjects `staging.<exchange>.…`
/// nats.provision_registry(std::time::Duration::from_secs(120)).await?; // streams `STAGING_<STREAM>`
/// let consumer = nats.consumer(db, "billing"); // reads `STAGING_ORDERS`, say
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Namespace {
    client: async_nats::Client,
    name: Option<String>,
}

impl Namespace {
    /// Everything under `name`.
    pub fn new(client: async_nats::Client, name: impl Into<String>) -> Self {
        Self {
            client,
            name: Some(name.into()),
        }
    }

    /// No namespace: subjects and streams as the events name them.
    pub fn none(client: async_nats::Client) -> Self {
        Self { client, name: None }
    }

    /// The namespace, if there is one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context of the client.
    pub fn context(&self) -> Context {
        jetstream::new(self.client.clone())
    }

    /// A publisher for the relay, writing under the namespace.
    pub fn publisher(&self) -> JetStreamPublisher {
        let publisher = JetStreamPublisher::new(self.client.clone());
        match &self.name {
            Some(name) => publisher.namespace(name.clone()),
            None => publisher,
        }
    }

    /// The streams of the event types linked into this program, in the
    /// namespace (see [`streams_from_registry`]).
    pub fn streams_from_registry(&self) -> Result<Vec<StreamSpec>, RegistryStreamsError> {
        streams_from_registry(self.name())
    }

    /// Creates or checks [`streams_from_registry`](Self::streams_from_registry)'s
    /// streams (see [`provision`]); `duplicate_window` at least the relay's
    /// retry horizon.
    pub async fn provision_registry(
        &self,
        duplicate_window: Duration,
    ) -> Result<(), NamespaceProvisionError> {
        let streams = self.streams_from_registry()?;
        provision(&self.context(), &streams, duplicate_window).await?;
        Ok(())
    }

    /// A consumer named `name`, reading under the namespace (see [`Consumer::builder`]).
    pub fn consumer(&self, db: DatabaseConnection, name: impl Into<String>) -> ConsumerBuilder {
        let builder = Consumer::builder(self.client.clone(), db, name);
        match &self.name {
            Some(namespace) => builder.namespace(namespace.clone()),
            None => builder,
        }
    }
}

/// Why [`Namespace::provision_registry`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NamespaceProvisionError {
    /// The registry's streams could not be listed.
    #[error(transparent)]
    Registry(#[from] RegistryStreamsError),
    /// A stream could not be created or checked.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
}
