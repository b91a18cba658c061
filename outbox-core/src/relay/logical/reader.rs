//! The logical relay's task: a session per replication connection, each
//! reading committed transactions from the slot, publishing their events
//! in rounds and confirming the slot past what is settled; between
//! sessions, standing by while another relay holds the slot, or backing
//! off while the database or the broker is down.

use std::time::{Duration, Instant};

use futures::FutureExt;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationEvent};
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use super::pending::{Pending, wait_for};
use super::slot::heartbeat_prefix;
use super::{LogicalError, LogicalRelay, slot, slot_name};
use crate::ErrorReport;
use crate::capture::{self, event_prefix};
use crate::entity::outbox_message::Model;
use crate::insert::insert_all;
use crate::relay::publish::{Batch, Delivery, Publisher};
use crate::relay::stats;

/// Gauge: WAL bytes since the slot's confirmed position.
const LAG_BYTES: &str = "outbox_logical_lag_bytes";
/// Gauge: seconds since the relay last recorded progress.
const LAG_SECONDS: &str = "outbox_logical_lag_seconds";
/// Counter: messages under the outbox's prefix that held no event.
const MALFORMED: &str = "outbox_logical_malformed_total";

/// How often a session about to read the slot looks again for rows
/// another relay is still delivering.
const ROWS_POLL: Duration = Duration::from_millis(50);

/// Messages the replication worker reads ahead of the rounds.
const STREAM_BUFFER: usize = 64;

/// The longest a round waits when nothing is due (it wakes sooner for a
/// retry, an event, a heartbeat or a poll).
const IDLE: Duration = Duration::from_secs(1);

/// How long, in tries of [`RELEASE_WAIT`], `retire` waits for a slot a
/// relay was just reading (its walsender exits a moment after it hung up).
const RELEASE_TRIES: u32 = 25;
const RELEASE_WAIT: Duration = Duration::from_millis(200);

/// Why a session ended, short of being told to stop.
enum Ended {
    /// Another relay holds the slot.
    Busy(String),
    Failed(LogicalError),
}

impl<E: Into<LogicalError>> From<E> for Ended {
    fn from(error: E) -> Self {
        Self::Failed(error.into())
    }
}

/// What the task tells the log once per change: standing by, failing, reading.
#[derive(Debug, Default)]
struct Health {
    failures: u32,
    standing_by: bool,
}

impl Health {
    fn started(&mut self, slot: &str) {
        if self.failures > 0 {
            tracing::info!(
                failed_sessions = self.failures,
                slot,
                "logical relay recovered"
            );
        } else {
            tracing::info!(slot, "logical relay reading the slot");
        }
        *self = Self::default();
    }
}

pub(super) async fn run<P: Publisher>(relay: LogicalRelay<P>, mut stopped: watch::Receiver<bool>) {
    let mut health = Health::default();
    while !*stopped.borrow() {
        let wait = match session(&relay, &mut stopped, &mut health, None).await {
            Ok(()) => break,
            Err(Ended::Busy(slot)) => {
                if !health.standing_by {
                    tracing::info!(slot, "another relay reads the slot; standing by");
                    health.standing_by = true;
                }
                relay.standby_poll
            }
            Err(Ended::Failed(error)) => {
                health.failures = health.failures.saturating_add(1);
                if health.failures == 1 {
                    tracing::warn!(error = %ErrorReport(&error), "logical relay cannot deliver; retrying with backoff");
                }
                relay.relay.config.outage.delay(health.failures)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Ok(()) = stopped.changed() => {}
        }
    }
    tracing::info!("logical relay stopped");
}

/// See [`super::retire`].
pub(super) async fn retire<P: Publisher>(relay: LogicalRelay<P>) -> Result<(), LogicalError> {
    let db = relay.relay.store.db();
    slot::preflight(db).await?;
    let slot = slot_name(&relay).await?;
    // Refused before the trigger goes while a relay reads the slot: it would
    // go on reading, and deliver the rows written from then on beside the
    // slot's older events. A relay just stopped lets go in a moment.
    let mut tries = 0;
    while slot::slot_status(db, &slot)
        .await?
        .is_some_and(|status| status.active)
    {
        if tries == RELEASE_TRIES {
            return Err(LogicalError::SlotInUse(slot));
        }
        tries += 1;
        tokio::time::sleep(RELEASE_WAIT).await;
    }
    capture::remove(db).await?;
    if slot::slot_status(db, &slot).await?.is_none() {
        return Ok(());
    }
    slot::wait_for_open_transactions(db).await?;
    let end = slot::mark_end(db, &heartbeat_prefix(&slot::schema(db).await?)).await?;
    let (_stop, mut stopped) = watch::channel(false);
    // A relay just stopped may hold the slot a moment longer.
    let mut tries = 0;
    loop {
        match session(&relay, &mut stopped, &mut Health::default(), Some(end)).await {
            Ok(()) => break,
            Err(Ended::Busy(_)) if tries < RELEASE_TRIES => {}
            Err(Ended::Busy(slot)) => return Err(LogicalError::SlotInUse(slot)),
            Err(Ended::Failed(error)) => return Err(error),
        }
        tries += 1;
        tokio::time::sleep(RELEASE_WAIT).await;
    }
    // Our own walsender, too, lets go of the slot a moment after we hang up.
    let mut tries = 0;
    while let Err(error) = slot::drop(db, &slot).await {
        if !error.to_string().contains("is active for PID") || tries == RELEASE_TRIES {
            return Err(error.into());
        }
        tries += 1;
        tokio::time::sleep(RELEASE_WAIT).await;
    }
    tracing::info!(slot, "dropped the replication slot");
    Ok(())
}

/// One replication connection, until told to stop, until `stop_at` is
/// reached and everything before it settled, or until a failure.
async fn session<P: Publisher>(
    relay: &LogicalRelay<P>,
    stopped: &mut watch::Receiver<bool>,
    health: &mut Health,
    stop_at: Option<u64>,
) -> Result<(), Ended> {
    let db = relay.relay.store.db();
    let config = &relay.relay.config;
    slot::preflight(db).await?;
    let slot = slot_name(relay).await?;
    let schema = slot::schema(db).await?;
    slot::ensure(db, &slot).await?;
    if stop_at.is_none() && !rows_gone(relay, stopped).await? {
        return Ok(()); // told to stop while waiting
    }
    let mut stream = Stream {
        events: event_prefix(&schema),
        heartbeats: heartbeat_prefix(&schema),
        skip_through: slot::relayed(db, &slot).await?,
        current: None,
        pending: Pending::default(),
    };
    let mut connection = relay.connection.clone();
    connection.slot = slot.clone();
    connection.publication = slot.as_str().into();
    // Counted in messages, and a direct write's message holds a whole
    // transaction's events: a few dozen keep the worker ahead of us and
    // bound what waits in memory.
    connection.buffer_events = STREAM_BUFFER;
    if let Some(end) = stop_at {
        connection = connection.with_stop_lsn(Lsn(end));
    }
    let mut client = ReplicationClient::connect(connection).await?;
    if let Err(error) = client.wait_started().await {
        return Err(if slot_busy(&error) {
            Ended::Busy(slot)
        } else {
            error.into()
        });
    }
    health.started(&slot);
    let mut recorder = Recorder::spawn(db.clone(), slot.clone());
    // Beside the rounds, not between them: a round never waits for a chore.
    let chores = chores(relay, &slot, stream.heartbeats.clone(), stop_at.is_none());
    tokio::pin!(chores);
    let max_unsettled = config.batch_size.saturating_mul(8);
    let mut ended = false;
    let mut outages = 0_u32;
    loop {
        let room = !ended && stream.pending.unsettled() < max_unsettled;
        let waiting = stream.pending.unsettled() > 0;
        tokio::select! {
            biased;
            Ok(()) = stopped.changed() => {
                recorder.flush().await;
                client.stop();
                return Ok(());
            }
            Ok(()) = recorder.recorded.changed() => {
                client.update_applied_lsn(Lsn(*recorder.recorded.borrow_and_update()));
            }
            event = client.recv(), if room => match event? {
                Some(event) => {
                    stream.take(event);
                    // Whatever else has arrived joins the same round.
                    while stream.pending.unsettled() < max_unsettled {
                        match client.recv().now_or_never() {
                            Some(Ok(Some(event))) => stream.take(event),
                            Some(Ok(None)) => ended = true,
                            Some(Err(error)) => return Err(error.into()),
                            None => break,
                        }
                        if ended {
                            break;
                        }
                    }
                }
                None => ended = true,
            },
            failed = &mut chores => return Err(failed),
            () = tokio::time::sleep(wait_for(&stream.pending, IDLE)), if waiting => {}
        }
        loop {
            let due = stream.pending.due(Instant::now(), config.batch_size);
            if due.is_empty() {
                break;
            }
            let started = Instant::now();
            let deliveries = {
                let batch = Batch::new(due.iter().map(|&at| stream.pending.event(at)).collect());
                relay.relay.publisher.publish_in_key_order(&batch).await
            };
            let unavailable = deliveries
                .iter()
                .all(|d| matches!(d, Some(Delivery::Unavailable(_)) | None));
            let outcome = stream.pending.settle(&due, deliveries, config);
            if !outcome.dead.is_empty() {
                for letter in &outcome.dead {
                    tracing::warn!(event_id = %letter.id.as_ref(), error = %letter.last_error.as_ref(), "event dead-lettered");
                }
                insert_all(db, outcome.dead).await?;
            }
            stats::record_batch(&outcome.report, started.elapsed());
            if !unavailable {
                outages = 0;
                continue;
            }
            // The broker is down: the events wait in order, the slot unconfirmed.
            outages = outages.saturating_add(1);
            if outages == 1
                && let Some(error) = &outcome.report.last_error
            {
                tracing::warn!(error = %ErrorReport(error), "logical relay cannot reach the broker; retrying with backoff");
            }
            tokio::select! {
                () = tokio::time::sleep(config.outage.delay(outages)) => {}
                Ok(()) = stopped.changed() => {}
            }
            break;
        }
        if let Some(end) = stream.pending.confirmable() {
            recorder.wanted.send_replace(end);
        }
        if ended && stream.pending.unsettled() == 0 {
            // The server ended the stream (the end mark reached): the worker is done.
            let _ = client.shutdown().await;
            return Ok(());
        }
    }
}

/// Installs the capture trigger and waits until no row of the table is
/// left to deliver, draining them; false if told to stop meanwhile.
///
/// Rows are older than anything in the slot, so they must all be stored
/// before the slot's first event: not only those this relay can claim, but
/// those another relay has claimed and is publishing (its drain before its
/// own standby, say), which this one's claim passes over. Once the trigger
/// is in, no row is added, and the wait ends.
async fn rows_gone<P: Publisher>(
    relay: &LogicalRelay<P>,
    stopped: &mut watch::Receiver<bool>,
) -> Result<bool, Ended> {
    let db = relay.relay.store.db();
    capture::install(db).await?;
    loop {
        let drained = relay.relay.drain().await;
        drained.map_err(|e| LogicalError::Drain(Box::new(e)))?;
        if slot::rows_waiting(db).await? == 0 {
            return Ok(true);
        }
        tokio::select! {
            () = tokio::time::sleep(ROWS_POLL) => {}
            Ok(()) = stopped.changed() => return Ok(false),
        }
    }
}

/// The session's periodic work, until a heartbeat fails: a heartbeat and
/// the lag gauges every heartbeat interval; every poll interval, the
/// scheduled events that came due (inserted into the outbox, so captured)
/// and any row in the table (written while the trigger was gone). None
/// while retiring (`periodic` false).
async fn chores<P: Publisher>(
    relay: &LogicalRelay<P>,
    slot: &str,
    heartbeats: String,
    periodic: bool,
) -> Ended {
    if !periodic {
        return std::future::pending().await;
    }
    let db = relay.relay.store.db();
    let mut heartbeat = tokio::time::interval(relay.heartbeat);
    let mut poll = tokio::time::interval(relay.relay.config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if let Err(error) = slot::heartbeat(db, &heartbeats).await {
                    return error.into();
                }
                gauges(db, slot).await;
            }
            _ = poll.tick() => {
                if let Err(error) = relay.relay.drain().await {
                    tracing::debug!(error = %ErrorReport(&error), "the logical relay's poll of the outbox table failed");
                }
            }
        }
    }
}

/// What the slot hands over, sorted into the pending transactions.
struct Stream {
    events: String,
    heartbeats: String,
    /// Transactions ending at or before this were stored by an earlier
    /// session (`outbox_logical_progress`): resent, they are skipped.
    skip_through: u64,
    /// The events of the transaction being read.
    current: Option<Vec<Model>>,
    pending: Pending,
}

impl Stream {
    fn take(&mut self, event: ReplicationEvent) {
        match event {
            ReplicationEvent::Begin { .. } => self.current = Some(Vec::new()),
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                lsn,
            } if prefix == self.events => match capture::decode(&content) {
                Ok(events) => self.current.get_or_insert_default().extend(events),
                Err(error) => {
                    metrics::counter!(MALFORMED).increment(1);
                    tracing::error!(lsn = %lsn, error = %error, "skipped a malformed outbox message");
                }
            },
            // A heartbeat: everything committed before it has been read.
            ReplicationEvent::Message {
                transactional: false,
                prefix,
                lsn,
                ..
            } if prefix == self.heartbeats && lsn.0 > self.skip_through => {
                self.pending.push(lsn.0, Vec::new());
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let events = self.current.take().unwrap_or_default();
                if end_lsn.0 > self.skip_through {
                    self.pending.push(end_lsn.0, events);
                } else if !events.is_empty() {
                    tracing::debug!(
                        events = events.len(),
                        "skipped a transaction stored before a restart"
                    );
                }
            }
            _ => {}
        }
    }
}

/// Writes the relayed position to `outbox_logical_progress` beside the
/// session, so that rounds do not wait for its commit; the slot is
/// confirmed up to what was recorded, never further: the record is what a
/// resend is checked against, whatever the slot's own position became.
struct Recorder {
    wanted: watch::Sender<u64>,
    recorded: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn spawn(db: DatabaseConnection, slot: String) -> Self {
        let (wanted, mut want) = watch::channel(0);
        let (done, recorded) = watch::channel(0);
        let task = tokio::spawn(async move {
            while want.changed().await.is_ok() {
                let lsn = *want.borrow_and_update();
                match slot::record_relayed(&db, &slot, lsn).await {
                    Ok(()) => {
                        done.send_replace(lsn);
                    }
                    Err(error) => {
                        tracing::debug!(error = %ErrorReport(&error), "could not record the relayed position; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        want.mark_changed();
                    }
                }
            }
        });
        Self {
            wanted,
            recorded,
            task,
        }
    }

    /// Waits (a little) for the last position to be recorded, before a stop.
    async fn flush(&mut self) {
        let wanted = *self.wanted.borrow();
        let recorded = self.recorded.wait_for(|&lsn| lsn >= wanted);
        let _ = tokio::time::timeout(Duration::from_secs(2), recorded).await;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the server refused the slot because another session holds it
/// (SQLSTATE 55006, object in use).
fn slot_busy(error: &PgWireError) -> bool {
    matches!(error, PgWireError::Server(text) if text.contains("55006"))
}

/// The slot's lag, as gauges; a failure to read it is only logged.
async fn gauges(db: &DatabaseConnection, slot: &str) {
    match slot::slot_status(db, slot).await {
        Ok(Some(status)) => {
            metrics::gauge!(LAG_BYTES).set(status.lag_bytes as f64);
            metrics::gauge!(LAG_SECONDS).set(status.lag_seconds.unwrap_or(0.0));
        }
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(error = %ErrorReport(&error), "could not read the slot's lag")
        }
    }
}
