//! The logical relay's section (`--logical`), on a PostgreSQL of its own
//! started with `wal_level = logical`: the same backlog drained by the
//! polling relay and by the logical relay, each between two raw JetStream
//! runs; PostgreSQL's CPU per event to write and to relay it in either
//! mode; a large backlog's drain against the small one's; and commit →
//! ack latency at a fixed rate in either mode.

use std::time::{Duration, Instant};

use outbox_core::relay::logical::{LogicalRelay, retire, slot_status};
use outbox_core::relay::{Publisher, Relay};
use outbox_nats::{JetStreamPublisher, async_nats};
use outbox_tests::private_postgres::PrivatePostgres;

use super::measure::{DrainRun, Pair, ServiceCpu, own_cpu_seconds, peak_rss_mib, round, round3};
use super::{Args, Bench, BoxError, Figures, Source, connect_schema, nats_url, publisher};

/// The section's server, with the directory it lives in.
pub(super) struct PrivateServer {
    _server: PrivatePostgres,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    /// Starts it and points `args` at it.
    pub(super) async fn start(args: &mut Args) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let server = (PrivatePostgres::start(dir.path()).await).map_err(|e| e.to_string())?;
        args.database_url = server.url("postgres");
        eprintln!(
            "a private PostgreSQL with wal_level = logical on port {}",
            server.port
        );
        Ok(Self {
            _server: server,
            _dir: dir,
        })
    }
}

/// One mode's drain with what writing its backlog cost PostgreSQL.
#[derive(Debug, Clone, Copy)]
struct Run {
    pair: Pair,
    write_postgres_s: f64,
}

impl Bench {
    /// The logical relay over `relay`, on this run's database.
    pub(super) fn logical_relay<P: Publisher>(
        &self,
        relay: Relay<P>,
    ) -> Result<LogicalRelay<P>, BoxError> {
        Ok(LogicalRelay::new(relay, &self.args.database_url)?)
    }

    pub(super) async fn logical(&mut self) -> Result<Figures, BoxError> {
        let events = self.args.events;
        let mut figures = Figures::new();
        for (name, value) in [
            ("events", events),
            ("payload_bytes", self.args.payload),
            ("batch_size", self.args.batch),
            ("keys", self.args.keys as usize),
        ] {
            figures.insert(name.into(), value.into());
        }
        let mut before = self.raw_run().await?;
        let (mut polling, mut logical) = (Vec::new(), Vec::new());
        for run in 1..=self.args.repeat {
            for source in [Source::Polling, Source::Logical] {
                let (drain, write_postgres_s) = self.backlog_drained(source, events).await?;
                let after = self.raw_run().await?;
                let pair = Pair {
                    before,
                    drain,
                    after,
                };
                eprintln!(
                    "run {run}/{}: {source:?} drain {:.0} events/s, raw {:.0} after it: ratio {:.3}",
                    self.args.repeat,
                    drain.eps,
                    after.eps,
                    pair.ratio()
                );
                let run = Run {
                    pair,
                    write_postgres_s,
                };
                match source {
                    Source::Polling => polling.push(run),
                    Source::Logical => logical.push(run),
                }
                before = after;
            }
        }
        let per_event = |seconds: f64| round3(seconds * 1e6 / events as f64);
        let mut medians = Vec::new();
        for (mode, mut runs) in [("polling", polling), ("logical", logical)] {
            runs.sort_by(|a, b| a.pair.ratio().total_cmp(&b.pair.ratio()));
            // The lower of the two middle runs, so that a ratio wanted high is not rounded up.
            let Run {
                pair,
                write_postgres_s,
            } = runs[(runs.len() - 1) / 2];
            let drain_postgres = per_event(pair.drain.services.postgres);
            let write_postgres = per_event(write_postgres_s);
            for (name, value) in [
                ("drain_eps", round(pair.drain.eps)),
                ("drain_ratio", round3(pair.ratio())),
                ("raw_jetstream_eps", round(pair.raw_eps())),
                ("drain_cpu_us_postgres", drain_postgres),
                ("write_cpu_us_postgres", write_postgres),
                ("cpu_us_postgres", round3(drain_postgres + write_postgres)),
                ("drain_cpu_us_relay", per_event(pair.drain.relay_cpu_s)),
                ("drain_cpu_us_nats", per_event(pair.drain.services.nats)),
                ("relay_rss_mib", round3(pair.drain.rss_mib)),
            ] {
                figures.insert(format!("{mode}_{name}"), value.into());
            }
            let ratios: Vec<f64> = runs.iter().map(|run| round3(run.pair.ratio())).collect();
            figures.insert(format!("{mode}_drain_ratio_runs"), ratios.into());
            medians.push((pair, drain_postgres + write_postgres));
        }
        let [(polling, polling_postgres), (logical, logical_postgres)] = medians[..] else {
            return Err("a mode has no run".into());
        };
        // What the capture trigger costs a writer that does not write messages itself.
        self.capture().await?;
        let services = ServiceCpu::now();
        self.backlog(events).await?;
        let trigger_write = per_event(services.since().postgres);
        self.uncapture().await?;
        figures.insert("trigger_write_cpu_us_postgres".into(), trigger_write.into());
        figures.insert(
            "logical_over_polling_eps".into(),
            round3(logical.drain.eps / polling.drain.eps).into(),
        );
        figures.insert(
            "logical_over_polling_postgres_cpu".into(),
            round3(logical_postgres / polling_postgres).into(),
        );
        if self.args.logical_backlog > 0 {
            let large = self.args.logical_backlog;
            let (drain, _) = self.backlog_drained(Source::Logical, large).await?;
            eprintln!("logical drain of {large}: {:.0} events/s", drain.eps);
            figures.insert("logical_backlog_events".into(), large.into());
            figures.insert("logical_backlog_eps".into(), round(drain.eps).into());
            figures.insert(
                "logical_backlog_ratio".into(),
                round3(drain.eps / logical.drain.eps).into(),
            );
        }
        figures.insert("latency_rate_eps".into(), self.args.rate.into());
        for source in [Source::Polling, Source::Logical] {
            self.truncate_outbox().await?;
            self.fresh_streams().await?;
            if source == Source::Logical {
                self.capture().await?;
            }
            outbox_core::capture::write_as_messages(source == Source::Logical);
            let latency = self.latency(self.publisher(), source, false).await?;
            outbox_core::capture::write_as_messages(false);
            if source == Source::Logical {
                self.uncapture().await?;
            }
            let mode = if source == Source::Logical {
                "logical"
            } else {
                "polling"
            };
            let [p50, p99, max] = latency.acked;
            eprintln!(
                "{mode} commit → ack at {} events/s: p50 {p50:.2} ms, p99 {p99:.2} ms",
                self.args.rate
            );
            figures.insert(format!("{mode}_latency_p50_ms"), round3(p50).into());
            figures.insert(format!("{mode}_latency_p99_ms"), round3(p99).into());
            figures.insert(format!("{mode}_latency_max_ms"), round3(max).into());
        }
        Ok(figures)
    }

    /// Writes a backlog of `events` for `source` (captured into the slot for
    /// the logical relay) and drains it in a process of its own; returns the
    /// drain and PostgreSQL's CPU seconds for the writing.
    async fn backlog_drained(
        &self,
        source: Source,
        events: usize,
    ) -> Result<(DrainRun, f64), BoxError> {
        if source == Source::Logical {
            self.capture().await?;
        }
        // A service whose outbox the logical relay reads writes messages.
        outbox_core::capture::write_as_messages(source == Source::Logical);
        let services = ServiceCpu::now();
        self.backlog(events).await?;
        let write_postgres_s = services.since().postgres;
        outbox_core::capture::write_as_messages(false);
        self.fresh_streams().await?;
        let drain = self.relay_drain(source, events).await?;
        if source == Source::Logical {
            self.uncapture().await?;
        }
        Ok((drain, write_postgres_s))
    }

    /// A logical relay on this run's outbox, streams and settings.
    fn this_logical_relay(&self) -> Result<LogicalRelay<JetStreamPublisher>, BoxError> {
        self.logical_relay(Relay::builder(self.db.clone(), self.publisher()).build())
    }

    /// Drops the slot and the capture trigger (`retire`): events are rows again.
    async fn uncapture(&self) -> Result<(), BoxError> {
        Ok(retire(self.this_logical_relay()?).await?)
    }

    /// Creates the slot and the capture trigger: a logical relay runs until
    /// it reads the slot, then stops (events committed from now on wait in the slot).
    async fn capture(&self) -> Result<(), BoxError> {
        let relay = self.this_logical_relay()?.spawn();
        let slot = format!("outbox_{}", self.schema);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !slot_status(&self.db, &slot)
            .await?
            .is_some_and(|status| status.active)
        {
            if Instant::now() > deadline {
                return Err(format!("the logical relay did not take slot {slot}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay.shutdown().await?;
        Ok(())
    }
}

/// The child process of a logical drain: a logical relay runs until the
/// stream holds `--events` messages.
pub(super) async fn drain_only(args: &Args, schema: &str, namespace: &str) -> Result<(), BoxError> {
    let db = connect_schema(&args.database_url, schema, 16).await?;
    let client = async_nats::connect(nats_url()).await?;
    let publisher = publisher(client.clone(), args, namespace);
    let relay = Relay::builder(db, publisher).batch_size(args.batch).build();
    let relay = LogicalRelay::new(relay, &args.database_url)?;
    let stream_name = outbox_nats::StreamSpec::for_exchange("BENCH", "bench", Some(namespace)).name;
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(&stream_name)
        .await?;
    let (services, own) = (ServiceCpu::now(), own_cpu_seconds());
    let started = Instant::now();
    let handle = relay.spawn();
    while stream.info().await?.state.messages < args.events as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = args.events as f64 / started.elapsed().as_secs_f64();
    // Read while the walsender lives: its time leaves /proc with it.
    let services = services.since();
    let relay_cpu_s = own_cpu_seconds() - own;
    handle.shutdown().await?;
    let figures = serde_json::json!({
        "relay_drain_eps": rate,
        "relay_rss_mib": peak_rss_mib(),
        "relay_cpu_s": relay_cpu_s,
        "nats_cpu_s": services.nats,
        "postgres_cpu_s": services.postgres,
    });
    println!("{figures}");
    Ok(())
}
