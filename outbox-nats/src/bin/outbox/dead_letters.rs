//! `outbox dead-letters`: list, show, replay or discard dead letters, the
//! relay's or (with `--inbox`) the consumers'. Each action is one
//! transaction and prints what it did.

use chrono::{DateTime, Utc};
use clap::Subcommand;
use outbox_core::dead_letters::{self, Selection};
use outbox_core::entity::{inbox_dead_letter, outbox_dead_letter};
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Subcommand)]
pub(crate) enum DeadLetterCommand {
    /// One line per dead letter, newest first.
    List {
        #[command(flatten)]
        table: Table,
        /// How many to list.
        #[arg(long, default_value_t = 20)]
        limit: u64,
    },
    /// One dead letter in full, as JSON: payload, headers, error, attempts.
    Show {
        #[command(flatten)]
        table: Table,
        /// Its id (the first column of `list`).
        id: Uuid,
    },
    /// Hand the selected dead letters back: the relay's go back to the outbox
    /// with their event ids and attempts reset; the consumers' are handled
    /// again, once, by their running consumer.
    Replay {
        #[command(flatten)]
        table: Table,
        #[command(flatten)]
        selector: Selector,
    },
    /// Delete the selected dead letters.
    Discard {
        #[command(flatten)]
        table: Table,
        #[command(flatten)]
        selector: Selector,
    },
}

#[derive(clap::Args)]
pub(crate) struct Table {
    /// The consumers' dead letters (`outbox_inbox_dead_letters`) instead of the relay's.
    #[arg(long)]
    inbox: bool,
}

/// Which dead letters: one id, or all those matching every filter given.
#[derive(clap::Args)]
#[group(id = "selector", required = true, multiple = true)]
pub(crate) struct Selector {
    /// The dead letter with this id.
    #[arg(conflicts_with_all = ["event_type", "failed_after", "failed_before", "consumer", "all"])]
    id: Option<Uuid>,
    /// Those of this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Those dead-lettered at or after this time (RFC 3339, e.g. 2026-12-01T08:00:00Z).
    #[arg(long)]
    failed_after: Option<DateTime<Utc>>,
    /// Those dead-lettered before this time (RFC 3339).
    #[arg(long)]
    failed_before: Option<DateTime<Utc>>,
    /// Those of this consumer (with --inbox).
    #[arg(long, requires = "inbox")]
    consumer: Option<String>,
    /// Every dead letter of the table.
    #[arg(long, conflicts_with_all = ["event_type", "failed_after", "failed_before", "consumer"])]
    all: bool,
}

impl Selector {
    fn selection(&self) -> Selection {
        if let Some(id) = self.id {
            return Selection::id(id);
        }
        let mut selection = Selection::all();
        if let Some(event_type) = &self.event_type {
            selection = selection.event_type(event_type);
        }
        if let Some(at) = self.failed_after {
            selection = selection.failed_after(at);
        }
        if let Some(at) = self.failed_before {
            selection = selection.failed_before(at);
        }
        if let Some(consumer) = &self.consumer {
            selection = selection.consumer(consumer);
        }
        selection
    }
}

pub(crate) async fn run(
    db: &DatabaseConnection,
    command: DeadLetterCommand,
) -> Result<(), dead_letters::DeadLetterError> {
    use dead_letters::{discard, inbox, list, relay, show};
    type Relay = outbox_dead_letter::Entity;
    type Inbox = inbox_dead_letter::Entity;
    match command {
        DeadLetterCommand::List { table, limit } => {
            let all = Selection::all();
            let lines: Vec<String> = if table.inbox {
                (list::<Inbox>(db, &all, limit).await?.iter())
                    .map(inbox_line)
                    .collect()
            } else {
                (list::<Relay>(db, &all, limit).await?.iter())
                    .map(relay_line)
                    .collect()
            };
            for line in &lines {
                println!("{line}");
            }
            println!("{} shown", lines.len());
        }
        DeadLetterCommand::Show { table, id } => {
            let record = if table.inbox {
                inbox_record(&show::<Inbox>(db, id).await?)
            } else {
                relay_record(&show::<Relay>(db, id).await?)
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&record).unwrap_or_default()
            );
        }
        DeadLetterCommand::Replay { table, selector } => {
            let selection = selector.selection();
            let (ids, what) = if table.inbox {
                let ids = inbox::replay(db, &selection).await?;
                (ids, "handed back to their consumers")
            } else {
                (
                    relay::replay(db, &selection).await?,
                    "moved back to the outbox",
                )
            };
            print_done(&ids, what);
        }
        DeadLetterCommand::Discard { table, selector } => {
            let selection = selector.selection();
            let ids = if table.inbox {
                discard::<Inbox>(db, &selection).await?
            } else {
                discard::<Relay>(db, &selection).await?
            };
            print_done(&ids, "discarded");
        }
    }
    Ok(())
}

fn print_done(ids: &[Uuid], what: &str) {
    for id in ids {
        println!("{id}");
    }
    println!("{} dead letter(s) {what}", ids.len());
}

fn relay_line(l: &outbox_dead_letter::Model) -> String {
    format!(
        "{} {} v{} {} attempts={} failed_at={} error: {}",
        l.id, l.event_type, l.event_version, l.subject, l.attempts, l.failed_at, l.last_error
    )
}

fn inbox_line(l: &inbox_dead_letter::Model) -> String {
    format!(
        "{} consumer={} {}#{} {} event={} reason={} deliveries={} failed_at={}{} error: {}",
        l.id,
        l.consumer,
        l.stream,
        l.stream_sequence,
        l.subject,
        l.event_type.as_deref().unwrap_or("?"),
        l.reason,
        l.deliveries,
        l.failed_at,
        if l.replay_requested_at.is_some() {
            " replay-requested"
        } else {
            ""
        },
        l.error
    )
}

fn relay_record(l: &outbox_dead_letter::Model) -> Value {
    json!({
        "id": l.id,
        "event_type": l.event_type,
        "event_version": l.event_version,
        "exchange": l.exchange,
        "subject": l.subject,
        "partition_key": l.partition_key,
        "content_type": l.content_type,
        "headers": l.headers.as_deref().map(headers),
        "payload": payload(&l.payload),
        "created_at": l.created_at,
        "attempts": l.attempts,
        "error": l.last_error,
        "failed_at": l.failed_at,
    })
}

fn inbox_record(l: &inbox_dead_letter::Model) -> Value {
    json!({
        "id": l.id,
        "consumer": l.consumer,
        "stream": l.stream,
        "stream_sequence": l.stream_sequence,
        "subject": l.subject,
        "event_id": l.event_id,
        "event_type": l.event_type,
        "event_version": l.event_version,
        "partition_key": l.partition_key,
        "headers": headers(&l.headers),
        "payload": payload(&l.payload),
        "reason": l.reason,
        "error": l.error,
        "deliveries": l.deliveries,
        "failed_at": l.failed_at,
        "replay_requested_at": l.replay_requested_at,
    })
}

/// A headers column (a JSON object), as JSON, or as the text it holds.
fn headers(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// A payload as JSON when it is JSON, as text when it is UTF-8, else as
/// `{"hex": "..."}`.
fn payload(bytes: &[u8]) -> Value {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return value;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "hex": hex })
        }
    }
}
