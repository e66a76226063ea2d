//! The report: console table (markdown), JSON, `.hgrm` percentile distributions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::broker_stats::{fmt_opt, BrokerStats, ReplicationFigures, LAG_POLL_INTERVAL};
use crate::hist::{Hist, LatencySummary};
use crate::machine::{CoreSplit, CpuUse, MachineFacts};
use crate::runner::ModeRun;
use crate::slave::SlaveInfo;
use crate::svg;
use crate::workload::Workload;

/// One second of the run (warm-up included, flagged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the load started; this point covers (second-1, second].
    pub second: u64,
    pub warmup: bool,
    /// Messages acked (or sent, oneway) in that second.
    pub msgs: u64,
    pub p99_us: Option<u64>,
    /// Messages consumed in that second and their end-to-end p99 (with consumers).
    pub e2e_msgs: Option<u64>,
    pub e2e_p99_us: Option<u64>,
}

/// The figures of one mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeResult {
    /// `sync-flush`, `async-flush`, or the remote broker's mode.
    pub mode: String,
    /// The flush mode the broker itself reported (BrokerInfo).
    pub broker_flush_mode: String,
    /// `embedded (addr)` or `remote (addr)`.
    pub broker: String,
    pub topic: String,
    /// Embedded broker: its temporary data dir (removed after the run) and file system.
    pub data_dir: Option<String>,
    pub data_fs: Option<String>,
    pub core_split: CoreSplit,
    /// From the end of the warm-up to the last measured completion.
    pub measured_secs: f64,
    /// Messages completed in the measured window, and their payload bytes.
    pub messages: u64,
    pub bytes: u64,
    pub msgs_per_sec: f64,
    /// Open loop: the rate offered (`--rate`, or compare's share of the closed-loop rate).
    #[serde(default)]
    pub offered_msgs_per_sec: Option<u64>,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// What `latency` measures.
    pub latency_kind: String,
    pub latency: LatencySummary,
    /// Producer's intended send time -> consumer receive (with --consumers).
    pub e2e_latency: Option<LatencySummary>,
    /// Failed messages by kind (broker error code name or client error variant).
    pub errors: BTreeMap<String, u64>,
    pub broker_stats: BrokerStats,
    /// `none` (no slave), `async_master`, `sync_master/received`, `sync_master/durable`; for
    /// a remote broker what it reports.
    #[serde(default)]
    pub replication: String,
    /// The replication mode the broker itself reported (BrokerInfo), e.g. `SYNC_MASTER/durable`.
    #[serde(default)]
    pub broker_replication: String,
    /// Replication modes: the slave process.
    #[serde(default)]
    pub slave: Option<SlaveInfo>,
    /// Replication modes: the slave's lag and link as the master reported them.
    #[serde(default)]
    pub replica_lag: Option<ReplicationFigures>,
    pub timeline: Vec<TimelinePoint>,
    /// CPU of this process from the end of the warm-up to the last producer's end, in % of one
    /// core: the load (bench and client threads) and, with an embedded broker, its shards.
    #[serde(default)]
    pub cpu: Option<CpuUse>,
    /// Files written next to report.json (with --out).
    pub hgrm_file: Option<String>,
    pub e2e_hgrm_file: Option<String>,
}

/// Figures of a mode relative to the first mode (mode / first; `None` if the first is 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub mode: String,
    pub baseline: String,
    pub throughput: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub e2e_p99: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    /// `run` or `compare`.
    pub command: String,
    pub started_unix_ms: u64,
    pub git_commit: Option<String>,
    pub machine: MachineFacts,
    pub workload: Workload,
    pub workload_description: String,
    /// Anything the reader must know (e.g. a remote broker limits compare to its mode).
    pub notes: Vec<String>,
    pub modes: Vec<ModeResult>,
    pub ratios: Vec<Ratio>,
    /// compare without --rate: each mode again, open loop at `open_loop_share` of the rate
    /// its closed-loop run reached (the headline latency table).
    #[serde(default)]
    pub open_loop_share: Option<f64>,
    #[serde(default)]
    pub open_loop: Vec<ModeResult>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

pub fn ratios(modes: &[ModeResult]) -> Vec<Ratio> {
    let Some(first) = modes.first() else {
        return Vec::new();
    };
    modes
        .iter()
        .skip(1)
        .map(|m| Ratio {
            mode: m.mode.clone(),
            baseline: first.mode.clone(),
            throughput: ratio(m.msgs_per_sec, first.msgs_per_sec),
            p50: ratio(m.latency.p50_us as f64, first.latency.p50_us as f64),
            p99: ratio(m.latency.p99_us as f64, first.latency.p99_us as f64),
            p999: ratio(m.latency.p999_us as f64, first.latency.p999_us as f64),
            e2e_p99: match (&m.e2e_latency, &first.e2e_latency) {
                (Some(a), Some(b)) => ratio(a.p99_us as f64, b.p99_us as f64),
                _ => None,
            },
        })
        .collect()
}

/// A latency for people: `850 µs`, `1.25 ms`, `2.50 s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn fmt_errors(e: &BTreeMap<String, u64>) -> String {
    let total: u64 = e.values().sum();
    if total == 0 {
        return "0".into();
    }
    let parts: Vec<String> = e.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{total} ({})", parts.join(", "))
}

/// The CPU columns: load and broker, % of one core; the broker's `-` when it is remote.
fn fmt_cpu(m: &ModeResult) -> [String; 2] {
    let Some(c) = &m.cpu else {
        return ["-".into(), "-".into()];
    };
    let broker = if m.broker.starts_with("remote") {
        "-".to_string()
    } else {
        format!("{:.0}", c.broker_cpu_pct)
    };
    [format!("{:.0}", c.load_cpu_pct), broker]
}

/// The replication columns: max lag bytes, max lag ms, link; `-` without a slave.
fn fmt_replica(r: Option<&ReplicationFigures>) -> [String; 3] {
    let Some(r) = r else {
        return ["-".into(), "-".into(), "-".into()];
    };
    let link = if r.polls == 0 {
        "n/a".to_string()
    } else if r.link_stayed_up {
        "up".to_string()
    } else {
        format!(
            "DOWN ({} of {} polls, {} reconnects)",
            r.polls_not_streaming, r.polls, r.reconnects
        )
    };
    [
        r.max_lag_bytes.map_or("n/a".into(), |v| v.to_string()),
        r.max_lag_ms.map_or("n/a".into(), |v| v.to_string()),
        link,
    ]
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{r:.2}×"))
}

impl Report {
    /// The console table (markdown, so it pastes into the README).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Workload: {}", self.workload_description);
        let mut splits: Vec<String> = self.modes.iter().map(|m| m.core_split.describe()).collect();
        splits.dedup();
        for split in splits {
            let _ = writeln!(
                s,
                "Cores: {split} ({} cores on this machine)",
                self.machine.cores
            );
        }
        for m in &self.modes {
            if let Some(slave) = &m.slave {
                let _ = writeln!(s, "Slave of {}: {}", m.mode, slave.describe());
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "Note: {n}");
        }
        let kind = self
            .modes
            .first()
            .map_or("send -> ack", |m| m.latency_kind.as_str());
        let _ = writeln!(s, "\nLatency: {kind}, microseconds; warm-up excluded.");
        let _ = writeln!(
            s,
            "appends/fsync: records (produce requests) appended per fdatasync in the measured \
             window; flush cycle: the broker's mean time from handing the log's tail to a write to the \
             end of its fdatasync; unflushed max: the largest unflushed byte count the broker's BrokerStats \
             showed, polled every {} ms in the measured window; load CPU: the bench's and its \
             clients' threads, broker CPU: the embedded broker's shard threads (a slave process \
             is not counted), each in % of one core over the measured window.",
            LAG_POLL_INTERVAL.as_millis()
        );
        if self.modes.iter().any(|m| m.replica_lag.is_some()) {
            let _ = writeln!(
                s,
                "Slave lag: the master's BrokerStats every {} ms in the measured window, the \
                 largest lag_bytes (master log end - slave received) and lag_ms (age of the \
                 oldest byte the slave lacks); link: streaming at every poll, no reconnect.",
                LAG_POLL_INTERVAL.as_millis()
            );
        }
        if let (Some(share), false) = (self.open_loop_share, self.open_loop.is_empty()) {
            let _ = writeln!(
                s,
                "\nLatency, open loop at {:.0} % of each mode's closed-loop rate (from each \
                 send's intended time, so a stall counts against every send it delays; a closed \
                 loop leaves that queueing out by design):\n",
                share * 100.0
            );
            let _ = writeln!(
                s,
                "| mode | offered msgs/s | msgs/s | p50 µs | p90 µs | p99 µs | p99.9 µs | p99.99 µs | max µs | errors |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            for m in &self.open_loop {
                let l = &m.latency;
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                    m.mode,
                    m.offered_msgs_per_sec
                        .map_or("-".to_string(), |r| r.to_string()),
                    m.msgs_per_sec,
                    l.p50_us,
                    l.p90_us,
                    l.p99_us,
                    l.p999_us,
                    l.p9999_us,
                    l.max_us,
                    fmt_errors(&m.errors),
                );
            }
            let _ = writeln!(
                s,
                "\nThroughput, closed loop (each producer sends again when acked; its latency \
                 is service time):"
            );
        }
        let _ = writeln!(
            s,
            "\n| mode | msgs/s | MB/s | p50 µs | p90 µs | p99 µs | p99.9 µs | p99.99 µs | max µs | errors | load CPU % | broker CPU % | fsyncs/s | appends/fsync | flush cycle µs | unflushed max bytes | replication | slave max lag bytes | slave max lag ms | link |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"
        );
        for m in &self.modes {
            let l = &m.latency;
            let b = &m.broker_stats;
            let [lag_bytes, lag_ms, link] = fmt_replica(m.replica_lag.as_ref());
            let [load_cpu, broker_cpu] = fmt_cpu(m);
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m.mode,
                m.msgs_per_sec,
                m.mb_per_sec,
                l.p50_us,
                l.p90_us,
                l.p99_us,
                l.p999_us,
                l.p9999_us,
                l.max_us,
                fmt_errors(&m.errors),
                load_cpu,
                broker_cpu,
                fmt_opt(b.fsyncs_per_sec, 0),
                fmt_opt(b.appends_per_fsync, 1),
                fmt_opt(b.flush_cycle_mean_us, 0),
                fmt_opt(b.unflushed_max_bytes, 0),
                m.replication,
                lag_bytes,
                lag_ms,
                link,
            );
        }
        if self.modes.iter().any(|m| m.e2e_latency.is_some()) {
            let _ = writeln!(
                s,
                "\nEnd to end (intended send -> consumer receive), microseconds:\n"
            );
            let _ = writeln!(
                s,
                "| mode | messages | p50 µs | p90 µs | p99 µs | p99.9 µs | p99.99 µs | max µs |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
            for m in &self.modes {
                if let Some(l) = &m.e2e_latency {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        m.mode,
                        l.count,
                        l.p50_us,
                        l.p90_us,
                        l.p99_us,
                        l.p999_us,
                        l.p9999_us,
                        l.max_us
                    );
                }
            }
        }
        if !self.ratios.is_empty() {
            let e2e = self.ratios.iter().any(|r| r.e2e_p99.is_some());
            let _ = writeln!(s, "\nRelative to {}:\n", self.ratios[0].baseline);
            let _ = writeln!(
                s,
                "| mode | throughput | p50 | p99 | p99.9 |{}\n|---|---:|---:|---:|---:|{}",
                if e2e { " e2e p99 |" } else { "" },
                if e2e { "---:|" } else { "" }
            );
            for r in &self.ratios {
                let _ = write!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    r.mode,
                    fmt_ratio(r.throughput),
                    fmt_ratio(r.p50),
                    fmt_ratio(r.p99),
                    fmt_ratio(r.p999)
                );
                if e2e {
                    let _ = write!(s, " {} |", fmt_ratio(r.e2e_p99));
                }
                s.push('\n');
            }
        }
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }
}

/// HdrHistogram's percentile distribution text (`outputPercentileDistribution`, 5 ticks per
/// half distance), values divided by `scale` (1.0: microseconds).
pub fn hgrm(h: &Hist, scale: f64) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / scale;
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let sub_buckets = 1u64 << ((2.0 * 10f64.powi(i32::from(h.sigfig()))).log2().ceil() as u32);
    let _ = writeln!(s, "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]");
    let _ = writeln!(
        s,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    s
}

/// A file name for a mode label.
fn file_stem(mode: &str) -> String {
    mode.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `report.json`, `report.md` (the table), one `.hgrm` per mode (and per mode's
/// end-to-end latency, and `<mode>.open.hgrm` per open-loop run) and `latency.svg` into `dir`. Returns the files written.
pub fn write_outputs(
    dir: &Path,
    report: &mut Report,
    runs: &[ModeRun],
    open_runs: &[ModeRun],
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for (m, run) in report.open_loop.iter_mut().zip(open_runs) {
        let name = format!("{}.open.hgrm", file_stem(&m.mode));
        std::fs::write(dir.join(&name), hgrm(&run.ack_hist, 1.0))?;
        files.push(dir.join(&name));
        m.hgrm_file = Some(name);
    }
    for (m, run) in report.modes.iter_mut().zip(runs) {
        let stem = file_stem(&m.mode);
        let name = format!("{stem}.hgrm");
        std::fs::write(dir.join(&name), hgrm(&run.ack_hist, 1.0))?;
        files.push(dir.join(&name));
        m.hgrm_file = Some(name);
        if let Some(e2e) = &run.e2e_hist {
            let name = format!("{stem}.e2e.hgrm");
            std::fs::write(dir.join(&name), hgrm(e2e, 1.0))?;
            files.push(dir.join(&name));
            m.e2e_hgrm_file = Some(name);
        }
    }
    let svg = svg::chart(report, runs);
    for (name, text) in [
        ("latency.svg", svg),
        ("report.md", report.table()),
        ("report.json", report.to_json()),
    ] {
        std::fs::write(dir.join(name), text)?;
        files.push(dir.join(name));
    }
    Ok(files)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hist::new_hist;
    use crate::workload::Workload;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        w: Workload,
    }

    pub(crate) fn sample_hist(scale: u64) -> Hist {
        let mut h = new_hist();
        for v in 1..=10_000u64 {
            h.record(v * scale / 10).unwrap();
        }
        h.record(50_000 * scale).unwrap();
        h
    }

    pub(crate) fn sample_report(runs: &[ModeRun]) -> Report {
        let w = W::parse_from(["x"]).w;
        let modes: Vec<ModeResult> = runs.iter().map(|r| r.result.clone()).collect();
        Report {
            tool: "ringmq-bench test".into(),
            command: "compare".into(),
            started_unix_ms: 1,
            git_commit: None,
            machine: MachineFacts::collect(None),
            workload_description: w.describe(),
            workload: w,
            notes: vec!["a note".into()],
            ratios: ratios(&modes),
            modes,
            open_loop_share: None,
            open_loop: Vec::new(),
        }
    }

    pub(crate) fn sample_run(mode: &str, scale: u64, e2e: bool) -> ModeRun {
        let h = sample_hist(scale);
        let result = ModeResult {
            mode: mode.into(),
            broker_flush_mode: mode.to_uppercase(),
            broker: "embedded (127.0.0.1:1)".into(),
            topic: "t".into(),
            data_dir: Some("/x".into()),
            data_fs: Some("ext2/ext3/ext4".into()),
            core_split: CoreSplit::plan(&[0, 1], Some(1), None).unwrap(),
            measured_secs: 8.0,
            messages: h.len(),
            bytes: h.len() * 1024,
            msgs_per_sec: h.len() as f64 / 8.0 / scale as f64,
            offered_msgs_per_sec: None,
            mb_per_sec: 1.0,
            latency_kind: "send -> ack".into(),
            latency: LatencySummary::from_hist(&h),
            e2e_latency: e2e.then(|| LatencySummary::from_hist(&h)),
            errors: [("Timeout".to_string(), 2u64)].into_iter().collect(),
            broker_stats: BrokerStats::default(),
            replication: "none".into(),
            broker_replication: "ASYNC_MASTER".into(),
            slave: None,
            replica_lag: None,
            cpu: None,
            timeline: (1..=10)
                .map(|s| TimelinePoint {
                    second: s,
                    warmup: s <= 2,
                    msgs: 1000 * s / scale,
                    p99_us: Some(100 * scale),
                    e2e_msgs: None,
                    e2e_p99_us: None,
                })
                .collect(),
            hgrm_file: None,
            e2e_hgrm_file: None,
        };
        ModeRun {
            result,
            e2e_hist: e2e.then(|| h.clone()),
            ack_hist: h,
        }
    }

    #[test]
    fn hgrm_has_hdrhistogram_shape() {
        let h = sample_hist(1);
        let text = hgrm(&h, 1.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        let footer: Vec<&&str> = lines.iter().filter(|l| l.starts_with("#[")).collect();
        assert_eq!(footer.len(), 3);
        assert!(footer[0].starts_with("#[Mean    = ") && footer[0].contains("StdDeviation   = "));
        assert!(
            footer[1].contains("Total count    = ")
                && footer[1].ends_with(&format!("{:12}]", h.len()))
        );
        assert!(
            footer[2].starts_with("#[Buckets = ")
                && footer[2].contains("SubBuckets     =         2048]")
        );
        let rows: Vec<&&str> = lines[2..].iter().filter(|l| !l.starts_with('#')).collect();
        assert!(rows.len() > 50, "{} rows", rows.len());
        let mut last_q = -1.0;
        let mut last_count = 0;
        for (i, row) in rows.iter().enumerate() {
            let cols: Vec<&str> = row.split_whitespace().collect();
            let last_row = i == rows.len() - 1;
            assert_eq!(cols.len(), if last_row { 3 } else { 4 }, "row {row:?}");
            let q: f64 = cols[1].parse().unwrap();
            let count: u64 = cols[2].parse().unwrap();
            assert!(q >= last_q && count >= last_count, "row {row:?}");
            (last_q, last_count) = (q, count);
        }
        assert_eq!(last_q, 1.0);
        assert_eq!(last_count, h.len());
        // An empty histogram still has the header and footer.
        let empty = hgrm(&new_hist(), 1.0);
        assert!(empty.starts_with("       Value"));
        assert_eq!(empty.lines().filter(|l| l.starts_with("#[")).count(), 3);
    }

    #[test]
    fn json_round_trips_and_has_the_fields() {
        let runs = vec![
            sample_run("sync-flush", 4, true),
            sample_run("async-flush", 1, true),
        ];
        let report = sample_report(&runs);
        let text = report.to_json();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["modes"].as_array().unwrap().len(), 2);
        assert!(v["modes"][0]["broker_stats"]["fsyncs_per_sec"].is_null());
        assert!(v["machine"]["kernel"].is_string());
        assert!(v["workload"]["producers"].is_u64());
        assert!(v["ratios"][0]["throughput"].as_f64().unwrap() > 1.0);
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.modes, report.modes);
        assert_eq!(back.ratios, report.ratios);
    }

    #[test]
    fn table_has_a_row_per_mode_and_ratios() {
        let runs = vec![
            sample_run("sync-flush", 4, true),
            sample_run("async-flush", 1, true),
        ];
        let t = sample_report(&runs).table();
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("| sync-flush |"))
                .count(),
            2
        );
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("| async-flush |"))
                .count(),
            3
        );
        assert!(t.contains("| n/a | n/a | n/a | none | - | - | - |"));
        assert!(t.contains("2 (Timeout 2)"));
        assert!(t.contains("Relative to sync-flush"));
        assert!(t.contains("Note: a note"));
    }

    #[test]
    fn replication_rows_show_the_slave_lag_and_link() {
        let mut up = sample_run("sync-master-durable", 2, false);
        up.result.replication = "sync_master/durable".into();
        up.result.slave = Some(SlaveInfo {
            net: "netns".into(),
            netns: Some("rqbench-1-0".into()),
            pid: 4242,
            address: "127.78.1.2:40000".into(),
            master_address: "127.78.1.1:40001".into(),
            data_dir: "/x-slave".into(),
        });
        up.result.replica_lag = Some(ReplicationFigures {
            max_lag_bytes: Some(65536),
            max_lag_ms: Some(3),
            end_lag_bytes: Some(0),
            link_stayed_up: true,
            polls: 80,
            ..ReplicationFigures::default()
        });
        let mut down = sample_run("async-master", 1, false);
        down.result.replication = "async_master".into();
        down.result.replica_lag = Some(ReplicationFigures {
            max_lag_bytes: Some(1),
            max_lag_ms: Some(1),
            polls: 10,
            polls_not_streaming: 2,
            reconnects: 1,
            ..ReplicationFigures::default()
        });
        let runs = [sample_run("sync-flush", 4, false), up, down];
        let report = sample_report(&runs);
        let t = report.table();
        assert!(
            t.contains("| sync_master/durable | 65536 | 3 | up |"),
            "{t}"
        );
        assert!(t.contains("| async_master | 1 | 1 | DOWN (2 of 10 polls, 1 reconnects) |"));
        assert!(t.contains(
            "Slave of sync-master-durable: separate process (pid 4242) in network namespace \
             rqbench-1-0, 127.78.1.2:40000 following 127.78.1.1:40001"
        ));
        assert!(t.contains("Slave lag: "));
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["modes"][0]["replication"], "none");
        assert!(v["modes"][0]["replica_lag"].is_null());
        assert_eq!(v["modes"][1]["replica_lag"]["max_lag_bytes"], 65536);
        assert_eq!(v["modes"][1]["replica_lag"]["link_stayed_up"], true);
        assert_eq!(v["modes"][1]["slave"]["pid"], 4242);
    }

    #[test]
    fn ratios_divide_by_the_first_mode() {
        let runs = [sample_run("a", 4, false), sample_run("b", 1, false)];
        let modes: Vec<ModeResult> = runs.iter().map(|r| r.result.clone()).collect();
        let r = ratios(&modes);
        assert_eq!(r.len(), 1);
        assert!((r[0].throughput.unwrap() - 4.0).abs() < 1e-9);
        assert!(r[0].p50.unwrap() < 0.3);
        assert_eq!(r[0].e2e_p99, None);
    }

    #[test]
    fn fmt_us_picks_a_unit() {
        assert_eq!(fmt_us(850), "850 µs");
        assert_eq!(fmt_us(1250), "1.25 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
    }
}
