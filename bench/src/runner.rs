//! Running one mode: start an embedded broker (or use a remote one), create the topic, run the
//! producer and consumer threads with a progress line per second, and gather the figures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use ringmq::client::{Admin, ClientError, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::config::{Config, CoreSelection, ReplicationConfig, ServerConfig, StorageConfig};
use ringmq::format::batch::Message;
use ringmq::replication::Role;
use ringmq::server::Broker;

use crate::broker_stats::{self, BrokerCounters, BrokerStats, ReplicationWatch};
use crate::event_loop;
use crate::hist::{
    as_us, merge_all, Clock, Hist, LatencySummary, Pacer, RealClock, SharedStats, ThreadStats,
};
use crate::machine::{self, CoreSplit, CpuSnapshot, CpuUse};
use crate::report::{fmt_us, ModeResult, TimelinePoint};
use crate::slave::{SlaveHost, SlaveInfo, SlaveProcess};
use crate::workload::{Driver, Mode, SendMode, Workload};

/// How long consumers may take, after the last producer finished, to read what was acked.
const CONSUMER_DRAIN: Duration = Duration::from_secs(5);
/// A producer that fails this many sends in a row gives up (the broker is not serving).
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Ctrl-C (SIGINT/SIGTERM) ends the load early instead of killing the process, so the embedded
/// broker is stopped, its data dir removed and the partial figures reported. A second Ctrl-C
/// exits at once.
pub fn install_interrupt_handler() {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The conditional shutdown must come first: it sees the flag before this signal sets it.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
}

/// Whether the user asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// One measured mode: the figures and the merged histograms.
pub struct ModeRun {
    pub result: ModeResult,
    pub ack_hist: Hist,
    pub e2e_hist: Option<Hist>,
}

/// The name of an error for the "errors by kind" figures: the broker's code when it sent one,
/// else the client-side variant.
pub fn error_kind(e: &ClientError) -> String {
    if let Some(code) = e.code() {
        return code.name().to_string();
    }
    match e {
        ClientError::Connect { .. } => "Connect",
        ClientError::ConnectionClosed(_) => "ConnectionClosed",
        ClientError::Timeout(_) => "Timeout",
        ClientError::Remote(_) => "Remote",
        ClientError::Wire(_) => "Wire",
        ClientError::Unexpected(_) => "Unexpected",
        ClientError::InvalidArgument(_) => "InvalidArgument",
        ClientError::SpoolFull { .. } => "SpoolFull",
        ClientError::Spool(_) => "Spool",
    }
    .to_string()
}

/// The temporary data dir of an embedded broker, removed on drop.
pub struct TempDataDir(PathBuf);

impl TempDataDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDataDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: cannot remove {}: {e}", self.0.display());
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh, empty `root/name`, removed on drop.
pub fn fresh_dir(root: &Path, name: &str) -> Result<TempDataDir, String> {
    let dir = root.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(TempDataDir(dir))
}

/// Registered io memory per shard: glommio's default as root; as non-root it counts against
/// memlock (often 8 MiB for all shards of all brokers), so keep it small.
pub fn io_memory_bytes() -> u64 {
    if is_root() {
        0
    } else {
        2 << 20
    }
}

/// The `[server]` section of a broker process the bench starts: free ports, `cores` shards,
/// and no metrics port (brokers of a bench run side by side, also next to a real broker).
pub fn bench_server_config(data_dir: &Path, listen_host: &str, cores: usize) -> ServerConfig {
    ServerConfig {
        data_dir: data_dir.to_path_buf(),
        listen_host: listen_host.to_string(),
        port: 0,
        cores: CoreSelection::Count(cores),
        io_memory_bytes: io_memory_bytes(),
        metrics_listen: ringmq::config::MetricsListen::Off,
        ..ServerConfig::default()
    }
}

/// The `[storage]` section of a mode's brokers (master and slave alike).
fn storage_config(mode: Mode, w: &Workload) -> StorageConfig {
    StorageConfig {
        flush_mode: mode.flush_mode(),
        flush_interval_ms: w.flush_interval_ms,
        segment_bytes: w.segment_mib << 20,
        prepare_bytes_per_sec: w.prepare_bytes_per_sec,
        sync_flush_io: w.sync_flush_io,
        ..StorageConfig::default()
    }
}

/// A replication mode's slave. Fields drop in order: the process first (it runs in the
/// namespace and writes into the dir), then the namespace, then the dir.
struct Slave {
    process: SlaveProcess,
    host: SlaveHost,
    dir: TempDataDir,
}

impl Slave {
    /// Starts the slave of `master` (on `host`, on the split's slave cores) and waits until it
    /// streams.
    fn start(
        mode: Mode,
        w: &Workload,
        root: &Path,
        host: SlaveHost,
        master: &str,
        split: &CoreSplit,
    ) -> Result<Slave, String> {
        let dir = fresh_dir(
            root,
            &format!(
                ".ringmq-bench-{}-{}-slave",
                std::process::id(),
                mode.label()
            ),
        )?;
        let data_dir = dir.0.join("data");
        std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let cores = split.slave_cores.clone().unwrap_or_default();
        let config = Config {
            server: ServerConfig {
                data_dir,
                listen_host: host.slave_host().to_string(),
                port: 0,
                // The process is confined to `cores` before it starts, so a count picks
                // exactly them (a one-core `CoreSelection::List` would not survive the TOML
                // file).
                cores: CoreSelection::Count(cores.len().max(1)),
                io_memory_bytes: io_memory_bytes(),
                // Brokers of a bench run side by side (master and slave): no metrics port.
                metrics_listen: ringmq::config::MetricsListen::Off,
                ..ServerConfig::default()
            },
            // Same as the master, as a slave that may be promoted would run (and replicas
            // must place every record at the same position: the same segment size).
            storage: storage_config(mode, w),
            replication: ReplicationConfig {
                role: Role::Slave,
                master: Some(master.to_string()),
                ..ReplicationConfig::default()
            },
        };
        let path = dir.0.join("config.toml");
        std::fs::write(&path, config.to_toml()).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut process = SlaveProcess::spawn(&path, &host, &cores)?;
        process.wait_streaming(master, interrupted)?;
        Ok(Slave { process, host, dir })
    }

    fn info(&self, master: &str) -> SlaveInfo {
        SlaveInfo {
            net: if self.host.netns().is_some() {
                "netns"
            } else {
                "loopback"
            }
            .to_string(),
            netns: self.host.netns().map(str::to_string),
            pid: self.process.pid(),
            address: self.process.address().to_string(),
            master_address: master.to_string(),
            data_dir: self.dir.0.display().to_string(),
        }
    }

    /// Stops the process (SIGTERM, SIGKILL after a timeout), then drops the namespace and the
    /// data dir.
    fn stop(self) {
        let Slave { process, host, dir } = self;
        let pid = process.pid();
        match process.stop() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("warning: the slave {pid} exited with {s}"),
            Err(e) => eprintln!("warning: {e}"),
        }
        drop(host);
        drop(dir);
    }
}

/// Runs `mode` on a fresh embedded broker (started and stopped here); a replication mode adds a
/// slave in a separate process, started after the master and stopped before it.
pub fn run_embedded(mode: Mode, w: &Workload) -> Result<ModeRun, String> {
    let allowed = machine::allowed_cores();
    let split = match mode.replication() {
        None => CoreSplit::plan(&allowed, Some(w.broker_cores), w.load_cores.as_deref())?,
        Some(_) => CoreSplit::plan_with_slave(&allowed, w.broker_cores, w.load_cores.as_deref())?,
    };
    std::fs::create_dir_all(&w.data_root)
        .map_err(|e| format!("cannot create {}: {e}", w.data_root.display()))?;
    let root = w
        .data_root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", w.data_root.display()))?;
    let guard = fresh_dir(
        &root,
        &format!(".ringmq-bench-{}-{}", std::process::id(), mode.label()),
    )?;
    let dir = guard.0.clone();
    let host = match mode.replication() {
        Some(_) => Some(SlaveHost::choose(w.slave_net)?),
        None => None,
    };
    let (replication, replica_ack) = mode.replication().unwrap_or_default();
    let config = Config {
        server: ServerConfig {
            data_dir: dir.clone(),
            // With a slave in a namespace: the root side of its veth, which it can dial.
            listen_host: host
                .as_ref()
                .map_or("127.0.0.1", SlaveHost::master_host)
                .to_string(),
            port: 0,
            cores: CoreSelection::Count(w.broker_cores),
            io_memory_bytes: io_memory_bytes(),
            spin_before_park_us: w.spin_before_park_us,
            // Brokers of a bench run side by side (master and slave): no metrics port.
            metrics_listen: ringmq::config::MetricsListen::Off,
            ..ServerConfig::default()
        },
        storage: storage_config(mode, w),
        replication: ReplicationConfig {
            mode: replication,
            replica_ack,
            // Only the configured peer's host may follow a master; the slave starts after the
            // master (on a port not known yet), so the master must not wait for it.
            peer: host.as_ref().map(|h| h.slave_host().to_string()),
            force_master: true,
            ..ReplicationConfig::default()
        },
    };
    let broker = Broker::start(config)
        .map_err(|e| format!("cannot start the embedded {mode} broker: {e}"))?;
    let addr = broker.address().to_string();
    let outcome = (|| {
        let Some(host) = host else {
            return drive(mode.label(), &addr, w, split, false);
        };
        let slave = Slave::start(mode, w, &root, host, &addr, &split)?;
        let info = slave.info(&addr);
        eprintln!("[{mode}] slave: {}", info.describe());
        let mut run = drive(mode.label(), &addr, w, split, true);
        // Before the master: a slave whose master vanished would only log reconnects.
        slave.stop();
        if let Ok(run) = &mut run {
            run.result.slave = Some(info);
        }
        run
    })();
    let stopped = broker.stop();
    drop(guard);
    let mut run = outcome?;
    if let Err(e) = stopped {
        eprintln!("warning: the embedded {mode} broker did not stop cleanly: {e}");
    }
    run.result.broker = match mode.replication() {
        Some(_) => format!("embedded master ({addr})"),
        None => format!("embedded ({addr})"),
    };
    run.result.replication = mode.replication_label();
    run.result.data_dir = Some(dir.display().to_string());
    run.result.data_fs = Some(machine::fs_type(&root));
    Ok(run)
}

/// Runs the workload against a running broker at `addr`, labelled `label`.
pub fn run_remote(label: &str, addr: &str, w: &Workload) -> Result<ModeRun, String> {
    let allowed = machine::allowed_cores();
    let split = CoreSplit::plan(&allowed, None, w.load_cores.as_deref())?;
    let mut run = drive(label, addr, w, split, false)?;
    run.result.broker = format!("remote ({addr})");
    Ok(run)
}

/// The flush mode a running broker reports (`SYNC_FLUSH`, ...), as the bench's label.
pub fn remote_mode(addr: &str) -> Result<(String, Option<Mode>), String> {
    let admin = Admin::connect(addr).map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let info = admin
        .broker_info()
        .map_err(|e| format!("broker info from {addr}: {e}"))?;
    let mode = Mode::from_broker_info(&info.flush_mode);
    Ok((info.flush_mode, mode))
}

/// What every load thread shares.
struct Ctx {
    addr: String,
    topic: String,
    w: Workload,
    base: Instant,
    warmup: Duration,
    /// Duration mode: no send is started (or, open loop, scheduled) at or after this.
    end: Option<Duration>,
    load_cores: Vec<usize>,
    stop_consumers: AtomicBool,
    abort: AtomicBool,
    received: AtomicU64,
}

/// Runs the load against `addr`; with `replicated`, also polls the master's replication stats
/// (see [`ReplicationWatch`]).
fn drive(
    label: &str,
    addr: &str,
    w: &Workload,
    split: CoreSplit,
    replicated: bool,
) -> Result<ModeRun, String> {
    let pid = std::process::id();
    let topic = w
        .topic
        .clone()
        .unwrap_or_else(|| format!("ringmq-bench-{pid}-{label}"));
    let admin = Admin::connect(addr).map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let info = admin
        .broker_info()
        .map_err(|e| format!("broker info from {addr}: {e}"))?;
    admin
        .create_topic(&topic, w.queues)
        .map_err(|e| format!("cannot create topic {topic} with {} queues: {e}", w.queues))?;

    // Consumers own queues round-robin; more consumers than queues would idle.
    let consumers = w.consumers.min(w.queues as usize);
    if consumers < w.consumers {
        eprintln!(
            "note: {} consumers for {} queues: running {consumers}",
            w.consumers, w.queues
        );
    }
    let mut assignments: Vec<Vec<(u32, u64)>> = vec![Vec::new(); consumers];
    if consumers > 0 {
        let probe = Consumer::connect(addr).map_err(|e| format!("consumer: {e}"))?;
        for q in 0..w.queues {
            let start = probe
                .resolve(&topic, q, ringmq::client::StartFrom::End)
                .map_err(|e| format!("end offset of {topic}/{q}: {e}"))?;
            assignments[q as usize % consumers].push((q, start));
        }
    }

    let warmup = Duration::from_secs(w.warmup_secs);
    let ctx = Arc::new(Ctx {
        addr: addr.to_string(),
        topic: topic.clone(),
        w: w.clone(),
        base: Instant::now(),
        warmup,
        end: match w.messages {
            Some(_) => None,
            None => Some(warmup + Duration::from_secs(w.duration_secs)),
        },
        load_cores: split.load_cores.clone(),
        stop_consumers: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        received: AtomicU64::new(0),
    });
    eprintln!(
        "[{label}] {} against {addr}; {}",
        w.describe(),
        split.describe()
    );

    // Every mode: the watch also samples unflushed bytes in the measured window.
    let watch = ReplicationWatch::start(addr, ctx.base + warmup, &split.load_cores)?;
    let consumer_stats: Vec<SharedStats> = (0..consumers).map(|_| ThreadStats::shared()).collect();
    let consumer_threads: Vec<JoinHandle<Result<(), String>>> = assignments
        .into_iter()
        .enumerate()
        .map(|(i, queues)| {
            let (ctx, stats) = (ctx.clone(), consumer_stats[i].clone());
            std::thread::Builder::new()
                .name(format!("bench-consumer-{i}"))
                .spawn(move || consumer_thread(i, &ctx, &stats, queues))
                .expect("spawn consumer")
        })
        .collect();
    // Threads: one per producer. Event loop: one per load core, each with its share of them.
    let (load_threads, routes) = match w.driver {
        Driver::Threads => (w.producers, Vec::new()),
        Driver::EventLoop => {
            let route = admin
                .route(&topic)
                .map_err(|e| format!("route of {topic}: {e}"))?;
            let routes: Vec<(u32, String)> = route
                .queues
                .into_iter()
                .map(|q| (q.queue, q.address))
                .collect();
            (split.load_cores.len().clamp(1, w.producers), routes)
        }
    };
    let producer_stats: Vec<SharedStats> =
        (0..load_threads).map(|_| ThreadStats::shared()).collect();
    let producer_threads: Vec<JoinHandle<Result<(), String>>> = (0..load_threads)
        .map(|i| {
            let (ctx, stats) = (ctx.clone(), producer_stats[i].clone());
            let routes = routes.clone();
            let (name, threads) = match ctx.w.driver {
                Driver::Threads => (format!("bench-producer-{i}"), None),
                Driver::EventLoop => (format!("bench-loop-{i}"), Some(load_threads)),
            };
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let r = match threads {
                        None => producer_thread(i, &ctx, &stats),
                        Some(n) => event_loop_thread(i, n, &ctx, &stats, routes),
                    };
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
        let (ctx, done, label) = (ctx.clone(), done.clone(), label.to_string());
        let (p, c) = (producer_stats.clone(), consumer_stats.clone());
        std::thread::Builder::new()
            .name("bench-progress".into())
            .spawn(move || progress_thread(&label, &ctx, &p, &c, &done))
            .expect("spawn progress")
    };

    let mut failures: Vec<String> = producer_threads
        .into_iter()
        .filter_map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("a producer panicked".into()))
                .err()
        })
        .collect();
    // The load is over once the producers are (a consumer's drain below is not load).
    let cpu_after = CpuSnapshot::take();
    let acked: u64 = producer_stats.iter().map(|s| lock(s).ok_msgs).sum();
    let drain_until = Instant::now() + CONSUMER_DRAIN;
    while consumers > 0
        && ctx.received.load(Ordering::Relaxed) < acked
        && Instant::now() < drain_until
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    ctx.stop_consumers.store(true, Ordering::Relaxed);
    failures.extend(consumer_threads.into_iter().filter_map(|t| {
        t.join()
            .unwrap_or_else(|_| Err("a consumer panicked".into()))
            .err()
    }));
    done.store(true, Ordering::Relaxed);
    let Progress {
        timeline,
        stats_before,
        cpu_before,
    } = progress.join().expect("progress thread");
    let cpu: CpuUse = cpu_before.until(&cpu_after);
    let stats_after = broker_stats::snapshot(&admin);
    let (lag, unflushed_max) = watch.finish();
    let replica_lag = replicated.then_some(lag);
    if !failures.is_empty() {
        return Err(format!("[{label}] {}", failures.join("; ")));
    }

    let measure_start = ctx.base + warmup;
    let p: Vec<_> = producer_stats.iter().map(|s| lock(s)).collect();
    let ack_hist = merge_all(p.iter().map(|s| &s.total));
    let messages: u64 = p.iter().map(|s| s.measured_msgs).sum();
    let bytes: u64 = p.iter().map(|s| s.measured_bytes).sum();
    let last = p.iter().filter_map(|s| s.last_completion).max();
    let measured_secs = last.map_or(0.0, |l| {
        l.saturating_duration_since(measure_start).as_secs_f64()
    });
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for s in &p {
        for (k, v) in &s.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
    }
    let c: Vec<_> = consumer_stats.iter().map(|s| lock(s)).collect();
    for s in &c {
        for (k, v) in &s.errors {
            *errors.entry(format!("consumer {k}")).or_insert(0) += v;
        }
    }
    let e2e_hist = (consumers > 0).then(|| merge_all(c.iter().map(|s| &s.total)));
    let rate = |n: f64| {
        if measured_secs > 0.0 {
            n / measured_secs
        } else {
            0.0
        }
    };
    let result = ModeResult {
        mode: label.to_string(),
        broker_flush_mode: info.flush_mode.clone(),
        broker: String::new(),
        topic,
        data_dir: None,
        data_fs: None,
        core_split: split,
        measured_secs,
        messages,
        bytes,
        msgs_per_sec: rate(messages as f64),
        offered_msgs_per_sec: w.rate,
        mb_per_sec: rate(bytes as f64) / 1e6,
        latency_kind: match w.send_mode {
            SendMode::Sync | SendMode::Async => "send -> ack".into(),
            SendMode::Oneway => "send call (oneway: no ack)".into(),
        },
        latency: LatencySummary::from_hist(&ack_hist),
        e2e_latency: e2e_hist.as_ref().map(LatencySummary::from_hist),
        errors,
        broker_stats: BrokerStats::between(stats_before, stats_after, measured_secs, unflushed_max),
        replication: match info.replication.as_str() {
            "" => "unknown".to_string(),
            r => r.to_lowercase(),
        },
        broker_replication: info.replication.clone(),
        slave: None,
        replica_lag,
        timeline,
        cpu: Some(cpu),
        hgrm_file: None,
        e2e_hgrm_file: None,
    };
    Ok(ModeRun {
        result,
        ack_hist,
        e2e_hist,
    })
}

/// A mutex's guard, also after a panicking thread poisoned it (the stats are still counts).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A message whose payload starts with its intended send time (µs since the run's base).
fn make_message(template: &[u8], intended: Duration) -> Message {
    let mut buf = BytesMut::with_capacity(template.len());
    buf.put_u64_le(intended.as_micros() as u64);
    buf.extend_from_slice(&template[8..]);
    Message::new(buf.freeze()).with_born_timestamp_ms(unix_ms())
}

/// Producer `idx`'s schedule: closed loop, or its share of `--rate`.
fn pacer_of(idx: usize, w: &Workload) -> Pacer {
    match w.rate {
        None => Pacer::closed(),
        Some(rate) => {
            let per_producer = rate as f64 / w.producers as f64;
            let interval = Duration::from_secs_f64(w.unit() as f64 / per_producer);
            // Spread the producers' schedules over one interval.
            Pacer::open(interval, interval.mul_f64(idx as f64 / w.producers as f64))
        }
    }
}

/// Producer `idx`'s share of `--messages` (`None`: it runs for the duration).
fn quota_of(idx: usize, w: &Workload) -> Option<u64> {
    let producers = w.producers as u64;
    w.messages
        .map(|n| n / producers + u64::from((idx as u64) < n % producers))
}

/// Event-loop thread `idx` of `threads`: drives producers idx, idx + threads, ... on one load
/// core (see [`event_loop`]).
fn event_loop_thread(
    idx: usize,
    threads: usize,
    ctx: &Ctx,
    stats: &SharedStats,
    routes: Vec<(u32, String)>,
) -> Result<(), String> {
    let core = ctx.load_cores[idx % ctx.load_cores.len()];
    machine::pin_current_thread(&[core])?;
    let w = &ctx.w;
    let load = event_loop::LoopLoad {
        topic: &ctx.topic,
        routes,
        producers: (idx..w.producers)
            .step_by(threads)
            .map(|p| (p, pacer_of(p, w), quota_of(p, w)))
            .collect(),
        batch: w.batch,
        message_bytes: w.message_bytes,
        base: ctx.base,
        warmup: ctx.warmup,
        end: ctx.end,
        abort: &ctx.abort,
    };
    let template = vec![0xA5u8; w.message_bytes];
    event_loop::run(
        load,
        stats,
        |intended| make_message(&template, intended),
        interrupted,
    )
    .map_err(|e| format!("event loop {idx}: {e}"))
}

fn producer_thread(idx: usize, ctx: &Ctx, stats: &SharedStats) -> Result<(), String> {
    // Pin first: the client's own threads (connection readers, linger, retry) inherit it.
    machine::pin_current_thread(&ctx.load_cores)?;
    let w = &ctx.w;
    let mut config = ProducerConfig::new(ctx.addr.clone());
    config.linger = Duration::from_millis(w.linger_ms);
    // Sync sends make their own batches; async ones fill the client's (with --batch N, full
    // after N messages: each encodes to more than its payload bytes).
    config.batch_bytes = w.async_batch_bytes().max(1);
    if let Some(n) = w.max_in_flight_batches {
        config.max_in_flight_batches = n.max(1);
    }
    let producer =
        Producer::with_config(config).map_err(|e| format!("producer {idx} cannot start: {e}"))?;
    let clock = RealClock { base: ctx.base };
    let unit = w.unit() as u64;
    let mut pacer = pacer_of(idx, w);
    let quota = quota_of(idx, w);
    let template = vec![0xA5u8; w.message_bytes];
    let selector = QueueSelector::RoundRobin;
    let mut measured_sent = 0u64;
    let mut consecutive_errors = 0u32;
    let mut last_error = String::new();
    while !ctx.abort.load(Ordering::Relaxed) && !interrupted() {
        let intended = pacer.intended(&clock);
        if ctx.end.is_some_and(|end| intended >= end) {
            break;
        }
        let measured = intended >= ctx.warmup;
        let mut n = unit;
        if let (true, Some(q)) = (measured, quota) {
            if measured_sent >= q {
                break;
            }
            n = n.min(q - measured_sent);
        }
        pacer.wait(&clock, intended);
        let bytes = n * w.message_bytes as u64;
        let outcome = match w.send_mode {
            SendMode::Sync => {
                let batch: Vec<Message> =
                    (0..n).map(|_| make_message(&template, intended)).collect();
                let r = producer.send_batch(&ctx.topic, selector, &batch);
                let latency = as_us(clock.now().saturating_sub(intended));
                r.map(|_| lock(stats).record(latency, n, bytes, measured))
            }
            SendMode::Oneway => {
                let m = make_message(&template, intended);
                let r = producer.send_oneway(&ctx.topic, selector, &m);
                let latency = as_us(clock.now().saturating_sub(intended));
                r.map(|_| lock(stats).record(latency, n, bytes, measured))
            }
            SendMode::Async => {
                let m = make_message(&template, intended);
                let (st, base) = (stats.clone(), ctx.base);
                producer.send_async(&ctx.topic, selector, &m, move |r| {
                    let latency = as_us(base.elapsed().saturating_sub(intended));
                    let mut s = lock(&st);
                    match r {
                        Ok(_) => s.record(latency, 1, bytes, measured),
                        Err(e) => s.error(error_kind(&e), 1),
                    }
                })
            }
        };
        match outcome {
            Ok(()) => consecutive_errors = 0,
            Err(e) => {
                lock(stats).error(error_kind(&e), n);
                consecutive_errors += 1;
                last_error = e.to_string();
            }
        }
        if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
            return Err(format!(
                "producer {idx}: {MAX_CONSECUTIVE_ERRORS} sends in a row failed, last: {last_error}"
            ));
        }
        if measured {
            measured_sent += n;
        }
    }
    // Async: wait for every ack before the producer (and its callbacks) goes away.
    producer.flush();
    Ok(())
}

fn consumer_thread(
    idx: usize,
    ctx: &Ctx,
    stats: &SharedStats,
    mut queues: Vec<(u32, u64)>,
) -> Result<(), String> {
    machine::pin_current_thread(&ctx.load_cores)?;
    let consumer =
        Consumer::connect(&ctx.addr).map_err(|e| format!("consumer {idx} cannot start: {e}"))?;
    // Long-poll a single queue. With several, a long poll on one would delay the others: poll
    // them without waiting, and wait briefly only after a round that found nothing.
    let single = queues.len() == 1;
    let mut idle_round = true;
    let warmup_us = ctx.warmup.as_micros() as u64;
    while !ctx.stop_consumers.load(Ordering::Relaxed) {
        let wait = match (single, idle_round) {
            (true, _) => Duration::from_millis(200),
            (false, true) => Duration::from_millis(2),
            (false, false) => Duration::ZERO,
        };
        idle_round = true;
        for (queue, offset) in queues.iter_mut() {
            match consumer.fetch(&ctx.topic, *queue, *offset, wait) {
                Ok(f) => {
                    idle_round &= f.messages.is_empty();
                    let now_us = ctx.base.elapsed().as_micros() as u64;
                    let mut s = lock(stats);
                    for m in &f.messages {
                        let Some(ts) = m.payload.get(..8) else {
                            continue;
                        };
                        let sent_us = u64::from_le_bytes(ts.try_into().expect("8 bytes"));
                        let len = m.payload.len() as u64;
                        s.record(now_us.saturating_sub(sent_us), 1, len, sent_us >= warmup_us);
                    }
                    drop(s);
                    ctx.received
                        .fetch_add(f.messages.len() as u64, Ordering::Relaxed);
                    *offset = f.next_offset;
                }
                Err(e) => {
                    lock(stats).error(error_kind(&e), 1);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    Ok(())
}

/// What the progress thread saw: the timeline, and the broker's counters and this process'
/// CPU times when the warm-up ended.
struct Progress {
    timeline: Vec<TimelinePoint>,
    stats_before: Option<BrokerCounters>,
    cpu_before: CpuSnapshot,
}

/// Prints one line per second to stderr and records the timeline; takes the "before" broker
/// counters and CPU times when the warm-up ends.
fn progress_thread(
    label: &str,
    ctx: &Ctx,
    producers: &[SharedStats],
    consumers: &[SharedStats],
    done: &AtomicBool,
) -> Progress {
    let admin = Admin::connect(&ctx.addr).ok();
    let snap = || admin.as_ref().and_then(broker_stats::snapshot);
    let warmup_secs = ctx.warmup.as_secs();
    let mut before = if warmup_secs == 0 { snap() } else { None };
    let mut cpu_before = CpuSnapshot::take();
    let mut timeline = Vec::new();
    let interval = |stats: &[SharedStats]| -> (Hist, u64, u64) {
        let mut parts = Vec::with_capacity(stats.len());
        let mut msgs = 0;
        let mut errors = 0;
        for s in stats {
            let mut s = lock(s);
            let (h, n) = s.take_interval();
            msgs += n;
            errors += s.errors.values().sum::<u64>();
            parts.push(h);
        }
        (merge_all(parts.iter()), msgs, errors)
    };
    let mut second = 1u64;
    'ticks: loop {
        let tick = ctx.base + Duration::from_secs(second);
        loop {
            if done.load(Ordering::Relaxed) {
                break 'ticks;
            }
            let now = Instant::now();
            if now >= tick {
                break;
            }
            std::thread::sleep((tick - now).min(Duration::from_millis(50)));
        }
        let (ph, pmsgs, perrs) = interval(producers);
        let (ch, cmsgs, cerrs) = interval(consumers);
        let warm = second <= warmup_secs;
        let p99 = (!ph.is_empty()).then(|| ph.value_at_quantile(0.99));
        let e2e_p99 = (!ch.is_empty()).then(|| ch.value_at_quantile(0.99));
        let mut line = format!(
            "[{label}] {second:>4}s{} {pmsgs:>9} msg/s  p99 {:>9}",
            if warm { " warm-up" } else { "        " },
            p99.map_or("-".into(), fmt_us),
        );
        if !consumers.is_empty() {
            line.push_str(&format!(
                "  e2e {cmsgs:>9} msg/s  p99 {:>9}",
                e2e_p99.map_or("-".into(), fmt_us)
            ));
        }
        line.push_str(&format!("  errors {}", perrs + cerrs));
        eprintln!("{line}");
        timeline.push(TimelinePoint {
            second,
            warmup: warm,
            msgs: pmsgs,
            p99_us: p99,
            e2e_msgs: (!consumers.is_empty()).then_some(cmsgs),
            e2e_p99_us: e2e_p99,
        });
        if second == warmup_secs {
            before = snap();
            cpu_before = CpuSnapshot::take();
        }
        second += 1;
    }
    Progress {
        timeline,
        stats_before: before,
        cpu_before,
    }
}
