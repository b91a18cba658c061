//! `outbox status`: what the outbox holds, as text or JSON, and a probe's
//! exit status when a threshold is breached.

use std::process::ExitCode;

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
}

pub(crate) async fn run(
    db: &DatabaseConnection,
    args: &StatusArgs,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    outbox_core::check_schema(db).await?;
    let stats = outbox_core::relay::stats(db).await?;
    let age = (stats.oldest_pending)
        .map(|oldest| (chrono::Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1e3);
    let mut breached = Vec::new();
    if args.max_pending.is_some_and(|max| stats.pending > max) {
        breached.push("max_pending");
    }
    if let (Some(max), Some(age)) = (args.max_age, age)
        && age > max
    {
        breached.push("max_age");
    }
    if args.json {
        let report = serde_json::json!({
            "pending": stats.pending,
            "oldest_pending": stats.oldest_pending,
            "oldest_pending_age_seconds": age,
            "dead_letters": stats.dead_letters,
            "breached": breached,
        });
        println!("{report}");
    } else {
        println!("pending events: {}", stats.pending);
        match (stats.oldest_pending, age) {
            (Some(oldest), Some(age)) => println!("oldest pending: {oldest} ({age:.0}s ago)"),
            _ => println!("oldest pending: -"),
        }
        println!("dead letters:   {}", stats.dead_letters);
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
