//! `ringmq-bench backlog`: produce a backlog (pipelined, batched async sends), then read all of
//! it back, once per reader: the plain `Consumer` over every queue, and a consumer group of 1,
//! 2, ... members (each a fresh group, so each starts at the queues' oldest offsets). For each
//! phase: messages and payload MB per second, the CPU time of the load side (this process'
//! threads other than the broker's shards) and of the broker's shards, and an audit (every
//! acked id read at least once; duplicates counted).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use ringmq::client::{
    Admin, Consumer, GroupConfig, Producer, ProducerConfig, QueueSelector, StartFrom,
};
use serde::{Deserialize, Serialize};

use crate::embedded::{
    join_member, make_message, message_id, read_payload, write_file, BrokerArgs, EmbeddedBroker,
    Tally, PAYLOAD_HEADER_BYTES,
};
use crate::machine::{self, CoreSplit, CpuSnapshot, CpuUse, MachineFacts};
use crate::runner::lock;
use crate::runner::{error_kind, interrupted};

/// How long the members may take to settle their assignment before a group phase starts.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct BacklogArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Payload bytes (at least 16: send time and id).
    #[arg(long, default_value_t = 256)]
    pub message_bytes: usize,
    #[arg(long, default_value_t = 4)]
    pub queues: u32,
    /// Producer threads (async sends).
    #[arg(long, default_value_t = 2)]
    pub producers: usize,
    /// The producers' batch: this many messages' bytes.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// Plain-consumer threads (queues dealt round-robin; each fetches all its queues at once,
    /// round after round: `Consumer::fetch_all`).
    #[arg(long, default_value_t = 1)]
    pub plain_threads: usize,
    /// Group sizes to read the backlog with, each a fresh group; `--members` alone: none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,2")]
    pub members: Vec<usize>,
    /// Most bytes per fetch (plain consumer and group members alike).
    #[arg(long, default_value_t = 1 << 20)]
    pub fetch_max_bytes: u32,
    /// The plain consumer asks for a queue's next records while it reads the last answer
    /// (`Consumer::read_ahead`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub read_ahead: bool,
    /// The embedded broker's `fetch_verify`: once (CRCs checked once per record in the
    /// broker's life) or always (every fetch checks every record).
    #[arg(long, default_value_t = ringmq::storage::FetchVerify::default())]
    pub fetch_verify: ringmq::storage::FetchVerify,
    /// A phase that takes longer than this is stopped and reported as incomplete.
    #[arg(long, default_value_t = 300)]
    pub phase_timeout_secs: u64,
    /// Write backlog.json into DIR.
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub out: Option<PathBuf>,
}

impl BacklogArgs {
    fn validate(&self) -> Result<(), String> {
        let mut p = Vec::new();
        self.broker.problems(&mut p);
        if self.messages == 0 || self.queues == 0 || self.producers == 0 || self.batch == 0 {
            p.push("--messages, --queues, --producers and --batch must be at least 1".into());
        }
        if self.plain_threads == 0 || self.members.contains(&0) {
            p.push("--plain-threads and each of --members must be at least 1".into());
        }
        if self.message_bytes < PAYLOAD_HEADER_BYTES {
            p.push(format!(
                "--message-bytes must be at least {PAYLOAD_HEADER_BYTES} (send time and id)"
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("\n"))
        }
    }
}

/// One phase: the produce, or one reading of the whole backlog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// `produce`, `plain consumer (N threads)`, `group (N members)`.
    pub name: String,
    pub secs: f64,
    /// Produce: messages acked; a reading: distinct ids read.
    pub messages: u64,
    pub msgs_per_sec: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// A reading: every delivery, repeated ones, acked ids never read.
    pub deliveries: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// Failed sends / fetches / polls by kind.
    pub errors: BTreeMap<String, u64>,
    /// Group phases: seconds the members took to settle their assignment (not in `secs`).
    pub settle_secs: Option<f64>,
    /// Ended by --phase-timeout-secs (or Ctrl-C) before all was read.
    pub incomplete: bool,
    pub cpu: CpuUse,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogReport {
    pub tool: String,
    pub command: String,
    pub started_unix_ms: u64,
    pub git_commit: Option<String>,
    pub machine: MachineFacts,
    pub workload: BacklogArgs,
    pub broker: String,
    pub broker_flush_mode: String,
    pub data_fs: String,
    pub core_split: CoreSplit,
    pub topic: String,
    pub phases: Vec<Phase>,
}

pub fn run(a: BacklogArgs) -> Result<(), String> {
    a.validate()?;
    crate::runner::install_interrupt_handler();
    let started_unix_ms = crate::runner::unix_ms();
    let broker =
        EmbeddedBroker::start_with(&a.broker, &format!("backlog-{}", a.broker.mode), |c| {
            c.storage.fetch_verify = a.fetch_verify;
        })?;
    let outcome = drive(&a, &broker);
    let report = outcome.map(|(flush_mode, topic, phases)| BacklogReport {
        tool: format!("ringmq-bench {}", env!("CARGO_PKG_VERSION")),
        command: "backlog".into(),
        started_unix_ms,
        git_commit: machine::git_commit(),
        machine: MachineFacts::collect(Some(a.broker.data_root.as_path())),
        workload: a.clone(),
        broker: format!("embedded ({})", broker.addr),
        broker_flush_mode: flush_mode,
        data_fs: broker.data_fs.clone(),
        core_split: broker.split.clone(),
        topic,
        phases,
    });
    broker.stop();
    let report = report?;
    println!("{}", table(&report));
    if let Some(dir) = &a.out {
        let json = serde_json::to_string_pretty(&report).expect("the report serializes");
        let f = write_file(dir, "backlog.json", &json)?;
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

type Drove = (String, String, Vec<Phase>);

fn drive(a: &BacklogArgs, broker: &EmbeddedBroker) -> Result<Drove, String> {
    let pid = std::process::id();
    let topic = format!("ringmq-bench-{pid}-backlog");
    let admin =
        Admin::connect(&broker.addr).map_err(|e| format!("cannot reach the broker: {e}"))?;
    let info = admin
        .broker_info()
        .map_err(|e| format!("broker info: {e}"))?;
    admin
        .create_topic(&topic, a.queues)
        .map_err(|e| format!("cannot create {topic}: {e}"))?;
    eprintln!(
        "[backlog] {} x {} B into {topic} ({} queues, {} flush) on {}; {}",
        a.messages,
        a.message_bytes,
        a.queues,
        a.broker.mode,
        broker.addr,
        broker.split.describe()
    );
    let cores = &broker.split.load_cores;
    let (produce, produced) = produce(a, &broker.addr, &topic, cores)?;
    eprintln!("[backlog] {}", line(&produce));
    let mut phases = vec![produce];
    let mut readers: Vec<Reader> = vec![Reader::Plain(a.plain_threads)];
    readers.extend(a.members.iter().map(|&n| Reader::Group(n)));
    for (i, reader) in readers.into_iter().enumerate() {
        if interrupted() {
            break;
        }
        let phase = read_all(a, &broker.addr, &topic, cores, reader, &produced, &admin, i)?;
        eprintln!("[backlog] {}", line(&phase));
        phases.push(phase);
    }
    Ok((info.flush_mode, topic, phases))
}

fn line(p: &Phase) -> String {
    format!(
        "{}: {} msgs in {:.2} s = {:.0} msg/s, {:.1} MB/s; load CPU {:.0} %, broker CPU {:.0} %{}",
        p.name,
        p.messages,
        p.secs,
        p.msgs_per_sec,
        p.mb_per_sec,
        p.cpu.load_cpu_pct,
        p.cpu.broker_cpu_pct,
        if p.incomplete { " (INCOMPLETE)" } else { "" }
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn rates(n: u64, bytes_each: usize, secs: f64) -> (f64, f64) {
    if secs > 0.0 {
        let m = n as f64 / secs;
        (m, m * bytes_each as f64 / 1e6)
    } else {
        (0.0, 0.0)
    }
}

/// Sends the backlog; returns the phase and what was acked.
fn produce(
    a: &BacklogArgs,
    addr: &str,
    topic: &str,
    cores: &[usize],
) -> Result<(Phase, Produced), String> {
    let acked = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let cpu = CpuSnapshot::take();
    let t0 = Instant::now();
    let threads: Vec<_> =
        (0..a.producers)
            .map(|idx| {
                let (acked, errors) = (acked.clone(), errors.clone());
                let (a, addr, topic, cores) = (
                    a.clone(),
                    addr.to_string(),
                    topic.to_string(),
                    cores.to_vec(),
                );
                std::thread::spawn(move || -> Result<(u64, Vec<u64>), String> {
                    machine::pin_current_thread(&cores)?;
                    let mut config = ProducerConfig::new(addr);
                    config.linger = Duration::from_millis(a.linger_ms);
                    config.batch_bytes = a.batch * a.message_bytes;
                    let producer = Producer::with_config(config)
                        .map_err(|e| format!("producer {idx}: {e}"))?;
                    let p = a.producers as u64;
                    let quota = a.messages / p + u64::from((idx as u64) < a.messages % p);
                    let template = vec![0x5Au8; a.message_bytes];
                    let failed: Arc<Mutex<Vec<u64>>> = Arc::default();
                    for seq in 0..quota {
                        if interrupted() {
                            break;
                        }
                        let m = make_message(&template, 0, message_id(idx, seq));
                        let (acked, errs, f) = (acked.clone(), errors.clone(), failed.clone());
                        let sent =
                            producer.send_async(&topic, QueueSelector::RoundRobin, &m, move |r| {
                                match r {
                                    Ok(_) => {
                                        acked.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) => {
                                        *lock(&errs).entry(error_kind(&e)).or_insert(0) += 1;
                                        lock(&f).push(seq);
                                    }
                                }
                            });
                        if let Err(e) = sent {
                            *lock(&errors).entry(error_kind(&e)).or_insert(0) += 1;
                            lock(&failed).push(seq);
                        }
                    }
                    producer.flush();
                    let failed = lock(&failed).clone();
                    Ok((quota, failed))
                })
            })
            .collect();
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    for t in threads {
        let (s, f) = t.join().map_err(|_| "a producer panicked".to_string())??;
        sent.push(s);
        failed.push(f);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu.until(&CpuSnapshot::take());
    let n = acked.load(Ordering::Relaxed);
    let (msgs_per_sec, mb_per_sec) = rates(n, a.message_bytes, secs);
    let errors = lock(&errors).clone();
    Ok((
        Phase {
            name: "produce (async, batched)".into(),
            secs,
            messages: n,
            msgs_per_sec,
            mb_per_sec,
            deliveries: 0,
            duplicates: 0,
            lost: 0,
            errors,
            settle_secs: None,
            incomplete: interrupted(),
            cpu,
        },
        Produced {
            acked: n,
            sent,
            failed,
        },
    ))
}

/// What the produce phase acked, to audit each reading against.
struct Produced {
    acked: u64,
    /// Per producer: sequence numbers handed out (0..n), and those whose send failed.
    sent: Vec<u64>,
    failed: Vec<Vec<u64>>,
}

#[derive(Clone, Copy)]
enum Reader {
    Plain(usize),
    Group(usize),
}

/// What the readers of one phase share.
struct Shared {
    tally: Mutex<Tally>,
    errors: Mutex<BTreeMap<String, u64>>,
    start: AtomicBool,
    stop: AtomicBool,
    joined: AtomicUsize,
    held: Vec<AtomicUsize>,
}

impl Shared {
    fn error(&self, kind: String) {
        *lock(&self.errors).entry(kind).or_insert(0) += 1;
    }

    /// Tallies one fetched batch (`None`: a payload without an id).
    fn see(&self, payloads: impl Iterator<Item = Option<u64>>) {
        let mut t = lock(&self.tally);
        for id in payloads {
            match id {
                Some(id) => {
                    t.see(id);
                }
                None => t.foreign += 1,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn read_all(
    a: &BacklogArgs,
    addr: &str,
    topic: &str,
    cores: &[usize],
    reader: Reader,
    produced: &Produced,
    admin: &Admin,
    index: usize,
) -> Result<Phase, String> {
    let (threads, name) = match reader {
        Reader::Plain(n) => {
            let n = n.min(a.queues as usize);
            (n, format!("plain consumer ({n} thread{})", plural(n)))
        }
        Reader::Group(n) => (n, format!("group ({n} member{})", plural(n))),
    };
    let group = format!("ringmq-bench-{}-backlog-{index}", std::process::id());
    if let Reader::Group(_) = reader {
        admin
            .create_group(&group, 16, 0)
            .map_err(|e| format!("cannot create group {group}: {e}"))?;
    }
    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally::default()),
        errors: Mutex::default(),
        start: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        joined: AtomicUsize::new(0),
        held: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
    });
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let shared = shared.clone();
            let (a, addr, topic, cores, group) = (
                a.clone(),
                addr.to_string(),
                topic.to_string(),
                cores.to_vec(),
                group.clone(),
            );
            std::thread::spawn(move || -> Result<(), String> {
                machine::pin_current_thread(&cores)?;
                let r = match reader {
                    Reader::Plain(_) => {
                        let queues: Vec<u32> = (0..a.queues)
                            .filter(|q| *q as usize % threads == i)
                            .collect();
                        plain_reader(&a, &addr, &topic, &queues, &shared)
                    }
                    Reader::Group(_) => group_member(&a, &addr, &topic, &group, i, &shared),
                };
                if r.is_err() {
                    // Let the phase end rather than wait for its timeout.
                    shared.stop.store(true, Ordering::Relaxed);
                }
                r
            })
        })
        .collect();

    // Group members first join and settle; the clock starts after.
    let settle_start = Instant::now();
    let mut settle_secs = None;
    if let Reader::Group(n) = reader {
        loop {
            let held: Vec<usize> = shared
                .held
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .collect();
            let total: usize = held.iter().sum();
            let spread = held.iter().max().unwrap_or(&0) - held.iter().min().unwrap_or(&0);
            if shared.joined.load(Ordering::Relaxed) == n
                && total == a.queues as usize
                && spread <= 1
            {
                break;
            }
            if settle_start.elapsed() > SETTLE_TIMEOUT || shared.stop.load(Ordering::Relaxed) {
                eprintln!("note: {name}: the assignment did not settle ({held:?}); reading anyway");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        settle_secs = Some(settle_start.elapsed().as_secs_f64());
    }
    let cpu = CpuSnapshot::take();
    let t0 = Instant::now();
    shared.start.store(true, Ordering::Relaxed);
    let timeout = Duration::from_secs(a.phase_timeout_secs);
    let mut incomplete = false;
    loop {
        if lock(&shared.tally).distinct >= produced.acked {
            break;
        }
        if t0.elapsed() > timeout || interrupted() || shared.stop.load(Ordering::Relaxed) {
            incomplete = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu.until(&CpuSnapshot::take());
    shared.stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a reader panicked".into()),
        }
    }
    if !failures.is_empty() {
        return Err(format!("[backlog] {name}: {}", failures.join("; ")));
    }
    let errors = lock(&shared.errors).clone();
    let tally = std::mem::take(&mut *lock(&shared.tally));
    let (msgs_per_sec, mb_per_sec) = rates(tally.distinct, a.message_bytes, secs);
    let lost = tally.lost(&produced.sent, &produced.failed);
    Ok(Phase {
        name,
        secs,
        messages: tally.distinct,
        msgs_per_sec,
        mb_per_sec,
        deliveries: tally.deliveries,
        duplicates: tally.duplicates,
        lost,
        errors,
        settle_secs,
        incomplete,
        cpu,
    })
}

fn plain_reader(
    a: &BacklogArgs,
    addr: &str,
    topic: &str,
    queues: &[u32],
    shared: &Shared,
) -> Result<(), String> {
    let mut consumer = Consumer::connect(addr).map_err(|e| format!("consumer: {e}"))?;
    consumer.max_bytes = a.fetch_max_bytes;
    consumer.read_ahead = a.read_ahead;
    let mut offsets = Vec::new();
    for &q in queues {
        let o = consumer
            .resolve(topic, q, StartFrom::Beginning)
            .map_err(|e| format!("oldest offset of {topic}/{q}: {e}"))?;
        offsets.push((q, o));
    }
    while !shared.start.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_micros(200));
    }
    // Until the phase ends (every acked id read): a queue's visible end can lag what was
    // acked (ASYNC_FLUSH readers see only flushed bytes), so an empty fetch is not the end.
    while !shared.stop.load(Ordering::Relaxed) {
        let mut idle_round = true;
        // One fetch per queue, all in flight at once (what `ringmq consume` does).
        let fetched = consumer.fetch_all(topic, &offsets, Duration::ZERO);
        for ((_, offset), f) in offsets.iter_mut().zip(fetched) {
            match f {
                Ok(f) => {
                    idle_round &= f.messages.is_empty();
                    shared.see(
                        f.messages
                            .iter()
                            .map(|m| read_payload(&m.payload).map(|(_, id)| id)),
                    );
                    *offset = f.next_offset;
                }
                Err(e) => {
                    shared.error(error_kind(&e));
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if idle_round {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

fn group_member(
    a: &BacklogArgs,
    addr: &str,
    topic: &str,
    group: &str,
    idx: usize,
    shared: &Shared,
) -> Result<(), String> {
    let mut config = GroupConfig::new(group, &[topic]);
    config.fetch_max_bytes = a.fetch_max_bytes;
    let (member, retries) = join_member(addr, config).map_err(|e| format!("member {idx}: {e}"))?;
    for _ in 0..retries {
        shared.error("join GROUP_NOT_FOUND (retried)".into());
    }
    shared.joined.fetch_add(1, Ordering::Relaxed);
    // Until the phase starts, keep the member's view of the assignment fresh without
    // reading: a poll would start fetching before the clock.
    while !shared.start.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
        let held = member
            .assignment()
            .iter()
            .filter(|(t, _)| t == topic)
            .count();
        shared.held[idx].store(held, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
    while !shared.stop.load(Ordering::Relaxed) {
        match member.poll(Duration::from_millis(100)) {
            Ok(messages) => {
                shared.see(
                    messages
                        .iter()
                        .map(|m| read_payload(&m.payload).map(|(_, id)| id)),
                );
                for m in &messages {
                    member.ack(m);
                }
            }
            Err(e) => {
                shared.error(error_kind(&e));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    // A failed close is a figure (the offsets may not be committed), not the end of the run.
    if let Err(e) = member.close() {
        shared.error(format!("close {}", error_kind(&e)));
    }
    Ok(())
}

fn table(r: &BacklogReport) -> String {
    let mut s = format!(
        "\nbacklog: {} x {} B, {} queues, {} flush; {}; {}\n\n\
         | phase | msgs | secs | msg/s | MB/s | load CPU | broker CPU | dup | lost | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        r.workload.messages,
        r.workload.message_bytes,
        r.workload.queues,
        r.workload.broker.mode,
        r.broker,
        r.core_split.describe()
    );
    for p in &r.phases {
        let errors: u64 = p.errors.values().sum();
        s.push_str(&format!(
            "| {}{} | {} | {:.2} | {:.0} | {:.1} | {:.0} % | {:.0} % | {} | {} | {} |\n",
            p.name,
            if p.incomplete { " (INCOMPLETE)" } else { "" },
            p.messages,
            p.secs,
            p.msgs_per_sec,
            p.mb_per_sec,
            p.cpu.load_cpu_pct,
            p.cpu.broker_cpu_pct,
            p.duplicates,
            p.lost,
            errors
        ));
    }
    s.push_str(
        "\nCPU in % of one core over the phase: load = this process' threads other than the \
         broker's shards (readers, producers, client threads).\n",
    );
    s
}
