//! What a run measures with: pairs of runs, medians, CPU seconds of
//! processes and services, peak memory, and the printed table.

use super::{Args, Figures};

/// A raw publish run: events/s, and the CPU seconds of nats-server and of the publisher.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawRun {
    pub(super) eps: f64,
    pub(super) nats_cpu_s: f64,
    pub(super) publisher_cpu_s: f64,
}

/// A drain: events/s, the relay's peak RSS, and the CPU seconds of the
/// relay and of the services.
#[derive(Debug, Clone, Copy)]
pub(super) struct DrainRun {
    pub(super) eps: f64,
    pub(super) rss_mib: f64,
    pub(super) relay_cpu_s: f64,
    pub(super) services: ServiceCpu,
}

/// A drain and the raw runs on either side of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pair {
    pub(super) before: RawRun,
    pub(super) drain: DrainRun,
    pub(super) after: RawRun,
}

impl Pair {
    /// The ceiling the drain is compared with: the mean of its two raw runs.
    pub(super) fn raw_eps(&self) -> f64 {
        (self.before.eps + self.after.eps) / 2.0
    }

    pub(super) fn ratio(&self) -> f64 {
        self.drain.eps / self.raw_eps()
    }
}

/// The median of costs (handler time ratios, lower is better); with an even
/// count, the higher of the two middle values, so that a cost is not rounded down.
pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(super) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// CPU seconds (user + system) used so far by the processes named
/// `nats-server` and `postgres` (every backend), read from /proc; NaN elsewhere.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServiceCpu {
    pub(super) nats: f64,
    pub(super) postgres: f64,
}

impl ServiceCpu {
    pub(super) fn now() -> Self {
        let mut cpu = Self {
            nats: 0.0,
            postgres: 0.0,
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self {
                nats: f64::NAN,
                postgres: f64::NAN,
            };
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
                continue;
            };
            let slot = match name.trim() {
                "nats-server" => &mut cpu.nats,
                "postgres" => &mut cpu.postgres,
                _ => continue,
            };
            *slot += cpu_seconds(&path.join("stat")).unwrap_or(0.0);
        }
        cpu
    }

    /// What was used since `self` was taken.
    pub(super) fn since(self) -> Self {
        let now = Self::now();
        Self {
            nats: now.nats - self.nats,
            postgres: now.postgres - self.postgres,
        }
    }

    pub(super) fn total(self) -> f64 {
        self.nats + self.postgres
    }
}

/// User + system CPU seconds of one process and of its children that have
/// exited (so that a PostgreSQL backend that closed counts, through the
/// postmaster that reaped it), from `/proc/<pid>/stat` (fields 14 to 17, in
/// clock ticks of 1/100 s on Linux).
pub(super) fn cpu_seconds(stat: &std::path::Path) -> Option<f64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // The command name may hold spaces; the fields after it start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)? + ticks(13)? + ticks(14)?) / 100.0)
}

pub(super) fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::path::Path::new("/proc/self/stat")).unwrap_or(f64::NAN)
}

pub(super) fn cores() -> f64 {
    std::thread::available_parallelism().map_or(f64::NAN, |n| n.get() as f64)
}

pub(super) fn round(x: f64) -> f64 {
    x.round()
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(super) fn print_table(args: &Args, figures: &Figures) {
    println!(
        "\noutbox benchmark: {} events, {} B payloads, batch {}, {} acks in flight, {} keys, \
         async commit {}, overlapped rounds {}",
        args.events,
        args.payload,
        args.batch,
        args.in_flight,
        args.keys,
        args.async_commit,
        !args.no_overlap
    );
    println!("{:<24} {:>14}", "figure", "value");
    for (name, value) in figures {
        println!("{name:<24} {value:>14}");
    }
}
