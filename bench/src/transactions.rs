//! `ringmq-bench transactions`: transactional produce (half message + commit) next to plain
//! SYNC sends, and the latency of a check-back, on one fresh embedded broker.
//!
//! Every producer thread holds a plain [`Producer`] and a [`TransactionalProducer`] (all in one
//! producer group) and runs the phases in turn, the threads starting each phase together:
//!
//! - `plain`: SYNC sends of one message (send -> ack).
//! - `commit`: `send_half` of one message, then `end(Commit)`; timed apart (half -> ack, end ->
//!   ack) and as a whole (half + commit, the figure to hold next to a plain send).
//! - `rollback` (with `--rollback`): the same with `end(Rollback)`; nothing may ever be visible.
//! - `check`: `--check-messages` halves whose local transaction answers UNKNOWN (no end is
//!   sent), `--check-gap-ms` apart per producer. The broker runs with
//!   `--transaction-timeout-ms` / `--transaction-check-interval-ms` (200 / 200 ms by default,
//!   RocketMQ's are 6 s), checks back, and the checker answers COMMIT. Measured from the
//!   half's ack to the checker's call and to the first delivery of the committed message to a
//!   consumer (one long-polling thread per queue). The timeout is printed next to the figures:
//!   the check-back latency is the timeout plus the broker checker's tick (a tenth of the
//!   smaller of timeout and interval, at least 10 ms) plus the poll and the end's round trip.
//!
//! Each phase has its own topic, so the audit after the run reads each topic back: every
//! acked plain message, every committed and every checked-back message once, no message of
//! the rollback phase. Payloads carry the producer and sequence (as in [`crate::groups`]).
//!
//! The short check-back timeout holds for the throughput phases too (one broker): an end that
//! comes later than the timeout is checked back, the checker answers as that phase's
//! producer will (commit or rollback), and the count is reported per phase; it should be 0.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use ringmq::client::transaction::{CheckBack, TransactionConfig};
use ringmq::client::{Admin, Consumer, Producer, QueueSelector, TransactionalProducer};
use ringmq::protocol::{TransactionOutcome, TransactionState};
use serde::{Deserialize, Serialize};

use crate::embedded::{
    make_message, message_id, read_payload, write_file, BrokerArgs, EmbeddedBroker,
    PAYLOAD_HEADER_BYTES,
};
use crate::hist::{as_us, merge_all, new_hist, Hist, LatencySummary, ThreadStats};
use crate::machine::{self, CoreSplit, CpuSnapshot, CpuUse, MachineFacts};
use crate::report::{fmt_us, hgrm};
use crate::runner::{error_kind, interrupted, lock};

/// A producer that fails this many operations in a row stops sending in that phase.
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;
/// How long one visibility fetch waits at the broker.
const WATCH_WAIT: Duration = Duration::from_millis(100);
/// Beyond the most check-backs can take: slack for the resolution and the audit.
const RESOLVE_SLACK: Duration = Duration::from_secs(10);
/// How long a check-back poll of the producers waits (bounds how long their close takes).
const CHECK_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Plain,
    Commit,
    Rollback,
    Check,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Plain => "plain",
            Phase::Commit => "commit",
            Phase::Rollback => "rollback",
            Phase::Check => "check",
        }
    }
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct TransactionsArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Producer threads; each runs every phase, all start a phase together.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Queues of each phase's topic.
    #[arg(long, default_value_t = 4)]
    pub queues: u32,
    /// Payload bytes (at least 16: send time and id).
    #[arg(long, default_value_t = 256)]
    pub message_bytes: usize,
    /// Seconds of each throughput phase after its warm-up (ignored with --messages).
    #[arg(long, visible_alias = "duration", default_value_t = 5)]
    pub duration_secs: u64,
    /// Each throughput phase sends this many messages in all (warm-up included), then stops.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Seconds at the start of each throughput phase excluded from the figures.
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Also run a half + rollback phase (none of its messages may become visible).
    #[arg(long)]
    pub rollback: bool,
    /// Check-back phase: halves left UNKNOWN, in all (0: no check-back phase).
    #[arg(long, default_value_t = 200)]
    pub check_messages: u64,
    /// Check-back phase: pause between one producer's halves.
    #[arg(long, default_value_t = 10)]
    pub check_gap_ms: u64,
    /// The embedded broker's `transaction_timeout_ms` (RocketMQ's and RingMQ's default: 6000).
    #[arg(long, default_value_t = 200)]
    pub transaction_timeout_ms: u64,
    /// The embedded broker's `transaction_check_interval_ms` (default there: 6000).
    #[arg(long, default_value_t = 200)]
    pub transaction_check_interval_ms: u64,
    /// The embedded broker's `transaction_check_max`.
    #[arg(long, default_value_t = 15)]
    pub transaction_check_max: u32,
    /// Write transactions.json and one .hgrm per measured latency into DIR.
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub out: Option<PathBuf>,
}

impl TransactionsArgs {
    fn validate(&self) -> Result<(), String> {
        let mut p = Vec::new();
        self.broker.problems(&mut p);
        if self.producers == 0 || self.queues == 0 {
            p.push("--producers and --queues must be at least 1".into());
        }
        if self.message_bytes < PAYLOAD_HEADER_BYTES {
            p.push(format!(
                "--message-bytes must be at least {PAYLOAD_HEADER_BYTES} (send time and id)"
            ));
        }
        if self.messages.is_none() && self.duration_secs == 0 {
            p.push("--duration-secs must be at least 1 (or give --messages)".into());
        }
        if self.messages == Some(0) {
            p.push("--messages must be at least 1".into());
        }
        if self.transaction_timeout_ms == 0 || self.transaction_check_interval_ms == 0 {
            p.push(
                "--transaction-timeout-ms and --transaction-check-interval-ms must be at least 1"
                    .into(),
            );
        }
        if !(1..=1000).contains(&self.transaction_check_max) {
            p.push("--transaction-check-max must be 1..=1000".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("\n"))
        }
    }

    fn phases(&self) -> Vec<Phase> {
        let mut v = vec![Phase::Plain, Phase::Commit];
        if self.rollback {
            v.push(Phase::Rollback);
        }
        if self.check_messages > 0 {
            v.push(Phase::Check);
        }
        v
    }

    fn describe(&self) -> String {
        let length = match self.messages {
            Some(n) => format!("{n} msgs per phase"),
            None => format!(
                "{} s + {} s warm-up per phase",
                self.duration_secs, self.warmup_secs
            ),
        };
        format!(
            "{} flush, {} producers, {} queues, {} B msgs, {length}; check-back: {} halves, \
             transaction_timeout_ms {}, transaction_check_interval_ms {}",
            self.broker.mode,
            self.producers,
            self.queues,
            self.message_bytes,
            self.check_messages,
            self.transaction_timeout_ms,
            self.transaction_check_interval_ms
        )
    }

    /// How many messages producer `idx` sends in a phase of `n` in all.
    fn quota(&self, idx: usize, n: u64) -> u64 {
        let p = self.producers as u64;
        n / p + u64::from((idx as u64) < n % p)
    }
}

/// One throughput phase's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseFigures {
    pub phase: Phase,
    /// Operations completed (warm-up included) and failed.
    pub completed: u64,
    pub failed: u64,
    pub measured_secs: f64,
    pub measured_msgs: u64,
    pub msgs_per_sec: f64,
    /// Plain: send -> ack. Transactional: half -> ack, then end -> ack, one after the other.
    pub total_latency: LatencySummary,
    pub half_latency: Option<LatencySummary>,
    pub end_latency: Option<LatencySummary>,
    /// Ack levels by request ("half disk", "end disk", "send disk").
    pub durability: BTreeMap<String, u64>,
    /// Ends the broker answered as already ended (a check-back got there first).
    pub duplicate_ends: u64,
    /// Check-backs the checker was asked about this phase's topic.
    pub check_backs: u64,
    pub errors: BTreeMap<String, u64>,
    pub cpu: CpuUse,
}

/// The check-back phase's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckFigures {
    pub transaction_timeout_ms: u64,
    pub transaction_check_interval_ms: u64,
    /// Halves acked (left UNKNOWN) and failed.
    pub halves: u64,
    pub failed: u64,
    pub half_latency: LatencySummary,
    /// Half's ack -> the checker's first call for it.
    pub to_check: LatencySummary,
    /// Half's ack -> the committed message's first delivery to a consumer.
    pub to_visible: LatencySummary,
    /// Halves resolved (visible) before the wait gave up.
    pub resolved: u64,
    /// The most check-backs one transaction took.
    pub max_checks: u32,
    pub checker_calls: u64,
    pub resolve_secs: f64,
}

/// One topic read back after the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Audit {
    pub topic: String,
    /// Ids that must be visible exactly once (`rollback`: none may be).
    pub expected: u64,
    pub distinct: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// Delivered ids that were not expected (rolled back, or never acked).
    pub unexpected: u64,
    /// Of the unexpected: ids whose send or end failed (their fate is open).
    pub unexpected_failed: u64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransactionsReport {
    pub tool: String,
    pub command: String,
    pub started_unix_ms: u64,
    pub git_commit: Option<String>,
    pub machine: MachineFacts,
    pub workload: TransactionsArgs,
    pub workload_description: String,
    pub broker: String,
    pub broker_flush_mode: String,
    pub data_fs: String,
    pub core_split: CoreSplit,
    pub phases: Vec<PhaseFigures>,
    /// Half + commit over plain: msgs/s and p50.
    pub tx_over_plain_throughput: f64,
    pub tx_over_plain_p50: f64,
    pub check: Option<CheckFigures>,
    pub audits: Vec<Audit>,
    pub notes: Vec<String>,
}

/// What a producer records in one phase.
struct PhaseLog {
    stats: ThreadStats,
    half: Hist,
    end: Hist,
    /// Ids that must be visible (plain: acked; commit: committed; check: half acked) or, in
    /// the rollback phase, must not be (rolled back).
    ids: Vec<u64>,
    /// Ids whose send, half or end failed.
    failed_ids: Vec<u64>,
    /// Check phase: (id, half ack µs since the run's base).
    half_acked_us: Vec<(u64, u64)>,
    durability: BTreeMap<String, u64>,
    duplicate_ends: u64,
    measured_from: Option<Instant>,
}

impl Default for PhaseLog {
    fn default() -> Self {
        PhaseLog {
            stats: ThreadStats::default(),
            half: new_hist(),
            end: new_hist(),
            ids: Vec::new(),
            failed_ids: Vec::new(),
            half_acked_us: Vec::new(),
            durability: BTreeMap::new(),
            duplicate_ends: 0,
            measured_from: None,
        }
    }
}

type SharedLog = Arc<Mutex<PhaseLog>>;

#[derive(Default)]
struct CheckLog {
    /// Check phase: id -> the checker's first call, µs since the run's base.
    first_check_us: HashMap<u64, u64>,
    calls: BTreeMap<Phase, u64>,
    max_checks: u32,
}

#[derive(Default)]
struct WatchLog {
    /// id -> first delivery, µs since the run's base.
    first_seen_us: HashMap<u64, u64>,
}

struct Ctx {
    a: TransactionsArgs,
    addr: String,
    group: String,
    topics: BTreeMap<Phase, String>,
    base: Instant,
    /// Index of the running phase (for the progress line).
    phase: AtomicUsize,
    phases: Vec<Phase>,
    abort: AtomicBool,
    stop_watch: AtomicBool,
    load_cores: Vec<usize>,
    checks: Mutex<CheckLog>,
    watch: Mutex<WatchLog>,
    /// [phase][producer].
    logs: Vec<Vec<SharedLog>>,
}

impl Ctx {
    fn phase_of_topic(&self, topic: &str) -> Option<Phase> {
        self.topics
            .iter()
            .find(|(_, t)| t.as_str() == topic)
            .map(|(p, _)| *p)
    }
}

pub fn run(a: TransactionsArgs) -> Result<(), String> {
    // Off unless RUST_LOG asks: the broker's and the clients' warnings (a check-back answer
    // that failed, say) explain an audit that failed.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
        .try_init();
    a.validate()?;
    crate::runner::install_interrupt_handler();
    let started_unix_ms = crate::runner::unix_ms();
    let (timeout, interval, max) = (
        a.transaction_timeout_ms,
        a.transaction_check_interval_ms,
        a.transaction_check_max,
    );
    let broker =
        EmbeddedBroker::start_with(&a.broker, &format!("transactions-{}", a.broker.mode), |c| {
            c.server.transaction_timeout_ms = timeout;
            c.server.transaction_check_interval_ms = interval;
            c.server.transaction_check_max = max;
        })?;
    let outcome = drive(&a, &broker);
    let (addr, split, fs) = (
        broker.addr.clone(),
        broker.split.clone(),
        broker.data_fs.clone(),
    );
    broker.stop();
    let mut report = outcome?;
    report.tool = format!("ringmq-bench {}", env!("CARGO_PKG_VERSION"));
    report.started_unix_ms = started_unix_ms;
    report.broker = format!("embedded ({addr})");
    report.core_split = split;
    report.data_fs = fs;
    println!("{}", table(&report));
    if let Some(dir) = &a.out {
        let json = serde_json::to_string_pretty(&report).expect("the report serializes");
        let f = write_file(dir, "transactions.json", &json)?;
        eprintln!("wrote {}", f.display());
    }
    let failed: Vec<&str> = report
        .audits
        .iter()
        .filter(|a| !a.ok)
        .map(|a| a.topic.as_str())
        .collect();
    if !failed.is_empty() {
        return Err(format!("the audit failed for {}", failed.join(", ")));
    }
    Ok(())
}

fn drive(a: &TransactionsArgs, broker: &EmbeddedBroker) -> Result<TransactionsReport, String> {
    let pid = std::process::id();
    let phases = a.phases();
    let topics: BTreeMap<Phase, String> = phases
        .iter()
        .map(|p| (*p, format!("ringmq-bench-{pid}-tx-{}", p.name())))
        .collect();
    let admin =
        Admin::connect(&broker.addr).map_err(|e| format!("cannot reach the broker: {e}"))?;
    let info = admin
        .broker_info()
        .map_err(|e| format!("broker info: {e}"))?;
    for t in topics.values() {
        admin
            .create_topic(t, a.queues)
            .map_err(|e| format!("cannot create {t}: {e}"))?;
    }
    let ctx = Arc::new(Ctx {
        a: a.clone(),
        addr: broker.addr.clone(),
        group: format!("ringmq-bench-{pid}-tx"),
        topics,
        base: Instant::now(),
        phase: AtomicUsize::new(0),
        phases: phases.clone(),
        abort: AtomicBool::new(false),
        stop_watch: AtomicBool::new(false),
        load_cores: broker.split.load_cores.clone(),
        checks: Mutex::new(CheckLog::default()),
        watch: Mutex::new(WatchLog::default()),
        logs: phases
            .iter()
            .map(|_| (0..a.producers).map(|_| SharedLog::default()).collect())
            .collect(),
    });
    eprintln!(
        "[transactions] {} against {}; {}",
        a.describe(),
        broker.addr,
        broker.split.describe()
    );
    let mut notes = Vec::new();

    // Producers, the main thread, and after the phases one more round: the producers (and
    // their checkers) stay until the check-backs are resolved.
    let barrier = Arc::new(Barrier::new(a.producers + 1));
    let producers: Vec<JoinHandle<Result<(), String>>> = (0..a.producers)
        .map(|i| {
            let (ctx, barrier) = (ctx.clone(), barrier.clone());
            std::thread::Builder::new()
                .name(format!("bench-tx-producer-{i}"))
                .spawn(move || producer_thread(i, &ctx, &barrier))
                .expect("spawn producer")
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let (ctx, done) = (ctx.clone(), done.clone());
        std::thread::spawn(move || progress_thread(&ctx, &done))
    };

    let mut cpu = Vec::new();
    let mut watchers = Vec::new();
    let mut check_window = None;
    for (i, &phase) in phases.iter().enumerate() {
        ctx.phase.store(i, Ordering::Relaxed);
        if phase == Phase::Check {
            watchers = (0..a.queues)
                .map(|q| {
                    let ctx = ctx.clone();
                    std::thread::Builder::new()
                        .name(format!("bench-tx-watch-{q}"))
                        .spawn(move || watch_thread(&ctx, q))
                        .expect("spawn watcher")
                })
                .collect();
        }
        eprintln!("[transactions] phase {}", phase.name());
        let before = CpuSnapshot::take();
        let started = Instant::now();
        barrier.wait();
        barrier.wait();
        cpu.push(before.until(&CpuSnapshot::take()));
        if phase == Phase::Check {
            check_window = Some(started);
        }
    }

    // The check-back phase resolves after its halves: wait until each is visible.
    let mut resolve_secs = 0.0;
    if let Some(started) = check_window {
        let check_idx = phases.iter().position(|p| *p == Phase::Check).unwrap();
        let expected: usize = ctx.logs[check_idx].iter().map(|l| lock(l).ids.len()).sum();
        let most = Duration::from_millis(
            a.transaction_timeout_ms
                + a.transaction_check_interval_ms * u64::from(a.transaction_check_max)
                + a.broker.flush_interval_ms,
        ) + RESOLVE_SLACK;
        let halves_done = Instant::now();
        loop {
            let seen = lock(&ctx.watch).first_seen_us.len();
            if seen >= expected {
                break;
            }
            if halves_done.elapsed() > most || interrupted() {
                let note = format!(
                    "check-back phase: only {seen} of {expected} halves became visible within \
                     {most:?} after the last half"
                );
                eprintln!("note: {note}");
                notes.push(note);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        resolve_secs = started.elapsed().as_secs_f64();
        ctx.stop_watch.store(true, Ordering::Relaxed);
    }
    for w in watchers {
        let _ = w.join();
    }
    barrier.wait();
    let mut failures: Vec<String> = producers
        .into_iter()
        .filter_map(|h| match h.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("a producer thread panicked".into()),
        })
        .collect();
    done.store(true, Ordering::Relaxed);
    let _ = progress.join();
    if !failures.is_empty() {
        if failures.len() > 1 {
            eprintln!("note: {} producers failed", failures.len());
        }
        return Err(failures.swap_remove(0));
    }

    // Figures per phase.
    let mut figures = Vec::new();
    let mut check = None;
    let mut hgrms: Vec<(String, Hist)> = Vec::new();
    let checks = lock(&ctx.checks);
    for (i, &phase) in phases.iter().enumerate() {
        let logs: Vec<_> = ctx.logs[i].iter().map(|l| lock(l)).collect();
        let total = merge_all(logs.iter().map(|l| &l.stats.total));
        let half = merge_all(logs.iter().map(|l| &l.half));
        let end = merge_all(logs.iter().map(|l| &l.end));
        let completed: u64 = logs.iter().map(|l| l.stats.ok_msgs).sum();
        let failed: u64 = logs.iter().map(|l| l.failed_ids.len() as u64).sum();
        if phase == Phase::Check {
            let watch = lock(&ctx.watch);
            let (mut to_check, mut to_visible) = (new_hist(), new_hist());
            for l in &logs {
                for &(id, acked_us) in &l.half_acked_us {
                    if let Some(&c) = checks.first_check_us.get(&id) {
                        to_check.saturating_record(c.saturating_sub(acked_us).max(1));
                    }
                    if let Some(&v) = watch.first_seen_us.get(&id) {
                        to_visible.saturating_record(v.saturating_sub(acked_us).max(1));
                    }
                }
            }
            check = Some(CheckFigures {
                transaction_timeout_ms: a.transaction_timeout_ms,
                transaction_check_interval_ms: a.transaction_check_interval_ms,
                halves: completed,
                failed,
                half_latency: LatencySummary::from_hist(&half),
                to_check: LatencySummary::from_hist(&to_check),
                to_visible: LatencySummary::from_hist(&to_visible),
                resolved: to_visible.len(),
                max_checks: checks.max_checks,
                checker_calls: checks.calls.get(&Phase::Check).copied().unwrap_or(0),
                resolve_secs,
            });
            hgrms.push(("tx-check-to-visible.hgrm".into(), to_visible));
            hgrms.push(("tx-check-to-checker.hgrm".into(), to_check));
            continue;
        }
        let from = logs.iter().filter_map(|l| l.measured_from).min();
        let last = logs.iter().filter_map(|l| l.stats.last_completion).max();
        let measured_secs = match (from, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        let measured_msgs: u64 = logs.iter().map(|l| l.stats.measured_msgs).sum();
        let mut durability = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for l in &logs {
            for (k, v) in &l.durability {
                *durability.entry(k.clone()).or_insert(0) += v;
            }
            for (k, v) in &l.stats.errors {
                *errors.entry(k.clone()).or_insert(0) += v;
            }
        }
        let tx = phase != Phase::Plain;
        figures.push(PhaseFigures {
            phase,
            completed,
            failed,
            measured_secs,
            measured_msgs,
            msgs_per_sec: if measured_secs > 0.0 {
                measured_msgs as f64 / measured_secs
            } else {
                0.0
            },
            total_latency: LatencySummary::from_hist(&total),
            half_latency: tx.then(|| LatencySummary::from_hist(&half)),
            end_latency: tx.then(|| LatencySummary::from_hist(&end)),
            durability,
            duplicate_ends: logs.iter().map(|l| l.duplicate_ends).sum(),
            check_backs: checks.calls.get(&phase).copied().unwrap_or(0),
            errors,
            cpu: cpu[i],
        });
        hgrms.push((format!("tx-{}.hgrm", phase.name()), total));
        if tx {
            hgrms.push((format!("tx-{}-half.hgrm", phase.name()), half));
            hgrms.push((format!("tx-{}-end.hgrm", phase.name()), end));
        }
    }
    drop(checks);

    let audits = audit(&ctx)?;
    let get = |p: Phase| figures.iter().find(|f| f.phase == p);
    let (tput, p50) = match (get(Phase::Plain), get(Phase::Commit)) {
        (Some(plain), Some(tx)) => (
            ratio(tx.msgs_per_sec, plain.msgs_per_sec),
            ratio(
                tx.total_latency.p50_us as f64,
                plain.total_latency.p50_us as f64,
            ),
        ),
        _ => (0.0, 0.0),
    };
    if interrupted() {
        notes.push("interrupted (Ctrl-C): the figures are partial".into());
    }
    if let Some(dir) = &a.out {
        for (name, h) in &hgrms {
            let f = write_file(dir, name, &hgrm(h, 1.0))?;
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(TransactionsReport {
        tool: String::new(),
        command: "transactions".into(),
        started_unix_ms: 0,
        git_commit: machine::git_commit(),
        machine: MachineFacts::collect(Some(a.broker.data_root.as_path())),
        workload: a.clone(),
        workload_description: a.describe(),
        broker: String::new(),
        broker_flush_mode: info.flush_mode.clone(),
        data_fs: String::new(),
        core_split: CoreSplit::default(),
        phases: figures,
        tx_over_plain_throughput: tput,
        tx_over_plain_p50: p50,
        check,
        audits,
        notes,
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// What a check-back of `c` is answered: as the producer of its phase decides.
fn answer_check(ctx: &Ctx, c: &CheckBack) -> TransactionOutcome {
    let now_us = as_us(ctx.base.elapsed());
    let phase = ctx.phase_of_topic(&c.topic);
    let mut log = lock(&ctx.checks);
    log.max_checks = log.max_checks.max(c.checks);
    let Some(phase) = phase else {
        return TransactionOutcome::Unknown;
    };
    *log.calls.entry(phase).or_insert(0) += 1;
    match phase {
        Phase::Check => {
            for m in &c.messages {
                if let Some((_, id)) = read_payload(&m.payload) {
                    log.first_check_us.entry(id).or_insert(now_us);
                }
            }
            TransactionOutcome::Commit
        }
        Phase::Commit => TransactionOutcome::Commit,
        Phase::Rollback => TransactionOutcome::Rollback,
        Phase::Plain => TransactionOutcome::Unknown,
    }
}

fn producer_thread(idx: usize, ctx: &Arc<Ctx>, barrier: &Barrier) -> Result<(), String> {
    // Every thread meets every barrier, failed or not, so no one waits forever.
    let setup = (|| {
        machine::pin_current_thread(&ctx.load_cores)?;
        let plain = Producer::connect(&ctx.addr)
            .map_err(|e| format!("producer {idx} cannot start: {e}"))?;
        let mut config = TransactionConfig::new(ctx.addr.clone(), ctx.group.clone());
        config.check_wait = CHECK_WAIT;
        let checker_ctx = ctx.clone();
        let tx = TransactionalProducer::start(
            config,
            Arc::new(move |c: &CheckBack| answer_check(&checker_ctx, c)),
        )
        .map_err(|e| format!("transactional producer {idx} cannot start: {e}"))?;
        Ok::<_, String>((plain, tx))
    })();
    let mut failure = None;
    let clients = match setup {
        Ok(c) => Some(c),
        Err(e) => {
            ctx.abort.store(true, Ordering::Relaxed);
            failure = Some(e);
            None
        }
    };
    for (i, &phase) in ctx.phases.iter().enumerate() {
        barrier.wait();
        if let Some((plain, tx)) = &clients {
            if let Err(e) = run_phase(idx, ctx, phase, &ctx.logs[i][idx], plain, tx) {
                ctx.abort.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
        barrier.wait();
    }
    // Until the check-backs are resolved: this producer's checker answers them.
    barrier.wait();
    if let Some((_, tx)) = clients {
        tx.close();
    }
    failure.map_or(Ok(()), Err)
}

fn run_phase(
    idx: usize,
    ctx: &Ctx,
    phase: Phase,
    log: &SharedLog,
    plain: &Producer,
    tx: &TransactionalProducer,
) -> Result<(), String> {
    let a = &ctx.a;
    let start = Instant::now();
    let check = phase == Phase::Check;
    let warmup = if check {
        Duration::ZERO
    } else {
        Duration::from_secs(a.warmup_secs)
    };
    lock(log).measured_from = Some(start + warmup);
    let quota = if check {
        Some(a.quota(idx, a.check_messages))
    } else {
        a.messages.map(|n| a.quota(idx, n))
    };
    let end_at = warmup + Duration::from_secs(a.duration_secs);
    let topic = &ctx.topics[&phase];
    let template = vec![0x5Au8; a.message_bytes];
    let bytes_each = a.message_bytes as u64;
    let mut seq = 0u64;
    let mut consecutive_errors = 0u32;
    while !ctx.abort.load(Ordering::Relaxed) && !interrupted() {
        let t = start.elapsed();
        match quota {
            Some(q) if seq >= q => break,
            None if t >= end_at => break,
            _ => {}
        }
        let measured = t >= warmup;
        let id = message_id(idx, seq);
        seq += 1;
        let message = make_message(&template, as_us(ctx.base.elapsed()), id);
        let sent = Instant::now();
        let outcome: Result<(), String> = match phase {
            Phase::Plain => plain
                .send_batch(topic, QueueSelector::RoundRobin, &[message])
                .map(|r| {
                    let mut l = lock(log);
                    l.stats
                        .record(as_us(sent.elapsed()), 1, bytes_each, measured);
                    *l.durability
                        .entry(format!("send {}", r.durability))
                        .or_insert(0) += 1;
                    l.ids.push(id);
                })
                .map_err(|e| error_kind(&e)),
            Phase::Commit | Phase::Rollback | Phase::Check => {
                match tx.send_half(topic, QueueSelector::RoundRobin, &[message]) {
                    Err(e) => Err(format!("half {}", error_kind(&e))),
                    Ok(half) => {
                        let half_us = as_us(sent.elapsed());
                        let acked_at_us = as_us(ctx.base.elapsed());
                        if check {
                            // UNKNOWN: no end; the broker checks back.
                            let mut l = lock(log);
                            l.half.saturating_record(half_us.max(1));
                            l.stats.record(half_us, 1, bytes_each, true);
                            *l.durability
                                .entry(format!("half {}", half.durability))
                                .or_insert(0) += 1;
                            l.ids.push(id);
                            l.half_acked_us.push((id, acked_at_us));
                            Ok(())
                        } else {
                            let outcome = if phase == Phase::Commit {
                                TransactionOutcome::Commit
                            } else {
                                TransactionOutcome::Rollback
                            };
                            let end_started = Instant::now();
                            match tx.end(&half, outcome) {
                                Err(e) => Err(format!("end {}", error_kind(&e))),
                                Ok(ended) => {
                                    let end_us = as_us(end_started.elapsed());
                                    let mut l = lock(log);
                                    let want = if phase == Phase::Commit {
                                        TransactionState::Committed
                                    } else {
                                        TransactionState::RolledBack
                                    };
                                    if ended.state != want {
                                        return Err(format!(
                                            "producer {idx}: {outcome:?} of {} ended as {:?}",
                                            half.transaction_id, ended.state
                                        ));
                                    }
                                    if measured {
                                        l.half.saturating_record(half_us.max(1));
                                        l.end.saturating_record(end_us.max(1));
                                    }
                                    l.stats
                                        .record(as_us(sent.elapsed()), 1, bytes_each, measured);
                                    *l.durability
                                        .entry(format!("half {}", half.durability))
                                        .or_insert(0) += 1;
                                    *l.durability
                                        .entry(format!("end {}", ended.durability))
                                        .or_insert(0) += 1;
                                    l.duplicate_ends += u64::from(ended.duplicate);
                                    l.ids.push(id);
                                    Ok(())
                                }
                            }
                        }
                    }
                }
            }
        };
        match outcome {
            Ok(()) => consecutive_errors = 0,
            Err(kind) => {
                let mut l = lock(log);
                l.stats.error(kind.clone(), 1);
                l.failed_ids.push(id);
                drop(l);
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    return Err(format!(
                        "producer {idx}, phase {}: {MAX_CONSECUTIVE_ERRORS} sends in a row \
                         failed, last: {kind}",
                        phase.name()
                    ));
                }
            }
        }
        if check && a.check_gap_ms > 0 {
            std::thread::sleep(Duration::from_millis(a.check_gap_ms));
        }
    }
    Ok(())
}

/// Check-back phase: long-polls one queue of its topic and notes each id's first delivery.
fn watch_thread(ctx: &Ctx, queue: u32) {
    let topic = &ctx.topics[&Phase::Check];
    let Ok(consumer) = Consumer::connect(&ctx.addr) else {
        return;
    };
    let mut offset = 0;
    while !ctx.stop_watch.load(Ordering::Relaxed) {
        let Ok(f) = consumer.fetch(topic, queue, offset, WATCH_WAIT) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let now_us = as_us(ctx.base.elapsed());
        let mut w = lock(&ctx.watch);
        for m in &f.messages {
            if let Some((_, id)) = read_payload(&m.payload) {
                w.first_seen_us.entry(id).or_insert(now_us);
            }
        }
        offset = f.next_offset;
    }
}

/// Every id of `topic`'s queues, read from the start to the visible end.
fn read_ids(consumer: &Consumer, topic: &str, queues: u32) -> Result<Vec<u64>, String> {
    let mut ids = Vec::new();
    for q in 0..queues {
        let mut offset = 0;
        loop {
            let f = consumer
                .fetch(topic, q, offset, Duration::ZERO)
                .map_err(|e| format!("audit fetch {topic}/{q}@{offset}: {e}"))?;
            if f.messages.is_empty() {
                break;
            }
            ids.extend(
                f.messages
                    .iter()
                    .map(|m| read_payload(&m.payload).map_or(u64::MAX, |(_, id)| id)),
            );
            offset = f.next_offset;
        }
    }
    Ok(ids)
}

/// Reads each phase's topic back: expected ids once, rolled back ones never. Under
/// ASYNC_FLUSH the last messages become visible with the next flush: reread until the figures
/// are whole or a flush interval and some slack passed.
fn audit(ctx: &Ctx) -> Result<Vec<Audit>, String> {
    let consumer = Consumer::connect(&ctx.addr).map_err(|e| format!("audit: {e}"))?;
    let patience = Duration::from_millis(ctx.a.broker.flush_interval_ms) + RESOLVE_SLACK;
    let mut out = Vec::new();
    for (i, &phase) in ctx.phases.iter().enumerate() {
        let topic = &ctx.topics[&phase];
        let logs: Vec<_> = ctx.logs[i].iter().map(|l| lock(l)).collect();
        let ids: Vec<u64> = logs.iter().flat_map(|l| l.ids.iter().copied()).collect();
        let failed: std::collections::HashSet<u64> = logs
            .iter()
            .flat_map(|l| l.failed_ids.iter().copied())
            .collect();
        drop(logs);
        let must_see = phase != Phase::Rollback;
        let expected: std::collections::HashSet<u64> = if must_see {
            ids.iter().copied().collect()
        } else {
            Default::default()
        };
        let started = Instant::now();
        let a = loop {
            let mut counts: HashMap<u64, u64> = HashMap::new();
            for id in read_ids(&consumer, topic, ctx.a.queues)? {
                *counts.entry(id).or_insert(0) += 1;
            }
            let lost = expected
                .iter()
                .filter(|id| !counts.contains_key(id))
                .count() as u64;
            let unexpected: Vec<u64> = counts
                .keys()
                .filter(|id| !expected.contains(id))
                .copied()
                .collect();
            let unexpected_failed =
                unexpected.iter().filter(|id| failed.contains(id)).count() as u64;
            let a = Audit {
                topic: format!("{} ({})", phase.name(), topic),
                expected: expected.len() as u64,
                distinct: counts.len() as u64,
                duplicates: counts.values().map(|c| c - 1).sum(),
                lost,
                unexpected: unexpected.len() as u64,
                unexpected_failed,
                ok: false,
            };
            if lost == 0 || started.elapsed() > patience {
                break a;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let ok = a.lost == 0 && a.duplicates == 0 && a.unexpected == a.unexpected_failed;
        out.push(Audit { ok, ..a });
    }
    Ok(out)
}

fn progress_thread(ctx: &Ctx, done: &AtomicBool) {
    let started = Instant::now();
    let mut second = 1u64;
    while !done.load(Ordering::Relaxed) {
        let tick = started + Duration::from_secs(second);
        while Instant::now() < tick && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
        let i = ctx.phase.load(Ordering::Relaxed);
        let mut parts = Vec::new();
        let mut n = 0;
        let mut errors = 0;
        for l in &ctx.logs[i] {
            let mut l = lock(l);
            let (h, m) = l.stats.take_interval();
            n += m;
            errors += l.failed_ids.len();
            parts.push(h);
        }
        let h = merge_all(parts.iter());
        let p99 = if h.is_empty() {
            "-".to_string()
        } else {
            fmt_us(h.value_at_quantile(0.99))
        };
        let resolved = lock(&ctx.watch).first_seen_us.len();
        eprintln!(
            "[transactions] {second:>4}s {:<8} {n:>7} op/s  p99 {p99:>9}  errors {errors}  \
             checked back and visible {resolved}",
            ctx.phases[i].name()
        );
        second += 1;
    }
}

fn table(r: &TransactionsReport) -> String {
    let l = |s: &LatencySummary| {
        format!(
            "{} | {} | {} | {} | {}",
            s.count,
            fmt_us(s.p50_us),
            fmt_us(s.p99_us),
            fmt_us(s.p999_us),
            fmt_us(s.max_us)
        )
    };
    let mut s = format!(
        "\n{}\n{}; {}\n\n\
         | operation | msgs/s | count | p50 | p99 | p99.9 | max |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        r.workload_description,
        r.broker,
        r.core_split.describe(),
    );
    for f in &r.phases {
        match f.phase {
            Phase::Plain => s.push_str(&format!(
                "| plain SYNC send -> ack | {:.0} | {} |\n",
                f.msgs_per_sec,
                l(&f.total_latency)
            )),
            p => {
                let end = if p == Phase::Commit {
                    "commit"
                } else {
                    "rollback"
                };
                if let Some(h) = &f.half_latency {
                    s.push_str(&format!("| half -> ack | | {} |\n", l(h)));
                }
                if let Some(e) = &f.end_latency {
                    s.push_str(&format!("| end ({end}) -> ack | | {} |\n", l(e)));
                }
                s.push_str(&format!(
                    "| half + {end} | {:.0} | {} |\n",
                    f.msgs_per_sec,
                    l(&f.total_latency)
                ));
            }
        }
    }
    s.push_str(&format!(
        "\nhalf + commit / plain: {:.2}x the msgs/s, {:.2}x the p50\n",
        r.tx_over_plain_throughput, r.tx_over_plain_p50
    ));
    if let Some(c) = &r.check {
        s.push_str(&format!(
            "\n| check-back (transaction_timeout_ms {}, transaction_check_interval_ms {}) | count \
             | p50 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|\n\
             | half -> ack (left UNKNOWN) | {} |\n\
             | half ack -> checker called | {} |\n\
             | half ack -> committed message visible to a consumer | {} |\n\
             \nof which the configured timeout: {} ms; resolved {} of {} halves ({} failed), \
             checker calls {}, most checks for one transaction {}\n",
            c.transaction_timeout_ms,
            c.transaction_check_interval_ms,
            l(&c.half_latency),
            l(&c.to_check),
            l(&c.to_visible),
            c.transaction_timeout_ms,
            c.resolved,
            c.halves,
            c.failed,
            c.checker_calls,
            c.max_checks,
        ));
    }
    s.push_str(
        "\n| phase | failed | ack levels | ends already ended | check-backs | load CPU | broker CPU |\n\
         |---|---:|---|---:|---:|---:|---:|\n",
    );
    for f in &r.phases {
        let d: Vec<String> = f
            .durability
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} % | {:.0} % |\n",
            f.phase.name(),
            f.failed,
            d.join(", "),
            f.duplicate_ends,
            f.check_backs,
            f.cpu.load_cpu_pct,
            f.cpu.broker_cpu_pct
        ));
    }
    s.push_str(
        "\n| audit | expected | distinct | duplicates | lost | unexpected | verdict |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for a in &r.audits {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            a.topic,
            a.expected,
            a.distinct,
            a.duplicates,
            a.lost,
            a.unexpected,
            if a.ok { "ok" } else { "FAILED" }
        ));
    }
    for f in &r.phases {
        if !f.errors.is_empty() {
            let e: Vec<String> = f.errors.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            s.push_str(&format!("\n{} errors: {}\n", f.phase.name(), e.join(", ")));
        }
    }
    for n in &r.notes {
        s.push_str(&format!("\nnote: {n}\n"));
    }
    s
}
