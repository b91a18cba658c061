//! `outbox slot drop`: go back from the logical relay to the polling one,
//! losing nothing.

use outbox_core::relay::Relay;
use outbox_core::relay::logical::retire;
use outbox_nats::JetStreamPublisher;
use sea_orm::DatabaseConnection;

use crate::nats::NatsArgs;

#[derive(clap::Subcommand)]
pub(crate) enum SlotCommand {
    /// Stop capturing events into the slot (they are rows for a polling
    /// relay again), publish what it still holds, then drop it. Stop the
    /// logical relays first.
    Drop(DropArgs),
}

#[derive(clap::Args)]
pub(crate) struct DropArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Prefix of every subject and stream name, as the relay was given it.
    #[arg(long, env = "OUTBOX_NAMESPACE")]
    namespace: Option<String>,
    /// The slot (default `outbox_<schema>`).
    #[arg(long, env = "OUTBOX_SLOT")]
    slot: Option<String>,
}

pub(crate) async fn run(
    db: DatabaseConnection,
    url: &str,
    command: SlotCommand,
) -> Result<(), Box<dyn std::error::Error>> {
    let SlotCommand::Drop(args) = command;
    outbox_core::check_schema(&db).await?;
    let client = args.nats.config()?.connect().await?;
    let mut publisher = JetStreamPublisher::new(client);
    if let Some(namespace) = args.namespace {
        publisher = publisher.namespace(namespace);
    }
    let relay = Relay::builder(db, publisher).build();
    retire(crate::relay::logical(relay, url, args.slot)?).await?;
    println!("the slot is dropped; events are rows for the polling relay again");
    Ok(())
}
