//! `ringmq-bench sweep`: one mode at several open-loop rates in one run (a fresh embedded
//! broker per rate), so latency can be read against the rate reached: where the curve bends
//! up, the mode saturates. A table on stdout; with `--out`, sweep.json and sweep.svg.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::hist::LatencySummary;
use crate::machine::{self, MachineFacts};
use crate::runner;
use crate::svg::{self, SweepPoint};
use crate::workload::{Mode, Workload};

/// A target rate counts as reached at this share of it.
const REACHED: f64 = 0.95;

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The mode to sweep: sync-flush, async-flush, async-master, sync-master-received or
    /// sync-master-durable.
    #[arg(long, default_value = "sync-flush")]
    pub mode: String,
    /// Target rates in msgs/s, in the order run (each an open-loop run like `run --rate`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub rates: Vec<u64>,
    #[command(flatten)]
    pub workload: Workload,
    /// Write sweep.json and sweep.svg into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    target_msgs_per_sec: u64,
    msgs_per_sec: f64,
    /// The rate reached at least [`REACHED`] of the target.
    reached: bool,
    latency: LatencySummary,
    errors: u64,
}

#[derive(Serialize)]
struct SweepReport {
    command: &'static str,
    git_commit: Option<String>,
    machine: MachineFacts,
    mode: String,
    workload_description: String,
    latency_kind: String,
    rows: Vec<Row>,
}

pub fn run(a: SweepArgs) -> Result<(), String> {
    let mode: Mode = a.mode.parse()?;
    if a.workload.broker.is_some() {
        return Err("sweep runs embedded brokers (a fresh one per rate): drop --broker".into());
    }
    if a.workload.rate.is_some() {
        return Err("sweep sets the rate of each run from --rates: drop --rate".into());
    }
    if a.rates.is_empty() || a.rates.contains(&0) {
        return Err("--rates needs one or more rates of at least 1 msg/s".into());
    }
    runner::install_interrupt_handler();
    let mut rows = Vec::new();
    let mut latency_kind = String::new();
    // What every run shares (its own rate aside).
    let description =
        a.workload
            .describe()
            .replacen("closed loop", "open loop at each target rate", 1);
    for (i, &rate) in a.rates.iter().enumerate() {
        if runner::interrupted() {
            eprintln!(
                "note: interrupted: the rates after {} were not run",
                rows.len()
            );
            break;
        }
        let mut w = a.workload.clone();
        w.rate = Some(rate);
        w.validate()?;
        eprintln!(
            "[sweep] {mode} at {rate} msgs/s ({} of {}) ...",
            i + 1,
            a.rates.len()
        );
        let run = runner::run_embedded(mode, &w)?;
        let r = run.result;
        latency_kind = r.latency_kind.clone();
        rows.push(Row {
            target_msgs_per_sec: rate,
            msgs_per_sec: r.msgs_per_sec,
            reached: r.msgs_per_sec >= REACHED * rate as f64,
            latency: r.latency,
            errors: r.errors.values().sum(),
        });
    }
    println!("\n{mode}: {description} (latency: {latency_kind})\n");
    println!("| target msgs/s | reached msgs/s | p50 | p99 | p99.9 | max | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let l = &r.latency;
        println!(
            "| {} | {:.0}{} | {} | {} | {} | {} | {} |",
            r.target_msgs_per_sec,
            r.msgs_per_sec,
            if r.reached { "" } else { " (saturated)" },
            crate::report::fmt_us(l.p50_us),
            crate::report::fmt_us(l.p99_us),
            crate::report::fmt_us(l.p999_us),
            crate::report::fmt_us(l.max_us),
            r.errors
        );
    }
    if let Some(first) = rows.iter().find(|r| !r.reached) {
        println!(
            "\nsaturated from {} msgs/s: {:.0} reached (below {:.0} % of the target)",
            first.target_msgs_per_sec,
            first.msgs_per_sec,
            REACHED * 100.0
        );
    }
    if let Some(dir) = a.out {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let points: Vec<SweepPoint> = rows
            .iter()
            .map(|r| SweepPoint {
                achieved: r.msgs_per_sec,
                percentiles: [
                    ("p50", r.latency.p50_us),
                    ("p99", r.latency.p99_us),
                    ("p99.9", r.latency.p999_us),
                ],
            })
            .collect();
        let title = format!("ringmq-bench sweep: {mode}, {description}");
        let chart = dir.join("sweep.svg");
        std::fs::write(&chart, svg::sweep_chart(&title, &points))
            .map_err(|e| format!("{}: {e}", chart.display()))?;
        let report = SweepReport {
            command: "sweep",
            git_commit: machine::git_commit(),
            machine: MachineFacts::collect(Some(a.workload.data_root.as_path())),
            mode: mode.to_string(),
            workload_description: description,
            latency_kind,
            rows,
        };
        let json = dir.join("sweep.json");
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&json, text).map_err(|e| format!("{}: {e}", json.display()))?;
        eprintln!("wrote {} and {}", json.display(), chart.display());
    }
    Ok(())
}
