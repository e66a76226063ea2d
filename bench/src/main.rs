//! `ringmq-bench`: RingMQ's load generator and flush/replication-mode comparison.
//!
//! - `run --mode sync-flush [workload]`: one mode on a fresh embedded broker (or `--broker`).
//! - `compare [--modes sync-flush,async-flush,...] [workload]`: the same workload against each
//!   mode in turn, each on a fresh embedded broker, and one table with the ratios between them.
//!   The replication modes (`async-master`, `sync-master-received`, `sync-master-durable`) add
//!   a slave in a separate process, in its own network namespace when possible.
//! - `drill kill [--flush-mode ...]`: SIGKILL a broker process under load, restart, audit the
//!   acks, print a verdict table.
//! - `drill partition [--replication ...]`: cut a master off its slave (two network
//!   namespaces) under load, heal, let the slave catch up, audit both logs and the acks'
//!   durability levels, print a verdict table.
//! - `drill disk-full [--flush-mode ...]`: fill a small ext4 file system on a loop device
//!   under load, free it, audit (root), print a verdict table.
//! - `groups`: producers and the members of one consumer group (poll, ack, commit) on an
//!   embedded broker: produce/consume rates, end-to-end and commit latency, duplicates, losses.
//! - `backlog`: produce a backlog, then read it all with the plain consumer and with consumer
//!   groups of 1, 2, ... members: msgs/s, MB/s and CPU per reader.
//! - `transactions`: plain SYNC sends, then transactional sends (half + commit, optionally
//!   half + rollback) of one message each, then halves left UNKNOWN that the broker checks
//!   back, on one embedded broker with a short check-back timeout: msgs/s, half / end /
//!   whole latency, the ratio to plain sends, check-back latency, an audit of every topic.
//! - `etcd-load`: the etcd traffic of N simulated broker groups and a failover storm.
//! - `stalls`: SYNC latency in a fresh broker's first seconds and around segment rolls,
//!   against the steady state (open loop).
//! - `serve-broker --config FILE` (hidden): that slave process (and the drill's broker).
//!
//! Output: a markdown table on stdout, a progress line per second on stderr, and with `--out
//! DIR` a JSON report, one `.hgrm` file per mode and an SVG chart.
//!
//! # Layout
//! - [`workload`]: the flags shared by every load subcommand, the modes.
//! - [`runner`]: embedded broker, producer/consumer threads, progress, gathering.
//! - [`hist`]: HdrHistograms, per-thread stats, the open-loop pacer.
//! - [`report`]: table, JSON, `.hgrm`; [`svg`]: the charts.
//! - [`sweep`]: one mode at several open-loop rates, latency against the rate reached.
//! - [`stalls`]: start-up and segment-roll latency against the steady state.
//! - [`broker_stats`]: broker-side flush figures (fsyncs/s ...) and the slave's lag.
//! - [`slave`]: the slave process of the replication modes, its network namespace.
//! - [`netns_cmd`]: the `ip`/`sysctl` commands and stale-namespace sweep, shared with the
//!   integration tests (`tests/common/netns.rs` includes the file).
//! - [`drill`]: the crash drill and its audit; the drills' flags, payloads and log reader.
//! - [`drill_partition`]: the partition drill and its audit.
//! - [`drill_disk_full`]: the disk-full drill (its own loop-device file system).
//! - [`drill_failover`]: the failover drill (its own etcd cluster, a broker group of two).
//! - [`etcd_load`]: the etcd load of many broker groups.
//! - [`machine`]: machine facts, core split and pinning.
//! - [`transactions`]: the transactional produce and check-back workload.
//! - [`embedded`]: the embedded broker, payload ids, loss/duplicate tally and CPU split that
//!   [`groups`] and [`backlog`] share.

mod backlog;
mod broker_stats;
mod drill;
mod drill_disk_full;
mod drill_failover;
mod drill_load;
mod drill_partition;
mod embedded;
mod etcd_load;
mod event_loop;
mod groups;
mod hist;
mod machine;
mod netns_cmd;
mod report;
mod runner;
mod slave;
mod stalls;
mod storage;
mod svg;
mod sweep;
mod transactions;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::machine::MachineFacts;
use crate::report::Report;
use crate::workload::{parse_modes, Mode, Preset, Workload, DEFAULT_COMPARE_MODES};

#[derive(Parser)]
#[command(
    name = "ringmq-bench",
    version,
    about = "Load generator and flush/replication-mode comparison for RingMQ",
    long_about = "Load generator and flush/replication-mode comparison for RingMQ.\n\n\
        Without --broker, each mode runs on a fresh embedded broker whose data dir \
        (.ringmq-bench-<pid>-<mode>) is created under --data-root (default: the current \
        directory; must be a real disk, not tmpfs) and removed afterwards. The embedded broker \
        gets --broker-cores shards on the first cores; the load threads get the other cores.\n\n\
        The replication modes (async-master, sync-master-received, sync-master-durable) run \
        the embedded broker as a master and start a slave as a separate process of this \
        executable, on the next cores, in its own network namespace when running as root \
        with iproute2 (--slave-net), else on loopback; it is stopped and its data dir and \
        namespace removed after the mode."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the workload against one mode.
    Run(RunArgs),
    /// Run the same workload against each mode in turn (each on a fresh embedded broker) and
    /// print one table with a row per mode and the ratios to the first mode.
    Compare(CompareArgs),
    /// One mode at several open-loop rates (`--rates 1000,2000,4000`), a fresh embedded broker
    /// per rate: latency against the rate reached, where the mode saturates; a table, and with
    /// --out sweep.json and sweep.svg.
    Sweep(sweep::SweepArgs),
    /// Do start-up and segment rolls stall acks? Open-loop SYNC sends on a fresh embedded
    /// broker: the first seconds (1 GiB segments, empty data dir) against the seconds after,
    /// and sends around segment rolls (small segments) against the others; p99 ratios against
    /// the target (≤ 2×), and with --out stalls.json.
    Stalls(stalls::StallsArgs),
    /// Storage engine alone (no network): raw disk floor vs SYNC_FLUSH / ASYNC_FLUSH appends.
    Storage(storage::StorageArgs),
    /// Rehearse a fault and audit the acks: `kill` SIGKILLs a broker process under pipelined
    /// load, restarts it and checks every acked message is there once and intact (under
    /// ASYNC_FLUSH: losses within the unflushed bytes it reported just before); `partition`
    /// cuts a master off its slave (two network namespaces) under load, heals the link and
    /// checks both logs and that no SYNC_MASTER ack claimed the slave while it was cut off;
    /// `disk-full` fills a loop-device file system under load (DISK_FULL, reads while full,
    /// resume after freeing, clean SIGTERM, restart audit); `failover` SIGKILLs the master of
    /// a broker group on etcd under load and times the automatic failover. Prints a verdict
    /// table; exits non-zero on any failed round.
    Drill(drill::DrillArgs),
    /// Consumer-group workload: producers and the members of one group (poll, ack, timed
    /// explicit commits besides auto-commit) on a fresh embedded broker; reports produce and
    /// consume rates, end-to-end and commit latency, duplicates and losses.
    Groups(groups::GroupsArgs),
    /// Produce a backlog (batched async), then read all of it with the plain consumer and with
    /// consumer groups of --members sizes; msgs/s, MB/s and CPU of each reading.
    Backlog(backlog::BacklogArgs),
    /// Transactional produce next to plain SYNC sends on one embedded broker: plain sends,
    /// half + commit (timed apart and whole), optionally half + rollback, then halves left
    /// UNKNOWN that the broker checks back (latency from the half's ack to the checker and to
    /// the committed message's delivery); audits that every committed message is visible once
    /// and no rolled back one.
    Transactions(transactions::TransactionsArgs),
    /// The etcd traffic of N broker groups without the brokers (simulated members doing what
    /// a member's control and lease threads do), then a failover storm: calls/s by kind,
    /// latency, lapsed leases, etcd's CPU, the storm's duration (for docs/scale.md).
    EtcdLoad(etcd_load::EtcdLoadArgs),
    /// Run a broker from a TOML config until SIGTERM (the slave process of the replication
    /// modes).
    #[command(hide = true)]
    ServeBroker(slave::ServeArgs),
}

#[derive(Args)]
struct OutputArgs {
    /// Write report.json, report.md, one .hgrm per mode and latency.svg into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// sync-flush, async-flush, async-master, sync-master-received or sync-master-durable
    /// (with --broker: the broker's own flush mode is measured).
    #[arg(long, default_value = "sync-flush", value_parser = clap::value_parser!(ModeArg))]
    mode: ModeArg,
    /// A named workload of the performance issue: sets the mode, producers, batch, send mode
    /// and message size (256 B); w1 w2 w3a w3b w3c durable, w4a w4b ASYNC_FLUSH.
    #[arg(
        long = "workload",
        value_enum,
        conflicts_with_all = ["mode", "producers", "batch", "send_mode", "message_bytes"]
    )]
    preset: Option<Preset>,
    #[command(flatten)]
    workload: Workload,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// Modes to compare, in order; ratios are relative to the first.
    #[arg(long, default_value = DEFAULT_COMPARE_MODES, value_parser = clap::value_parser!(ModeList))]
    modes: ModeList,
    /// Without --rate, each mode runs twice: closed loop (the throughput table), then open loop
    /// at this share of the rate it reached, for the headline latency table (a closed loop
    /// hides queueing: a stalled ack delays the next send instead of counting against it).
    /// 0 = the closed-loop run only.
    #[arg(long, default_value_t = 0.7)]
    open_loop_share: f64,
    #[command(flatten)]
    workload: Workload,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Clone)]
struct ModeArg(Mode);

impl std::str::FromStr for ModeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(ModeArg)
    }
}

#[derive(Clone)]
struct ModeList(Vec<Mode>);

impl std::str::FromStr for ModeList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_modes(s).map(ModeList)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(a) => {
            let (mode, mut workload) = (a.mode.0, a.workload);
            let mode = a.preset.map_or(mode, |p| {
                p.apply(&mut workload);
                p.mode()
            });
            bench("run", &[mode], workload, None, a.output.out)
        }
        Command::Compare(a) => {
            if !(0.0..=1.0).contains(&a.open_loop_share) {
                eprintln!("error: --open-loop-share must be within 0..=1 (0 = closed loop only)");
                return ExitCode::FAILURE;
            }
            let share = (a.open_loop_share > 0.0).then_some(a.open_loop_share);
            bench("compare", &a.modes.0, a.workload, share, a.output.out)
        }
        Command::Sweep(a) => sweep::run(a),
        Command::Stalls(a) => stalls::run(a),
        Command::Storage(a) => storage::run(a),
        Command::Drill(a) => match a.kind {
            drill::DrillKind::Kill => drill::run(a),
            drill::DrillKind::Partition => drill_partition::run(a),
            drill::DrillKind::DiskFull => drill_disk_full::run(a),
            drill::DrillKind::Failover => drill_failover::run(a),
        },
        Command::Groups(a) => groups::run(a),
        Command::Backlog(a) => backlog::run(a),
        Command::Transactions(a) => transactions::run(a),
        Command::EtcdLoad(a) => etcd_load::run(a),
        Command::ServeBroker(a) => slave::serve(a),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `modes` with the workload `w`; with `open_loop_share` (compare without --rate) each
/// mode runs again open loop at that share of the rate its closed-loop run reached.
fn bench(
    command: &str,
    modes: &[Mode],
    w: Workload,
    open_loop_share: Option<f64>,
    out: Option<PathBuf>,
) -> Result<(), String> {
    w.validate()?;
    runner::install_interrupt_handler();
    let started_unix_ms = runner::unix_ms();
    let mut notes = Vec::new();
    let open_loop_share = open_loop_share.filter(|_| w.rate.is_none());
    if let Some(share) = open_loop_share {
        let note = format!(
            "each mode ran closed loop (throughput), then open loop at {:.0} % of the rate it \
             reached (latency: the headline table); --rate R runs every mode at R instead, \
             --open-loop-share 0 skips the open-loop runs",
            share * 100.0
        );
        eprintln!("note: {note}");
        notes.push(note);
    } else if w.rate.is_none() {
        let note = "closed loop: each producer waits for its acks before sending more, so the \
                    latency table leaves out the queueing an open loop would see; pass --rate \
                    for latency from intended send times, or `ringmq-bench sweep` for several \
                    rates"
            .to_string();
        eprintln!("note: {note}");
        notes.push(note);
    }
    let mut runs = Vec::new();
    let mut open_runs = Vec::new();
    // The open-loop run of a mode after its closed-loop one (`run` runs it with `w`).
    let open_workload = |closed: &runner::ModeRun| {
        let share = open_loop_share?;
        let mut open = w.clone();
        open.rate = Some(((closed.result.msgs_per_sec * share) as u64).max(1));
        Some(open)
    };
    match &w.broker {
        Some(addr) => {
            let (reported, mode) = runner::remote_mode(addr)?;
            let label = mode.map_or_else(|| reported.to_lowercase(), |m| m.label().to_string());
            if mode.map(|m| vec![m]).as_deref() != Some(modes) {
                let asked: Vec<&str> = modes.iter().map(|m| m.label()).collect();
                let note = format!(
                    "--broker {addr} runs {reported}: a running broker can only be measured in \
                     its own mode, so only {label} was measured (asked for {}); drop --broker to \
                     compare modes on embedded brokers",
                    asked.join(", ")
                );
                eprintln!("note: {note}");
                notes.push(note);
            }
            let run = runner::run_remote(&label, addr, &w)?;
            if let Some(open) = open_workload(&run) {
                open_runs.push(runner::run_remote(&label, addr, &open)?);
            }
            runs.push(run);
        }
        None => {
            for &mode in modes {
                if runner::interrupted() {
                    break;
                }
                match runner::run_embedded(mode, &w).and_then(|run| {
                    if let Some(open) = open_workload(&run).filter(|_| !runner::interrupted()) {
                        eprintln!(
                            "[{mode}] again, open loop at {} msgs/s",
                            open.rate.unwrap_or(0)
                        );
                        open_runs.push(runner::run_embedded(mode, &open)?);
                    }
                    Ok(run)
                }) {
                    Ok(run) => runs.push(run),
                    // Interrupted while a mode was starting: report the modes before it.
                    Err(e) if runner::interrupted() => {
                        eprintln!("note: {mode}: {e}");
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if runner::interrupted() {
        let note = "interrupted (Ctrl-C): the figures are partial and modes after the \
                    interrupted one were not run"
            .to_string();
        eprintln!("note: {note}");
        notes.push(note);
    }
    let results: Vec<_> = runs.iter().map(|r| r.result.clone()).collect();
    let mut report = Report {
        tool: format!("ringmq-bench {}", env!("CARGO_PKG_VERSION")),
        command: command.to_string(),
        started_unix_ms,
        git_commit: machine::git_commit(),
        machine: MachineFacts::collect(w.broker.is_none().then_some(w.data_root.as_path())),
        workload_description: w.describe(),
        workload: w,
        notes,
        ratios: report::ratios(&results),
        modes: results,
        open_loop_share: open_loop_share.filter(|_| !open_runs.is_empty()),
        open_loop: open_runs.iter().map(|r| r.result.clone()).collect(),
    };
    println!("{}", report.table());
    if let Some(dir) = out {
        let files = report::write_outputs(&dir, &mut report, &runs, &open_runs)
            .map_err(|e| format!("cannot write the report into {}: {e}", dir.display()))?;
        for f in files {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}
