//! `ringmq-bench groups`: producers send to a topic while the members of one consumer group
//! poll, ack and commit it, on a fresh embedded broker.
//!
//! Every payload carries its id and its send time (µs since the run's base `Instant`; both
//! sides are in this process), so the run measures end-to-end latency (send -> first
//! delivery), counts duplicates and checks that every acked id was delivered at least once.
//! Besides the client's auto-commit, each member calls `commit()` itself every
//! `--commit-interval-ms`; those calls are timed into their own histogram with the
//! durability each answer reports.
//!
//! Producers start only once the group's assignment settled (every member holds its share
//! of the topic's queues), so the join's rebalances are not in the figures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use ringmq::client::{Admin, GroupConfig, GroupConsumer, Producer, ProducerConfig, QueueSelector};
use serde::{Deserialize, Serialize};

use crate::embedded::{
    join_member, make_message, message_id, read_payload, write_file, BrokerArgs, EmbeddedBroker,
    Tally, PAYLOAD_HEADER_BYTES,
};
use crate::hist::{as_us, merge_all, new_hist, Hist, LatencySummary, SharedStats, ThreadStats};
use crate::machine::{self, CoreSplit, CpuSnapshot, CpuUse, MachineFacts};
use crate::report::{fmt_us, hgrm};
use crate::runner::lock;
use crate::runner::{error_kind, interrupted};
use crate::workload::SendMode;

/// How long `poll` waits for messages before the member looks at its stop flag and timers.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// How long the members may take to settle their assignment before producing starts.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// A producer that fails this many sends in a row gives up.
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct GroupsArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Producer threads.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Group members (GroupConsumer, one thread each, all in one group).
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Queues of the bench topic.
    #[arg(long, default_value_t = 4)]
    pub queues: u32,
    /// Payload bytes (at least 16: send time and id).
    #[arg(long, default_value_t = 256)]
    pub message_bytes: usize,
    /// sync: `send_batch` waits for each ack; async: pipelined `send_async`.
    #[arg(long, value_enum, default_value_t = SendMode::Sync)]
    pub send_mode: SendMode,
    /// Messages per sync send; async: the client's batch is this many messages' bytes.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Async sends: how long a batch waits for more messages.
    #[arg(long, default_value_t = 2)]
    pub linger_ms: u64,
    /// Seconds of producing after the warm-up (ignored with --messages).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Send this many messages in all (warm-up included), then stop.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Seconds at the start excluded from the rates and latencies (not from the audit).
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// The group consumer's auto-commit interval.
    #[arg(long, default_value_t = 1000)]
    pub auto_commit_ms: u64,
    /// Each member also calls commit() itself this often (timed); 0: after every poll.
    #[arg(long, default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// After the producers stop: how long the members may take to deliver every acked id.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Write groups.json, groups-e2e.hgrm and groups-commit.hgrm into DIR.
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub out: Option<PathBuf>,
}

impl GroupsArgs {
    fn validate(&self) -> Result<(), String> {
        let mut p = Vec::new();
        self.broker.problems(&mut p);
        if self.producers == 0 || self.consumers == 0 || self.queues == 0 {
            p.push("--producers, --consumers and --queues must be at least 1".into());
        }
        if self.message_bytes < PAYLOAD_HEADER_BYTES {
            p.push(format!(
                "--message-bytes must be at least {PAYLOAD_HEADER_BYTES} (send time and id)"
            ));
        }
        if self.batch == 0 {
            p.push("--batch must be at least 1".into());
        }
        if self.send_mode == SendMode::Oneway {
            p.push("--send-mode oneway has no acks to audit: use sync or async".into());
        }
        if self.messages.is_none() && self.duration_secs == 0 {
            p.push("--duration-secs must be at least 1 (or give --messages)".into());
        }
        if self.messages == Some(0) {
            p.push("--messages must be at least 1".into());
        }
        if self.auto_commit_ms == 0 {
            p.push("--auto-commit-ms must be at least 1".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("\n"))
        }
    }

    fn describe(&self) -> String {
        let length = match self.messages {
            Some(n) => format!("{n} msgs"),
            None => format!("{} s + {} s warm-up", self.duration_secs, self.warmup_secs),
        };
        format!(
            "{} flush, {} sends (batch {}), {} producers, {} group members, {} queues, {} B msgs, \
             {length}, auto-commit {} ms, explicit commit every {} ms",
            self.broker.mode,
            self.send_mode,
            self.batch,
            self.producers,
            self.consumers,
            self.queues,
            self.message_bytes,
            self.auto_commit_ms,
            self.commit_interval_ms
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProduceFigures {
    /// Messages acked (warm-up included) and whose send failed.
    pub acked: u64,
    pub failed: u64,
    /// Measured window (after the warm-up).
    pub measured_secs: f64,
    pub measured_msgs: u64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    /// send -> ack.
    pub ack_latency: LatencySummary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumeFigures {
    /// Every delivery, first or repeated.
    pub deliveries: u64,
    pub distinct: u64,
    pub duplicates: u64,
    /// Acked ids never delivered.
    pub lost: u64,
    /// Payloads without an id of this run.
    pub foreign: u64,
    /// First deliveries of ids sent after the warm-up, over the time from the warm-up's end
    /// to the last of them.
    pub measured_secs: f64,
    pub measured_msgs: u64,
    pub msgs_per_sec: f64,
    /// send -> first delivery, ids sent after the warm-up.
    pub e2e_latency: LatencySummary,
    /// Time from the producers' end until every acked id was delivered (or the drain gave up).
    pub drain_secs: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CommitFigures {
    /// Explicit commit() calls that sent offsets (timed), that had nothing new, and failed.
    pub calls: u64,
    pub nothing_new: u64,
    pub failed: u64,
    pub latency: LatencySummary,
    /// The durability the broker reported, by level, over the timed calls.
    pub durability: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupsReport {
    pub tool: String,
    pub command: String,
    pub started_unix_ms: u64,
    pub git_commit: Option<String>,
    pub machine: MachineFacts,
    pub workload: GroupsArgs,
    pub workload_description: String,
    pub broker: String,
    pub broker_flush_mode: String,
    pub data_fs: String,
    pub core_split: CoreSplit,
    pub group: String,
    pub topic: String,
    /// Seconds the members took to settle their assignment before producing started.
    pub settle_secs: f64,
    pub produce: ProduceFigures,
    pub consume: ConsumeFigures,
    pub commit: CommitFigures,
    /// Errors by kind (producer, poll), warm-up included.
    pub errors: BTreeMap<String, u64>,
    /// From the producers' start to the members' end.
    pub cpu: CpuUse,
    pub notes: Vec<String>,
}

struct Ctx {
    addr: String,
    topic: String,
    group: String,
    a: GroupsArgs,
    base: Instant,
    warmup: Duration,
    start_producing: AtomicBool,
    stop_consumers: AtomicBool,
    abort: AtomicBool,
    load_cores: Vec<usize>,
    tally: Mutex<Tally>,
    /// Per member: how many of the topic's queues it holds now.
    held: Vec<AtomicUsize>,
    joined: AtomicUsize,
    /// Messages acked so far (shared with the async callbacks, which outlive a borrow).
    acked: Arc<AtomicU64>,
}

/// What a producer leaves behind.
#[derive(Default)]
struct ProducerLog {
    /// Sequence numbers handed out (0..sent).
    sent: u64,
    /// Of those, the ones whose send failed.
    failed: Vec<u64>,
}

type SharedLog = Arc<Mutex<ProducerLog>>;

pub fn run(a: GroupsArgs) -> Result<(), String> {
    a.validate()?;
    crate::runner::install_interrupt_handler();
    let started_unix_ms = crate::runner::unix_ms();
    let broker = EmbeddedBroker::start(&a.broker, &format!("groups-{}", a.broker.mode))?;
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
        let f = write_file(dir, "groups.json", &json)?;
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

fn drive(a: &GroupsArgs, broker: &EmbeddedBroker) -> Result<GroupsReport, String> {
    let pid = std::process::id();
    let topic = format!("ringmq-bench-{pid}-groups");
    let group = format!("ringmq-bench-{pid}");
    let admin =
        Admin::connect(&broker.addr).map_err(|e| format!("cannot reach the broker: {e}"))?;
    let info = admin
        .broker_info()
        .map_err(|e| format!("broker info: {e}"))?;
    admin
        .create_topic(&topic, a.queues)
        .map_err(|e| format!("cannot create {topic}: {e}"))?;
    admin
        .create_group(&group, 16, 0)
        .map_err(|e| format!("cannot create group {group}: {e}"))?;
    let ctx = Arc::new(Ctx {
        addr: broker.addr.clone(),
        topic: topic.clone(),
        group: group.clone(),
        a: a.clone(),
        base: Instant::now(),
        warmup: Duration::from_secs(a.warmup_secs),
        start_producing: AtomicBool::new(false),
        stop_consumers: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        load_cores: broker.split.load_cores.clone(),
        tally: Mutex::new(Tally::default()),
        held: (0..a.consumers).map(|_| AtomicUsize::new(0)).collect(),
        joined: AtomicUsize::new(0),
        acked: Arc::new(AtomicU64::new(0)),
    });
    eprintln!(
        "[groups] {} against {}; {}",
        a.describe(),
        broker.addr,
        broker.split.describe()
    );
    let mut notes = Vec::new();

    let consumer_stats: Vec<SharedStats> =
        (0..a.consumers).map(|_| ThreadStats::shared()).collect();
    let consumers: Vec<JoinHandle<Result<CommitLog, String>>> = (0..a.consumers)
        .map(|i| {
            let (ctx, stats) = (ctx.clone(), consumer_stats[i].clone());
            std::thread::Builder::new()
                .name(format!("bench-member-{i}"))
                .spawn(move || {
                    let r = member_thread(i, &ctx, &stats);
                    if r.is_err() {
                        ctx.abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .expect("spawn member")
        })
        .collect();

    // Producing starts once every member joined and the topic's queues are dealt evenly.
    let settle_start = Instant::now();
    let even = |held: &[usize]| {
        let total: usize = held.iter().sum();
        let (min, max) = (
            held.iter().copied().min().unwrap_or(0),
            held.iter().copied().max().unwrap_or(0),
        );
        total == a.queues as usize && max - min <= 1
    };
    loop {
        let held: Vec<usize> = ctx.held.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        if ctx.joined.load(Ordering::Relaxed) == a.consumers && even(&held) {
            break;
        }
        if ctx.abort.load(Ordering::Relaxed) || interrupted() {
            break;
        }
        if settle_start.elapsed() > SETTLE_TIMEOUT {
            let note = format!(
                "the assignment did not settle within {SETTLE_TIMEOUT:?} (queues held per \
                 member: {held:?}); producing anyway"
            );
            eprintln!("note: {note}");
            notes.push(note);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let settle_secs = settle_start.elapsed().as_secs_f64();
    eprintln!("[groups] assignment settled in {settle_secs:.2} s");

    let cpu_before = CpuSnapshot::take();
    // The run's clock starts with the producers: warm-up and duration count from here.
    let produce_base = ctx.base.elapsed();
    ctx.start_producing.store(true, Ordering::Relaxed);
    let producer_stats: Vec<SharedStats> =
        (0..a.producers).map(|_| ThreadStats::shared()).collect();
    let producer_logs: Vec<SharedLog> = (0..a.producers).map(|_| SharedLog::default()).collect();
    let producers: Vec<JoinHandle<Result<(), String>>> = (0..a.producers)
        .map(|i| {
            let (ctx, stats, log) = (
                ctx.clone(),
                producer_stats[i].clone(),
                producer_logs[i].clone(),
            );
            std::thread::Builder::new()
                .name(format!("bench-producer-{i}"))
                .spawn(move || {
                    let r = producer_thread(i, &ctx, produce_base, &stats, &log);
                    if r.is_err() {
                        ctx.abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .expect("spawn producer")
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let progress = {
        let (ctx, done) = (ctx.clone(), done.clone());
        let (p, c) = (producer_stats.clone(), consumer_stats.clone());
        std::thread::spawn(move || progress_thread(&ctx, produce_base, &p, &c, &done))
    };

    let mut failures: Vec<String> = producers
        .into_iter()
        .filter_map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("a producer panicked".into()))
                .err()
        })
        .collect();
    let producers_done = Instant::now();
    let acked = ctx.acked.load(Ordering::Relaxed);
    let drain_until = producers_done + Duration::from_secs(a.drain_secs);
    while lock(&ctx.tally).distinct < acked
        && Instant::now() < drain_until
        && !ctx.abort.load(Ordering::Relaxed)
        && !interrupted()
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drain_secs = producers_done.elapsed().as_secs_f64();
    if lock(&ctx.tally).distinct < acked {
        let note = format!(
            "the members had not delivered every acked message {:.1} s after the producers \
             stopped",
            drain_secs
        );
        eprintln!("note: {note}");
        notes.push(note);
    }
    ctx.stop_consumers.store(true, Ordering::Relaxed);
    let mut commits = Vec::new();
    for t in consumers {
        match t.join() {
            Ok(Ok(c)) => commits.push(c),
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a member panicked".into()),
        }
    }
    let cpu = cpu_before.until(&CpuSnapshot::take());
    done.store(true, Ordering::Relaxed);
    let _ = progress.join();
    if !failures.is_empty() {
        return Err(format!("[groups] {}", failures.join("; ")));
    }

    // Figures.
    let measure_start = ctx.base + produce_base + ctx.warmup;
    let window = |last: Option<Instant>| {
        last.map_or(0.0, |l| {
            l.saturating_duration_since(measure_start).as_secs_f64()
        })
    };
    let per_sec = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let p: Vec<_> = producer_stats.iter().map(|s| lock(s)).collect();
    let ack_hist = merge_all(p.iter().map(|s| &s.total));
    let p_msgs: u64 = p.iter().map(|s| s.measured_msgs).sum();
    let p_bytes: u64 = p.iter().map(|s| s.measured_bytes).sum();
    let p_secs = window(p.iter().filter_map(|s| s.last_completion).max());
    let c: Vec<_> = consumer_stats.iter().map(|s| lock(s)).collect();
    let e2e_hist = merge_all(c.iter().map(|s| &s.total));
    let c_msgs: u64 = c.iter().map(|s| s.measured_msgs).sum();
    let c_secs = window(c.iter().filter_map(|s| s.last_completion).max());
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (side, stats) in [("produce", &p), ("poll", &c)] {
        for s in stats.iter() {
            for (k, v) in &s.errors {
                *errors.entry(format!("{side} {k}")).or_insert(0) += v;
            }
        }
    }
    let logs: Vec<_> = producer_logs.iter().map(|l| lock(l)).collect();
    let sent: Vec<u64> = logs.iter().map(|l| l.sent).collect();
    let failed: Vec<Vec<u64>> = logs.iter().map(|l| l.failed.clone()).collect();
    let tally = lock(&ctx.tally);
    let lost = tally.lost(&sent, &failed);
    let mut commit_hist = new_hist();
    let mut commit = CommitFigures::default();
    for l in &commits {
        crate::hist::merge(&mut commit_hist, &l.hist);
        commit.calls += l.calls;
        commit.nothing_new += l.nothing_new;
        commit.failed += l.failed;
        for (k, v) in &l.durability {
            *commit.durability.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &l.errors {
            let k = if k.starts_with("close ") || k.starts_with("join ") {
                k.clone()
            } else {
                format!("commit {k}")
            };
            *errors.entry(k).or_insert(0) += v;
        }
    }
    commit.latency = LatencySummary::from_hist(&commit_hist);
    let report = GroupsReport {
        tool: String::new(),
        command: "groups".into(),
        started_unix_ms: 0,
        git_commit: machine::git_commit(),
        machine: MachineFacts::collect(Some(a.broker.data_root.as_path())),
        workload: a.clone(),
        workload_description: a.describe(),
        broker: String::new(),
        broker_flush_mode: info.flush_mode.clone(),
        data_fs: String::new(),
        core_split: CoreSplit::default(),
        group,
        topic,
        settle_secs,
        produce: ProduceFigures {
            acked,
            failed: failed.iter().map(|f| f.len() as u64).sum(),
            measured_secs: p_secs,
            measured_msgs: p_msgs,
            msgs_per_sec: per_sec(p_msgs, p_secs),
            mb_per_sec: per_sec(p_bytes, p_secs) / 1e6,
            ack_latency: LatencySummary::from_hist(&ack_hist),
        },
        consume: ConsumeFigures {
            deliveries: tally.deliveries,
            distinct: tally.distinct,
            duplicates: tally.duplicates,
            lost,
            foreign: tally.foreign,
            measured_secs: c_secs,
            measured_msgs: c_msgs,
            msgs_per_sec: per_sec(c_msgs, c_secs),
            e2e_latency: LatencySummary::from_hist(&e2e_hist),
            drain_secs,
        },
        commit,
        errors,
        cpu,
        notes,
    };
    if let Some(dir) = &a.out {
        for (name, h) in [
            ("groups-e2e.hgrm", &e2e_hist),
            ("groups-commit.hgrm", &commit_hist),
        ] {
            let f = write_file(dir, name, &hgrm(h, 1.0))?;
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(report)
}

fn producer_thread(
    idx: usize,
    ctx: &Ctx,
    base: Duration,
    stats: &SharedStats,
    log: &SharedLog,
) -> Result<(), String> {
    machine::pin_current_thread(&ctx.load_cores)?;
    let a = &ctx.a;
    let mut config = ProducerConfig::new(ctx.addr.clone());
    config.linger = Duration::from_millis(a.linger_ms);
    config.batch_bytes = (a.batch * a.message_bytes).max(1);
    let producer =
        Producer::with_config(config).map_err(|e| format!("producer {idx} cannot start: {e}"))?;
    let now = || ctx.base.elapsed().saturating_sub(base);
    let end = ctx.warmup + Duration::from_secs(a.duration_secs);
    let quota = a.messages.map(|n| {
        let p = a.producers as u64;
        n / p + u64::from((idx as u64) < n % p)
    });
    let unit = match a.send_mode {
        SendMode::Sync => a.batch as u64,
        _ => 1,
    };
    let template = vec![0x5Au8; a.message_bytes];
    let bytes_each = a.message_bytes as u64;
    let mut seq = 0u64;
    let mut consecutive_errors = 0u32;
    while !ctx.abort.load(Ordering::Relaxed) && !interrupted() {
        let t = now();
        let n = match quota {
            Some(q) if seq >= q => break,
            Some(q) => unit.min(q - seq),
            None if t >= end => break,
            None => unit,
        };
        let measured = t >= ctx.warmup;
        // The payload's time is on the run's base, as the members read it.
        let sent_us = as_us(ctx.base.elapsed());
        let first = seq;
        seq += n;
        lock(log).sent = seq;
        let outcome = match a.send_mode {
            SendMode::Sync => {
                let batch: Vec<_> = (first..first + n)
                    .map(|s| make_message(&template, sent_us, message_id(idx, s)))
                    .collect();
                let r = producer.send_batch(&ctx.topic, QueueSelector::RoundRobin, &batch);
                if r.is_ok() {
                    ctx.acked.fetch_add(n, Ordering::Relaxed);
                    let latency = as_us(now().saturating_sub(t));
                    lock(stats).record(latency, n, n * bytes_each, measured);
                }
                r.map(|_| ())
            }
            _ => {
                let m = make_message(&template, sent_us, message_id(idx, first));
                let (st, lg, ctx_base) = (stats.clone(), log.clone(), ctx.base);
                let acked = ctx.acked.clone();
                producer.send_async(&ctx.topic, QueueSelector::RoundRobin, &m, move |r| {
                    let latency = as_us(ctx_base.elapsed()).saturating_sub(sent_us);
                    match r {
                        Ok(_) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                            lock(&st).record(latency, 1, bytes_each, measured);
                        }
                        Err(e) => {
                            lock(&st).error(error_kind(&e), 1);
                            lock(&lg).failed.push(first);
                        }
                    }
                })
            }
        };
        match outcome {
            Ok(()) => consecutive_errors = 0,
            Err(e) => {
                lock(stats).error(error_kind(&e), n);
                lock(log).failed.extend(first..first + n);
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    return Err(format!(
                        "producer {idx}: {MAX_CONSECUTIVE_ERRORS} sends in a row failed, last: {e}"
                    ));
                }
            }
        }
    }
    // Async: every callback has run once this returns.
    producer.flush();
    Ok(())
}

/// A member's explicit commits.
struct CommitLog {
    hist: Hist,
    calls: u64,
    nothing_new: u64,
    failed: u64,
    durability: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl CommitLog {
    fn timed_commit(&mut self, member: &GroupConsumer) {
        let t = Instant::now();
        match member.commit() {
            Ok(Some(d)) => {
                self.hist.saturating_record(as_us(t.elapsed()).max(1));
                self.calls += 1;
                *self.durability.entry(d.to_string()).or_insert(0) += 1;
            }
            Ok(None) => self.nothing_new += 1,
            Err(e) => {
                self.failed += 1;
                *self.errors.entry(error_kind(&e)).or_insert(0) += 1;
            }
        }
    }
}

fn member_thread(idx: usize, ctx: &Ctx, stats: &SharedStats) -> Result<CommitLog, String> {
    machine::pin_current_thread(&ctx.load_cores)?;
    let a = &ctx.a;
    let mut config = GroupConfig::new(&ctx.group, &[ctx.topic.as_str()]);
    config.auto_commit_interval = Duration::from_millis(a.auto_commit_ms);
    let (member, retries) = join_member(&ctx.addr, config)
        .map_err(|e| format!("member {idx} cannot join {}: {e}", ctx.group))?;
    ctx.joined.fetch_add(1, Ordering::Relaxed);
    let mut log = CommitLog {
        hist: new_hist(),
        calls: 0,
        nothing_new: 0,
        failed: 0,
        durability: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    if retries > 0 {
        log.errors
            .insert("join GROUP_NOT_FOUND (retried)".into(), u64::from(retries));
    }
    let commit_every = Duration::from_millis(a.commit_interval_ms);
    let mut last_commit = Instant::now();
    let warmup_end_us = |produce_base_us: u64| produce_base_us + as_us(ctx.warmup);
    let mut measured_from_us = None;
    while !ctx.stop_consumers.load(Ordering::Relaxed) && !ctx.abort.load(Ordering::Relaxed) {
        let held = member
            .assignment()
            .iter()
            .filter(|(t, _)| *t == ctx.topic)
            .count();
        ctx.held[idx].store(held, Ordering::Relaxed);
        if measured_from_us.is_none() && ctx.start_producing.load(Ordering::Relaxed) {
            // Producers start right after the flag; ids sent in the warm-up are not measured.
            measured_from_us = Some(warmup_end_us(as_us(ctx.base.elapsed())));
        }
        let messages = match member.poll(POLL_WAIT) {
            Ok(m) => m,
            Err(e) => {
                lock(stats).error(error_kind(&e), 1);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if !messages.is_empty() {
            let now_us = as_us(ctx.base.elapsed());
            let from = measured_from_us.unwrap_or(u64::MAX);
            let mut firsts = Vec::with_capacity(messages.len());
            {
                let mut tally = lock(&ctx.tally);
                for m in &messages {
                    match read_payload(&m.payload) {
                        Some((sent_us, id)) => {
                            if tally.see(id) {
                                firsts.push((sent_us, m.payload.len() as u64));
                            }
                        }
                        None => tally.foreign += 1,
                    }
                }
            }
            let mut s = lock(stats);
            for (sent_us, len) in firsts {
                s.record(now_us.saturating_sub(sent_us), 1, len, sent_us >= from);
            }
            drop(s);
            for m in &messages {
                member.ack(m);
            }
        }
        if last_commit.elapsed() >= commit_every {
            log.timed_commit(&member);
            last_commit = Instant::now();
        }
    }
    log.timed_commit(&member);
    // A failed close is a figure (the offsets may not be committed), not the end of the run.
    if let Err(e) = member.close() {
        *log.errors
            .entry(format!("close {}", error_kind(&e)))
            .or_insert(0) += 1;
    }
    Ok(log)
}

fn progress_thread(
    ctx: &Ctx,
    base: Duration,
    producers: &[SharedStats],
    consumers: &[SharedStats],
    done: &AtomicBool,
) {
    let interval = |stats: &[SharedStats]| -> (Hist, u64) {
        let mut parts = Vec::new();
        let mut n = 0;
        for s in stats {
            let (h, m) = lock(s).take_interval();
            n += m;
            parts.push(h);
        }
        (merge_all(parts.iter()), n)
    };
    let mut second = 1u64;
    while !done.load(Ordering::Relaxed) {
        let tick = ctx.base + base + Duration::from_secs(second);
        while Instant::now() < tick && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
        let (ph, pn) = interval(producers);
        let (ch, cn) = interval(consumers);
        let p99 = |h: &Hist| {
            if h.is_empty() {
                "-".to_string()
            } else {
                fmt_us(h.value_at_quantile(0.99))
            }
        };
        eprintln!(
            "[groups] {second:>4}s {pn:>9} msg/s  ack p99 {:>9}  consumed {cn:>9} msg/s  e2e p99 {:>9}",
            p99(&ph),
            p99(&ch)
        );
        second += 1;
    }
}

fn table(r: &GroupsReport) -> String {
    let l = |s: &LatencySummary| {
        format!(
            "{} | {} | {} | {} | {}",
            fmt_us(s.p50_us),
            fmt_us(s.p90_us),
            fmt_us(s.p99_us),
            fmt_us(s.p999_us),
            fmt_us(s.max_us)
        )
    };
    let durability: Vec<String> = r
        .commit
        .durability
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    let mut s = format!(
        "\n{}\n{}; {}\n\n\
         | figure | value |\n|---|---|\n\
         | produced msg/s | {:.0} ({:.2} MB/s) |\n\
         | consumed msg/s | {:.0} |\n\
         | acked / failed sends | {} / {} |\n\
         | delivered distinct / duplicates / lost | {} / {} / {} |\n\
         | explicit commits (timed / nothing new / failed) | {} / {} / {} |\n\
         | commit durability | {} |\n\
         | commit p50 / p99 / max | {} / {} / {} |\n\
         | load CPU / broker CPU | {:.0} % / {:.0} % of a core |\n\
         | drain after producers stopped | {:.2} s |\n\n\
         | latency | p50 | p90 | p99 | p99.9 | max |\n|---|---|---|---|---|---|\n\
         | send -> ack | {} |\n\
         | send -> first delivery (e2e) | {} |\n",
        r.workload_description,
        r.broker,
        r.core_split.describe(),
        r.produce.msgs_per_sec,
        r.produce.mb_per_sec,
        r.consume.msgs_per_sec,
        r.produce.acked,
        r.produce.failed,
        r.consume.distinct,
        r.consume.duplicates,
        r.consume.lost,
        r.commit.calls,
        r.commit.nothing_new,
        r.commit.failed,
        if durability.is_empty() {
            "-".to_string()
        } else {
            durability.join(", ")
        },
        fmt_us(r.commit.latency.p50_us),
        fmt_us(r.commit.latency.p99_us),
        fmt_us(r.commit.latency.max_us),
        r.cpu.load_cpu_pct,
        r.cpu.broker_cpu_pct,
        r.consume.drain_secs,
        l(&r.produce.ack_latency),
        l(&r.consume.e2e_latency),
    );
    if !r.errors.is_empty() {
        let e: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        s.push_str(&format!("\nerrors: {}\n", e.join(", ")));
    }
    for n in &r.notes {
        s.push_str(&format!("\nnote: {n}\n"));
    }
    s
}
