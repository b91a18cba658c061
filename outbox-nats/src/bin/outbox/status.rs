//! `outbox status`: what the outbox holds, as text or JSON, and a probe's
//! exit status when a threshold is breached.

use std::process::ExitCode;

use outbox_core::Status;
use outbox_core::relay::logical::SlotStatus;
use sea_orm::DatabaseConnection;

use crate::relay::parse_seconds;

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Breached when more events than this are pending.
    #[arg(long)]
    max_pending: Option<u64>,
    /// Breached when the oldest pending event is older than this many seconds.
    #[arg(long, value_parser = parse_seconds, allow_hyphen_values = true)]
    max_age: Option<f64>,
    /// Breached when the relay, or any one consumer, has more dead letters than this.
    #[arg(long)]
    max_dead_letters: Option<u64>,
    /// Breached when a logical relay's slot is more than this many bytes of
    /// WAL behind (the WAL PostgreSQL must keep for it).
    #[arg(long)]
    max_slot_lag_bytes: Option<i64>,
    /// Breached when a logical relay's slot recorded no progress for this
    /// many seconds (its relay is down or stalled; heartbeats move it every
    /// 10 s while idle).
    #[arg(long, value_parser = parse_seconds, allow_hyphen_values = true)]
    max_slot_lag_seconds: Option<f64>,
}

/// The thresholds `status` breaches.
fn breached(args: &StatusArgs, status: &Status, slots: &[SlotStatus]) -> Vec<&'static str> {
    let mut breached = Vec::new();
    if args
        .max_pending
        .is_some_and(|max| status.outbox.pending > max)
    {
        breached.push("max_pending");
    }
    if let (Some(max), Some(age)) = (args.max_age, status.outbox.oldest_pending_age())
        && age > max
    {
        breached.push("max_age");
    }
    let most_dead = (status.consumers.iter().map(|c| c.dead_letters))
        .chain([status.outbox.dead_letters])
        .max()
        .unwrap_or(0);
    if args.max_dead_letters.is_some_and(|max| most_dead > max) {
        breached.push("max_dead_letters");
    }
    if let Some(max) = args.max_slot_lag_bytes
        && slots.iter().any(|slot| slot.lag_bytes > max)
    {
        breached.push("max_slot_lag_bytes");
    }
    if let Some(max) = args.max_slot_lag_seconds
        && slots
            .iter()
            .any(|slot| slot.lag_seconds.is_some_and(|lag| lag > max))
    {
        breached.push("max_slot_lag_seconds");
    }
    breached
}

pub(crate) async fn run(
    db: &DatabaseConnection,
    args: &StatusArgs,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    outbox_core::check_schema(db).await?;
    let status = outbox_core::status(db).await?;
    let slots = outbox_core::relay::logical::slots(db).await?;
    let breached = breached(args, &status, &slots);
    let outbox = &status.outbox;
    if args.json {
        let consumers: Vec<_> = (status.consumers.iter())
            .map(|consumer| {
                serde_json::json!({
                    "name": consumer.name,
                    "dead_letters": consumer.dead_letters,
                    "replay_requested": consumer.replay_requested,
                })
            })
            .collect();
        let groups: Vec<_> = (status.groups.iter())
            .map(|group| {
                let partitions: Vec<_> = (group.partitions.iter())
                    .map(|p| {
                        serde_json::json!({
                            "index": p.index,
                            "owner": p.owner,
                            "epoch": p.epoch,
                            "position": p.position,
                            "behind": p.behind,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": group.name,
                    "members": group.members,
                    "stream_end": group.stream_end,
                    "partitions": partitions,
                })
            })
            .collect();
        let report = serde_json::json!({
            "pending": outbox.pending,
            "oldest_pending": outbox.oldest_pending,
            "oldest_pending_age_seconds": outbox.oldest_pending_age(),
            "dead_letters": outbox.dead_letters,
            "scheduled": status.scheduled,
            "next_scheduled": status.next_scheduled,
            "inbox_dead_letters": status.inbox_dead_letters(),
            "consumers": consumers,
            "groups": groups,
            "slots": slots.iter().map(|slot| serde_json::json!({
                "name": slot.slot,
                "active": slot.active,
                "capturing": slot.capturing,
                "lag_bytes": slot.lag_bytes,
                "retained_bytes": slot.retained_bytes,
                "lag_seconds": slot.lag_seconds,
            })).collect::<Vec<_>>(),
            "breached": breached,
        });
        println!("{report}");
    } else {
        println!("pending events: {}", outbox.pending);
        match (outbox.oldest_pending, outbox.oldest_pending_age()) {
            (Some(oldest), Some(age)) => println!("oldest pending: {oldest} ({age:.0}s ago)"),
            _ => println!("oldest pending: -"),
        }
        println!("dead letters:   {} (relay)", outbox.dead_letters);
        match status.next_scheduled {
            Some(next) => println!("scheduled:      {} (next due {next})", status.scheduled),
            None => println!("scheduled:      0"),
        }
        println!("consumer dead letters: {}", status.inbox_dead_letters());
        for consumer in &status.consumers {
            println!(
                "  {}: {} ({} replay requested)",
                consumer.name, consumer.dead_letters, consumer.replay_requested
            );
        }
        for group in &status.groups {
            let owned = |member: &str| {
                (group.partitions.iter())
                    .filter(|p| p.owner.as_deref() == Some(member))
                    .map(|p| p.index.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let free = group
                .partitions
                .iter()
                .filter(|p| p.owner.is_none())
                .count();
            let behind = match group.partitions.iter().filter_map(|p| p.behind).max() {
                Some(most) => format!(", at most {most} messages behind"),
                None => String::new(),
            };
            println!(
                "consumer group {}: {} members, {} partitions ({free} without owner{behind})",
                group.name,
                group.members.len(),
                group.partitions.len()
            );
            for member in &group.members {
                println!("  {member}: partitions {}", owned(member));
            }
        }
        for slot in &slots {
            let lag = slot
                .lag_seconds
                .map_or("-".to_owned(), |s| format!("{s:.0}s"));
            println!(
                "slot {}: {}, {} bytes behind, {} retained, last progress {lag} ago{}",
                slot.slot,
                if slot.active {
                    "read by a relay"
                } else {
                    "not read"
                },
                slot.lag_bytes,
                slot.retained_bytes,
                if slot.capturing {
                    ""
                } else {
                    " (not capturing)"
                },
            );
        }
        if !breached.is_empty() {
            println!("breached:       {}", breached.join(", "));
        }
    }
    Ok(if breached.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
