//! `ringmq-bench drill failover`: SIGKILL the master of a broker group on etcd under pipelined
//! load and time the automatic failover.
//!
//! The drill starts a 3-member etcd cluster of its own (Debian's `etcd-server`, on loopback
//! ports, stopped by pid at the end) and, each round, a group of two brokers under a fresh
//! cluster name (so no round sees another's keys), each a `serve-broker` process joining the
//! group (`--etcd`), SYNC_MASTER, one shard each (a on core 0, b on core 1):
//!
//! 1. a is elected, the topic is created, b follows and enters the in-sync set;
//! 2. producers given both brokers (`a,b`) pipeline numbered messages and record every ack
//!    (id, queue, offset, epoch, when) and every failed send;
//! 3. at a random moment after the first ack, a is SIGKILLed;
//! 4. the load goes on by itself until `--after-failover-ms` after the first ack of a newer
//!    epoch (b, elected); then every send is waited for;
//! 5. the audit reads everything b holds: every acked message at its acked offset, byte for
//!    byte, once (the drill's audit, [`drill::audit`]).
//!
//! The verdict: a round fails if an acked message is missing, damaged or stored twice, a send
//! failed (clients must continue by themselves), no new master acked within
//! [`FAILOVER_TIMEOUT`], or the new master's epoch is not newer. The failover time is from the
//! kill to the first ack of the new epoch, as the producers saw it; the summary gives its
//! median and worst over the rounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmq::client::{Admin, Producer, ProducerConfig, QueueSelector};
use ringmq::cluster::etcd::Etcd;
use ringmq::cluster::records::GroupKeys;
use ringmq::config::{Config, CoreSelection, ReplicationConfig, StorageConfig};
use ringmq::format::batch::Message;
use ringmq::replication::ReplicationMode;
use ringmq::storage::FlushMode;

use crate::drill::{self, DrillArgs, Rng, Verdict, TOPIC};
use crate::slave::{SlaveHost, SlaveProcess};

/// How long the kill may take to be followed by an ack of the new master.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a broker may take to be elected, or a slave to enter the in-sync set.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long etcd members may take to answer after they start.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The group's name in etcd.
const GROUP: &str = "g";

/// One round's outcome.
#[derive(Debug, Clone)]
struct Round {
    round: u32,
    killed_after_ms: u64,
    acked: u64,
    /// Acks from the new master.
    acked_after: u64,
    failover: Option<Duration>,
    lost: u64,
    damaged: u64,
    duplicates: u64,
    failures: Vec<String>,
    verdict: Verdict,
    why: String,
}

pub fn run(args: DrillArgs) -> Result<(), String> {
    args.validate()?;
    if args.lease_ttl_secs == 0 {
        return Err("--lease-ttl-secs must be at least 1".into());
    }
    let seed = drill::seed(&args);
    let mut rng = Rng(seed);
    let dir = drill::data_dir(&args)?;
    eprintln!(
        "drill failover: {} rounds, SYNC_MASTER/{}, lease TTL {} s, {} producers x pipelined \
         {} B messages, {} queues, seed {seed}, data {}",
        args.rounds,
        args.replica_ack,
        args.lease_ttl_secs,
        args.producers,
        args.message_bytes,
        args.queues,
        dir.display()
    );
    let outcome = EtcdCluster::start(&dir.join("etcd"), 3).and_then(|etcd| {
        eprintln!("etcd: 3 members at {}", etcd.endpoints.join(","));
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let r = one_round(&args, &dir, &etcd, round, &mut rng)?;
            eprintln!(
                "round {round}: failover {}, {} acked ({} by the new master), {}",
                r.failover
                    .map_or("none".into(), |d| format!("{} ms", d.as_millis())),
                r.acked,
                r.acked_after,
                if r.verdict == Verdict::Pass {
                    "PASS".to_string()
                } else {
                    format!("FAIL: {}", r.why)
                }
            );
            rounds.push(r);
        }
        Ok(rounds)
    });
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let rounds = outcome?;
    println!("{}", table(&args, &rounds));
    let failed = rounds.iter().filter(|r| r.verdict == Verdict::Fail).count();
    if failed > 0 {
        return Err(format!("{failed} of {} round(s) failed", rounds.len()));
    }
    Ok(())
}

fn one_round(
    args: &DrillArgs,
    dir: &Path,
    etcd: &EtcdCluster,
    round: u32,
    rng: &mut Rng,
) -> Result<Round, String> {
    let cluster = format!("drill-{}-{round}", std::process::id());
    let round_dir = dir.join(format!("round-{round}"));
    let ports = free_ports(2)?;
    let (pa, pb) = (ports[0], ports[1]);
    let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let a = member(args, &round_dir, etcd, &cluster, "a", pa, 0)?;
    wait_for("a to be elected", SETTLE_TIMEOUT, || {
        role(&addr_a).as_deref() == Some("master")
    })?;
    Admin::connect(&addr_a)
        .and_then(|admin| admin.create_topic(TOPIC, args.queues))
        .map_err(|e| format!("create {TOPIC} on {addr_a}: {e}"))?;
    let b = member(args, &round_dir, etcd, &cluster, "b", pb, 1)?;
    let client = etcd.client()?;
    let in_sync_key = GroupKeys::new(&cluster, GROUP).in_sync();
    wait_for("b to enter the in-sync set", SETTLE_TIMEOUT, || {
        client
            .get(&in_sync_key)
            .ok()
            .flatten()
            .is_some_and(|kv| String::from_utf8_lossy(&kv.value).contains("\"b\""))
    })?;
    let old_epoch = Admin::connect(&addr_a)
        .and_then(|admin| admin.broker_info())
        .map_err(|e| format!("broker info of {addr_a}: {e}"))?
        .epoch;

    let load = FailoverLoad::start(args, &format!("{addr_a},{addr_b}"), round)?;
    let first_ack = wait_for("the first ack", SETTLE_TIMEOUT, || load.acked() > 0);
    if let Err(e) = first_ack {
        load.finish();
        return Err(e);
    }
    let delay = rng.between(args.kill_after_ms_min, args.kill_after_ms_max);
    std::thread::sleep(Duration::from_millis(delay));
    let killed_at = Instant::now();
    a.kill9()?;
    let new_master = wait_for("an ack from the new master", FAILOVER_TIMEOUT, || {
        load.first_ack_after(old_epoch).is_some()
    });
    if new_master.is_ok() {
        std::thread::sleep(Duration::from_millis(args.after_failover_ms));
    }
    let (acks, failures) = load.finish();
    let first_new = acks
        .iter()
        .filter(|x| x.epoch != old_epoch)
        .map(|x| x.at)
        .min();

    let stored = drill::read_everything(&addr_b, args.queues)?;
    let audit_acks: Vec<drill::Ack> = acks
        .iter()
        .map(|x| drill::Ack {
            id: x.id,
            queue: x.queue,
            offset: x.offset,
            before_reading: true,
        })
        .collect();
    let (audit, _) = drill::audit(
        FlushMode::SyncFlush,
        args.message_bytes as usize,
        &audit_acks,
        &[],
        &stored,
        0,
    );
    let stop = b.stop();
    if !args.keep {
        let _ = std::fs::remove_dir_all(&round_dir);
    }
    stop?;

    let mut why = Vec::new();
    if let Err(e) = &new_master {
        why.push(e.clone());
    }
    if audit.verdict == Verdict::Fail {
        why.push(audit.why.clone());
    }
    if !failures.is_empty() {
        why.push(format!(
            "{} send(s) failed, e.g. {}",
            failures.len(),
            failures[0]
        ));
    }
    if acks
        .iter()
        .any(|x| x.epoch != old_epoch && x.epoch < old_epoch)
    {
        why.push(format!(
            "the new master acked with an epoch older than {old_epoch}"
        ));
    }
    Ok(Round {
        round,
        killed_after_ms: delay,
        acked: acks.len() as u64,
        acked_after: acks.iter().filter(|x| x.epoch != old_epoch).count() as u64,
        failover: first_new.map(|t| t.saturating_duration_since(killed_at)),
        lost: audit.lost_before_reading + audit.lost_after_reading,
        damaged: audit.damaged,
        duplicates: audit.duplicates,
        failures,
        verdict: if why.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        why: why.join("; "),
    })
}

/// A member of the round's group: a `serve-broker` process on `core`, SYNC_MASTER, one shard.
fn member(
    args: &DrillArgs,
    round_dir: &Path,
    etcd: &EtcdCluster,
    cluster: &str,
    node: &str,
    port: u16,
    core: usize,
) -> Result<SlaveProcess, String> {
    let dir = round_dir.join(node);
    let mut server = crate::runner::bench_server_config(&dir.join("data"), "127.0.0.1", 1);
    server.port = port;
    server.cores = CoreSelection::List(vec![core]);
    let config = Config {
        server,
        storage: StorageConfig {
            segment_bytes: args.segment_mib << 20,
            ..StorageConfig::default()
        },
        replication: ReplicationConfig {
            mode: ReplicationMode::SyncMaster,
            replica_ack: args.replica_ack,
            ..ReplicationConfig::default()
        },
    };
    std::fs::create_dir_all(&config.server.data_dir)
        .map_err(|e| format!("{}: {e}", config.server.data_dir.display()))?;
    let path = dir.join("config.toml");
    std::fs::write(&path, config.to_toml()).map_err(|e| format!("{}: {e}", path.display()))?;
    let extra: Vec<String> = [
        "--etcd",
        &etcd.endpoints.join(","),
        "--cluster-name",
        cluster,
        "--group",
        GROUP,
        "--node",
        node,
        "--lease-ttl-secs",
        &args.lease_ttl_secs.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    SlaveProcess::spawn_with(&path, &extra, &SlaveHost::Loopback, &[core])
        .map_err(|e| format!("broker {node}: {e}"))
}

fn role(addr: &str) -> Option<String> {
    Admin::connect(addr)
        .and_then(|a| a.broker_info())
        .ok()
        .map(|i| i.role)
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {within:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `n` distinct free ports: every listener is held until all are bound, so the kernel cannot
/// hand the same port out twice (it did: an etcd cluster once got two members on one port).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// An ack as the producers saw it.
#[derive(Debug, Clone, Copy)]
struct FailoverAck {
    id: u64,
    queue: u32,
    offset: u64,
    epoch: u64,
    at: Instant,
}

/// Pipelining producers that know both brokers and follow the failover by themselves.
struct FailoverLoad {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<FailoverAck>>>,
    failures: Arc<Mutex<Vec<String>>>,
    /// Sends handed to the producers; each ends as an ack or a failure.
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FailoverLoad {
    fn start(args: &DrillArgs, brokers: &str, round: u32) -> Result<FailoverLoad, String> {
        let load = FailoverLoad {
            stop: Arc::default(),
            acks: Arc::default(),
            failures: Arc::default(),
            sent: Arc::default(),
            threads: Vec::new(),
        };
        let mut threads = Vec::new();
        for p in 0..args.producers {
            let mut config = ProducerConfig::new(brokers);
            config.linger = Duration::from_millis(1);
            let producer = Producer::with_config(config)
                .map_err(|e| format!("producer {p} at {brokers}: {e}"))?;
            let (stop, acks, failures, sent) = (
                load.stop.clone(),
                load.acks.clone(),
                load.failures.clone(),
                load.sent.clone(),
            );
            let (len, queues) = (args.message_bytes as usize, args.queues);
            // Ids unique across rounds and producers: round, producer, then a counter.
            let base = (u64::from(round) << 48) | (u64::from(p) << 40);
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let id = base | n;
                    n += 1;
                    let queue = (id % u64::from(queues)) as u32;
                    let (acked, failed) = (acks.clone(), failures.clone());
                    let sending = producer.send_async(
                        TOPIC,
                        QueueSelector::Queue(queue),
                        &Message::new(drill::payload(id, len)),
                        move |r| match r {
                            Ok(r) => acked.lock().unwrap().push(FailoverAck {
                                id,
                                queue: r.queue,
                                offset: r.offset,
                                epoch: r.epoch,
                                at: Instant::now(),
                            }),
                            Err(e) => failed.lock().unwrap().push(format!("{id}: {e}")),
                        },
                    );
                    match sending {
                        Ok(()) => {
                            sent.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("{id}: {e}")),
                    }
                    // Paced, so the run spans the failover without a huge backlog.
                    std::thread::sleep(Duration::from_micros(500));
                }
                producer.flush();
            }));
        }
        Ok(FailoverLoad { threads, ..load })
    }

    fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    fn first_ack_after(&self, old_epoch: u64) -> Option<Instant> {
        let acks = self.acks.lock().unwrap();
        acks.iter()
            .filter(|x| x.epoch != old_epoch)
            .map(|x| x.at)
            .min()
    }

    /// Stops sending, waits for every send to end, returns the acks and the failures.
    fn finish(self) -> (Vec<FailoverAck>, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        let ended = || self.acks.lock().unwrap().len() + self.failures.lock().unwrap().len();
        while (ended() as u64) < self.sent.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut failures = self.failures.lock().unwrap().clone();
        let missing = self
            .sent
            .load(Ordering::Acquire)
            .saturating_sub(ended() as u64);
        if missing > 0 {
            failures.push(format!(
                "{missing} send(s) neither acked nor failed within {FAILOVER_TIMEOUT:?}"
            ));
        }
        let acks = self.acks.lock().unwrap().clone();
        (acks, failures)
    }
}

/// The drill's own etcd cluster: `n` members on free loopback ports, data and logs under
/// `dir`, every member SIGKILLed and reaped on drop.
pub struct EtcdCluster {
    children: Vec<Child>,
    pub endpoints: Vec<String>,
}

impl EtcdCluster {
    pub fn start(dir: &Path, n: usize) -> Result<EtcdCluster, String> {
        let binary = etcd_binary().ok_or(
            "etcd is not installed (on Debian: apt-get install etcd-server); the failover \
             drill runs its own 3-member cluster",
        )?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ports = free_ports(2 * n)?;
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let mut cluster = EtcdCluster {
            children: Vec::new(),
            endpoints: (0..n)
                .map(|i| format!("127.0.0.1:{}", ports[2 * i]))
                .collect(),
        };
        for i in 0..n {
            let log_path = dir.join(format!("m{i}.log"));
            let log = std::fs::File::create(&log_path)
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            let err = log.try_clone().map_err(|e| format!("etcd log: {e}"))?;
            let client = format!("http://127.0.0.1:{}", ports[2 * i]);
            let peer = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
            let mut command = Command::new(&binary);
            command
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}.etcd")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--initial-cluster-token",
                    &format!("ringmq-drill-{}", std::process::id()),
                ])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(err));
            // SAFETY: prctl is an async-signal-safe system call; should the bench die without
            // stopping etcd, the kernel stops it.
            unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                    Ok(())
                });
            }
            let child = command
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
            cluster.children.push(child);
        }
        let client = cluster.client()?;
        wait_for("etcd to answer", ETCD_READY_TIMEOUT, || {
            client.put("/ringmq-drill/ready", b"1", None).is_ok()
        })
        .map_err(|e| {
            let tail = std::fs::read_to_string(dir.join("m0.log")).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().collect();
            format!(
                "{e}\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
        })?;
        Ok(cluster)
    }

    /// The members' process ids (for their CPU use).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    fn client(&self) -> Result<Etcd, String> {
        Etcd::new(&self.endpoints, Duration::from_secs(1)).map_err(|e| e.to_string())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SAFETY: kill with the pid of our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// `etcd` on the PATH (Debian installs it in /usr/bin).
fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

fn table(args: &DrillArgs, rounds: &[Round]) -> String {
    let mut out = format!(
        "drill failover: SYNC_MASTER/{}, lease TTL {} s, {} producers\n\n\
         | round | killed after | acked | by the new master | kill -> first new ack | lost | damaged | dup | failed sends | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        args.replica_ack, args.lease_ttl_secs, args.producers
    );
    for r in rounds {
        out.push_str(&format!(
            "| {} | {} ms | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.round,
            r.killed_after_ms,
            r.acked,
            r.acked_after,
            r.failover
                .map_or("none".into(), |d| format!("{} ms", d.as_millis())),
            r.lost,
            r.damaged,
            r.duplicates,
            r.failures.len(),
            match r.verdict {
                Verdict::Pass => "PASS".to_string(),
                Verdict::Fail => format!("FAIL: {}", r.why),
            }
        ));
    }
    let mut times: Vec<Duration> = rounds.iter().filter_map(|r| r.failover).collect();
    times.sort();
    if let (Some(worst), false) = (times.last(), times.is_empty()) {
        let n = times.len();
        let median = (times[(n - 1) / 2] + times[n / 2]) / 2;
        out.push_str(&format!(
            "\nfailover (kill -> first ack from the new master) over {} round(s): median {} \
             ms, worst {} ms; acked messages lost: {}\n",
            times.len(),
            median.as_millis(),
            worst.as_millis(),
            rounds.iter().map(|r| r.lost).sum::<u64>()
        ));
    }
    let passed = rounds.iter().filter(|r| r.verdict == Verdict::Pass).count();
    out.push_str(&format!(
        "verdict: {}\n",
        if passed == rounds.len() {
            format!("PASS ({passed} of {} rounds)", rounds.len())
        } else {
            format!(
                "FAIL ({} of {} rounds failed)",
                rounds.len() - passed,
                rounds.len()
            )
        }
    ));
    out
}
