//! `ringmq-bench drill partition`: cut a master off its slave under load and audit what the
//! acks claimed.
//!
//! ```text
//!   root namespace ("host A")                          namespace rqbench-<pid>-<n> ("host B")
//!   producers -> master process 127.78.<k>.1 <== veth ==> rq0 127.78.<k>.2 slave process
//!                                               cut: `ip -n <ns> link set rq0 down`
//! ```
//!
//! Both brokers are processes of this executable (`serve-broker`), stopped by pid; the
//! namespace (and with it the veth pair) is deleted on drop, also when a step fails. Each
//! round: pipelined producers send to the master; after `--load-around-cut-ms` (± 50 %, from
//! `--seed`) the link is cut for `--partition-ms`, then healed; the load goes on for
//! `--load-around-cut-ms`, stops, and the drill waits until the master reports every shard
//! streaming with no lag. Then both logs are read back and audited ([`audit`]):
//!
//! - every message ever acked is on the master at its acked offset, intact, and on the slave
//!   too; no id is stored twice on either (each id is sent once);
//! - SYNC_MASTER: every ack claims at least the configured replica level (`replica-received`
//!   or `replica-durable`): a lower one is a silent downgrade; and an ack that arrives while the
//!   link is cut must be for a message the slave had acknowledged before the cut: at an offset
//!   below the master's visible end of its queue read just before the heal (on a SYNC_MASTER
//!   master consumers see only what the slave acknowledged, and nothing from the slave can
//!   move that while the link is down). A time rule alone is not enough: on a loaded machine
//!   replica-durable acks were seen reaching the client's callbacks 300–1000 ms into a cut
//!   (and none later), which a time rule cannot tell from lies. Sends during the cut fail with FLUSH_SLAVE_TIMEOUT or
//!   SLAVE_NOT_AVAILABLE (counted by status) or are acked after the heal;
//! - ASYNC_MASTER: acks go on during the cut (counted) and the slave's lag grows (its maximum,
//!   as the master reports it, is shown); after the heal the slave must have every one.
//!
//! Where the drill cannot run (not root, no `ip`) it prints SKIP and why, and succeeds; under
//! `CI=true` that is a failure.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use ringmq::client::{Admin, ClientError, Durability};
use ringmq::config::{Config, ReplicationConfig, StorageConfig};
use ringmq::protocol::ReplicaStats;
use ringmq::replication::{ReplicaAck, ReplicationMode, Role};

use crate::broker_stats::ReplicationWatch;
use crate::drill::{self, payload, DrillArgs, Rng, Verdict, FIRST_ACK_TIMEOUT, TOPIC};
use crate::drill_load::{Load, LoadOptions};
use crate::runner::error_kind;
use crate::slave::{Netns, SlaveHost, SlaveProcess};

/// How long the slave may take, after the heal and the end of the load, to reconnect and
/// catch up (the master paces catch-up at 64 MiB/s by default).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the drill samples the master's stats (the slave's lag) and prints progress.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A progress line this often during the cut and the catch-up.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// When an ack or a failure arrived, relative to the round's cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    BeforeCut,
    /// Within `--in-flight-grace-ms` of the cut.
    CutGrace,
    Cut,
    AfterHeal,
}

/// One acked message, as the producer's callback saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionAck {
    pub round: u32,
    pub id: u64,
    pub queue: u32,
    pub offset: u64,
    pub phase: Phase,
    pub level: Durability,
    pub epoch: u64,
}

/// One failed send: the broker's status (or the client's error kind) and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    pub round: u32,
    pub status: String,
    pub phase: Phase,
}

/// What one round's audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionAudit {
    pub round: u32,
    pub partition_ms: u64,
    /// Acks of this round; of them, those that arrived while the link was cut (grace included)
    /// and, of those, after the grace.
    pub acked: u64,
    pub acked_during_cut: u64,
    pub acked_after_grace: u64,
    /// This round's failed sends by status: while the link was cut (grace included) / else.
    pub errors_during_cut: BTreeMap<String, u64>,
    pub errors_otherwise: BTreeMap<String, u64>,
    /// Acks below the level the mode promises (SYNC_MASTER only).
    pub downgraded: u64,
    /// Acks that arrived during the cut for a message beyond what the slave had confirmed
    /// (SYNC_MASTER only).
    pub acked_unconfirmed: u64,
    /// Acked messages (any round) missing at their offset on the master / the slave.
    pub lost_master: u64,
    pub lost_slave: u64,
    /// Acked messages stored at their offset with other bytes, on either broker.
    pub damaged: u64,
    /// Ids stored more than once, on either broker.
    pub duplicates: u64,
    /// The largest lag (bytes, and age of the oldest byte the slave lacks) the master reported
    /// during the round, over its shards; and how often the replication link reconnected.
    pub slave_lag_max_bytes: u64,
    pub slave_lag_max_ms: u64,
    pub reconnects: u64,
    pub slave_caught_up: bool,
    /// From the end of the load to the slave caught up.
    pub catch_up_ms: u64,
    /// The distinct epochs the acks named.
    pub epochs: Vec<u64>,
    pub verdict: Verdict,
    pub why: String,
}

/// The weakest durability an ack may claim under `mode` (`Unknown` when any level is fine).
pub fn required_level(mode: ReplicationMode, replica_ack: ReplicaAck) -> Durability {
    match (mode, replica_ack) {
        (ReplicationMode::AsyncMaster, _) => Durability::Unknown,
        (ReplicationMode::SyncMaster, ReplicaAck::Received) => Durability::ReplicaReceived,
        (ReplicationMode::SyncMaster, ReplicaAck::Durable) => Durability::ReplicaDurable,
    }
}

/// Durability levels in the order of their promise.
fn rank(level: Durability) -> u8 {
    match level {
        Durability::Unknown => 0,
        Durability::Memory => 1,
        Durability::Disk => 2,
        Durability::ReplicaReceived => 3,
        Durability::ReplicaDurable => 4,
    }
}

/// Where the acked messages are compared to.
pub struct Logs<'a> {
    pub master: &'a BTreeMap<(u32, u64), Vec<u8>>,
    /// `None` when the slave did not catch up (its log is not read).
    pub slave: Option<&'a BTreeMap<(u32, u64), Vec<u8>>>,
}

/// Audits round `round`: `acks` and `failures` of every round so far (presence is checked for
/// all of them, the counts are this round's), the two logs as read after the catch-up, and
/// `confirmed_at_heal`, the master's visible end offset per queue read just before the heal.
#[allow(clippy::too_many_arguments)]
pub fn audit(
    round: u32,
    mode: ReplicationMode,
    replica_ack: ReplicaAck,
    message_bytes: usize,
    acks: &[PartitionAck],
    failures: &[SendFailure],
    logs: &Logs<'_>,
    confirmed_at_heal: &BTreeMap<u32, u64>,
    slave_caught_up: bool,
) -> PartitionAudit {
    let mut a = PartitionAudit {
        round,
        slave_caught_up,
        ..PartitionAudit::default()
    };
    let required = required_level(mode, replica_ack);
    let mut epochs = Vec::new();
    for ack in acks.iter().filter(|x| x.round == round) {
        a.acked += 1;
        if matches!(ack.phase, Phase::CutGrace | Phase::Cut) {
            a.acked_during_cut += 1;
        }
        if ack.phase == Phase::Cut {
            a.acked_after_grace += 1;
        }
        let confirmed = confirmed_at_heal.get(&ack.queue).copied().unwrap_or(0);
        if matches!(ack.phase, Phase::CutGrace | Phase::Cut) && ack.offset >= confirmed {
            a.acked_unconfirmed += 1;
        }
        if rank(ack.level) < rank(required) {
            a.downgraded += 1;
        }
        if !epochs.contains(&ack.epoch) {
            epochs.push(ack.epoch);
        }
    }
    a.epochs = epochs;
    for f in failures.iter().filter(|f| f.round == round) {
        let by = if matches!(f.phase, Phase::CutGrace | Phase::Cut) {
            &mut a.errors_during_cut
        } else {
            &mut a.errors_otherwise
        };
        *by.entry(f.status.clone()).or_default() += 1;
    }
    let mut expected: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut check = |log: &BTreeMap<(u32, u64), Vec<u8>>, lost: &mut u64| {
        for ack in acks {
            let want = expected
                .entry(ack.id)
                .or_insert_with(|| payload(ack.id, message_bytes));
            match log.get(&(ack.queue, ack.offset)) {
                None => *lost += 1,
                Some(p) if p == want => {}
                Some(_) => a.damaged += 1,
            }
        }
        let mut seen: HashMap<u64, u32> = HashMap::new();
        for p in log.values() {
            if let Some(id) = drill::id_of(p) {
                *seen.entry(id).or_default() += 1;
            }
        }
        a.duplicates += seen.values().filter(|n| **n > 1).count() as u64;
    };
    check(logs.master, &mut a.lost_master);
    if let Some(slave) = logs.slave {
        check(slave, &mut a.lost_slave);
    }

    let mut why = Vec::new();
    if a.lost_master > 0 {
        why.push(format!(
            "{} acked message(s) missing on the master",
            a.lost_master
        ));
    }
    if a.lost_slave > 0 {
        why.push(format!(
            "{} acked message(s) missing on the slave after catch-up",
            a.lost_slave
        ));
    }
    if a.damaged > 0 {
        why.push(format!("{} acked message(s) damaged", a.damaged));
    }
    if a.duplicates > 0 {
        why.push(format!("{} message(s) stored twice", a.duplicates));
    }
    if !slave_caught_up {
        why.push("the slave did not catch up after the heal".to_string());
    }
    if mode == ReplicationMode::SyncMaster {
        if a.downgraded > 0 {
            why.push(format!(
                "{} ack(s) below {} under SYNC_MASTER (a silent downgrade)",
                a.downgraded,
                required.as_str()
            ));
        }
        if a.acked_unconfirmed > 0 {
            why.push(format!(
                "{} ack(s) under SYNC_MASTER while the slave was cut off, for messages it had \
                 not confirmed",
                a.acked_unconfirmed
            ));
        }
    }
    if !why.is_empty() {
        a.verdict = Verdict::Fail;
        a.why = why.join("; ");
    }
    a
}

/// The instants that split a round into phases.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// Just before `ip link set down` ran.
    start: Instant,
    grace_end: Instant,
    /// Just before `ip link set up` ran.
    heal: Instant,
}

impl Cut {
    fn phase(cut: Option<&Cut>, at: Instant) -> Phase {
        match cut {
            None => Phase::BeforeCut,
            Some(c) if at < c.start => Phase::BeforeCut,
            Some(c) if at < c.grace_end => Phase::CutGrace,
            Some(c) if at < c.heal => Phase::Cut,
            Some(_) => Phase::AfterHeal,
        }
    }
}

/// The status a failed send is counted under: the broker's code, or for a message of a batch
/// that was only failed because an earlier batch of its queue's window failed (the client
/// fails the whole window; `producer.rs`), a name of its own, so the replica statuses count
/// what the master answered.
pub fn failure_kind(e: &ClientError) -> String {
    match e {
        ClientError::Unexpected(m) if m.contains("failed before it") => WINDOW_FAILED.to_string(),
        e => error_kind(e),
    }
}

/// The status of a send failed with an earlier batch of its window.
pub const WINDOW_FAILED: &str = "failed-with-window";

/// Stops the load and turns what it recorded into the audit's acks and failures of `round`,
/// each placed against the cut.
fn finish_load(load: Load, round: u32, cut: Option<&Cut>) -> (Vec<PartitionAck>, Vec<SendFailure>) {
    let (acks, failures) = load.finish();
    let acks = acks
        .iter()
        .map(|a| PartitionAck {
            round,
            id: a.id,
            queue: a.result.queue,
            offset: a.result.offset,
            phase: Cut::phase(cut, a.at),
            level: a.result.durability,
            epoch: a.result.epoch,
        })
        .collect();
    let failures = failures
        .into_iter()
        .map(|(status, at)| SendFailure {
            round,
            status,
            phase: Cut::phase(cut, at),
        })
        .collect();
    (acks, failures)
}

/// The master's replication view: lag bytes (summed over shards), and whether every shard
/// streams with nothing left to send.
fn replication_state(addr: &str) -> Result<(u64, bool), String> {
    let stats = Admin::connect(addr)
        .and_then(|a| a.broker_stats())
        .map_err(|e| format!("broker stats at {addr}: {e}"))?;
    let lag = stats.iter().map(|s| s.replication.lag_bytes).sum();
    let caught_up = !stats.is_empty()
        && stats.iter().all(|s| {
            let r = &s.replication;
            r.link == ReplicaStats::LINK_STREAMING
                && r.lag_bytes == 0
                && r.peer_durable >= r.log_end
        });
    Ok((lag, caught_up))
}

fn broker_config(
    args: &DrillArgs,
    data_dir: &Path,
    listen_host: &str,
    replication: ReplicationConfig,
) -> Config {
    Config {
        // The process is confined to one core before it starts.
        server: crate::runner::bench_server_config(data_dir, listen_host, 1),
        storage: StorageConfig {
            flush_mode: args.flush_mode,
            flush_interval_ms: args.flush_interval_ms,
            segment_bytes: args.segment_mib << 20,
            ..StorageConfig::default()
        },
        replication,
    }
}

/// Writes `config` into `dir/config.toml` and starts a broker process from it on `host`.
fn spawn(
    config: &Config,
    dir: &Path,
    host: &SlaveHost,
    core: usize,
) -> Result<SlaveProcess, String> {
    std::fs::create_dir_all(&config.server.data_dir)
        .map_err(|e| format!("{}: {e}", config.server.data_dir.display()))?;
    let path = dir.join("config.toml");
    std::fs::write(&path, config.to_toml()).map_err(|e| format!("{}: {e}", path.display()))?;
    // On a one-core machine both brokers share it.
    let cores = crate::machine::allowed_cores();
    let core = cores.get(core).or(cores.first()).copied().unwrap_or(0);
    SlaveProcess::spawn(&path, host, &[core])
}

pub fn run(args: DrillArgs) -> Result<(), String> {
    args.validate()?;
    if let Some(why) = Netns::unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            return Err(format!(
                "drill partition cannot run: {why} (under CI=true a skipped drill fails)"
            ));
        }
        println!("SKIP drill partition: {why} (it needs two network namespaces)");
        return Ok(());
    }
    let seed = drill::seed(&args);
    let dir = drill::data_dir(&args)?;
    eprintln!(
        "drill partition: {} rounds, {}{}, {}, cut {} ms (replica deadline {} ms), {} producers x pipelined {} B messages, {} queues, seed {seed}, data {}",
        args.rounds,
        args.replication,
        if args.replication == ReplicationMode::SyncMaster {
            format!("/{}", args.replica_ack)
        } else {
            String::new()
        },
        args.flush_mode,
        args.partition_ms,
        args.replica_timeout_ms,
        args.producers,
        args.message_bytes,
        args.queues,
        dir.display()
    );
    let outcome = rounds(&args, &dir, &mut Rng(seed));
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let audits = outcome?;
    println!("{}", table(&args, &audits));
    let failed = audits.iter().filter(|a| a.verdict == Verdict::Fail).count();
    if failed > 0 {
        return Err(format!(
            "{failed} of {} round(s) failed the audit",
            audits.len()
        ));
    }
    Ok(())
}

fn rounds(args: &DrillArgs, dir: &Path, rng: &mut Rng) -> Result<Vec<PartitionAudit>, String> {
    // Declared first, so dropped last: the processes (which run in it) stop before the
    // namespace is deleted, on every path out of here.
    let host = SlaveHost::Netns(Netns::create()?);
    let SlaveHost::Netns(ns) = &host else {
        unreachable!("made as a namespace just above")
    };
    let root = SlaveHost::Loopback;
    let master_dir = dir.join("master");
    let slave_dir = dir.join("slave");
    let master_config = broker_config(
        args,
        &master_dir.join("data"),
        host.master_host(),
        ReplicationConfig {
            mode: args.replication,
            replica_ack: args.replica_ack,
            replica_timeout_ms: args.replica_timeout_ms,
            peer: Some(host.slave_host().to_string()),
            // The slave starts after the master, on a port not known yet.
            force_master: true,
            ..ReplicationConfig::default()
        },
    );
    std::fs::create_dir_all(&master_dir).map_err(|e| format!("{}: {e}", master_dir.display()))?;
    let master = spawn(&master_config, &master_dir, &root, 0)?;
    let master_addr = master.address().to_string();
    let slave_config = broker_config(
        args,
        &slave_dir.join("data"),
        host.slave_host(),
        ReplicationConfig {
            role: Role::Slave,
            master: Some(master_addr.clone()),
            ..ReplicationConfig::default()
        },
    );
    std::fs::create_dir_all(&slave_dir).map_err(|e| format!("{}: {e}", slave_dir.display()))?;
    let mut slave = spawn(&slave_config, &slave_dir, &host, 1)?;
    slave.wait_streaming(&master_addr, || false)?;
    let slave_addr = slave.address().to_string();
    eprintln!(
        "master pid {} at {master_addr} (root namespace); slave pid {} at {slave_addr} in namespace {}",
        master.pid(),
        slave.pid(),
        ns.name()
    );
    Admin::connect(&master_addr)
        .and_then(|a| a.create_topic(TOPIC, args.queues))
        .map_err(|e| format!("create topic: {e}"))?;

    let load_cores = crate::machine::allowed_cores();
    let mut all_acks: Vec<PartitionAck> = Vec::new();
    let mut all_failures: Vec<SendFailure> = Vec::new();
    let mut audits = Vec::new();
    for round in 1..=args.rounds {
        let load = Load::start(
            args,
            &master_addr,
            round,
            LoadOptions {
                // Longer than the replica deadline, so the broker's status wins over ours.
                request_timeout: Duration::from_millis(args.replica_timeout_ms + 10_000),
                // The master answers again after the heal.
                stop_on_refused_send: false,
                classify: failure_kind,
            },
        )?;
        load.wait_first_ack(FIRST_ACK_TIMEOUT)?;
        let watch = ReplicationWatch::start(&master_addr, Instant::now(), &load_cores)?;
        let around = args.load_around_cut_ms;
        let before_ms = rng.between(around / 2, around + around / 2);
        std::thread::sleep(Duration::from_millis(before_ms));

        let start = Instant::now();
        // If this fails the link may be down: the namespace's drop removes it all the same.
        ns.set_link_up(false)?;
        let grace_end = start + Duration::from_millis(args.in_flight_grace_ms);
        let heal_at = start + Duration::from_millis(args.partition_ms);
        let (acked_at_cut, failed_at_cut) = (load.acked(), load.failed());
        let mut next_progress = start + PROGRESS_INTERVAL;
        // Nothing here talks to a broker, so the heal comes on time (the watch samples lag).
        while Instant::now() < heal_at {
            std::thread::sleep(
                POLL_INTERVAL.min(heal_at.saturating_duration_since(Instant::now())),
            );
            if Instant::now() >= next_progress {
                next_progress += PROGRESS_INTERVAL;
                eprintln!(
                    "round {round}: cut for {:.1} s: {} acks and {} failed sends since the cut",
                    start.elapsed().as_secs_f64(),
                    load.acked() - acked_at_cut,
                    load.failed() - failed_at_cut,
                );
            }
        }
        // What the slave had confirmed: nothing from it reaches the master while cut.
        let confirmed_at_heal: BTreeMap<u32, u64> = Admin::connect(&master_addr)
            .and_then(|a| a.queue_stats(TOPIC))
            .map_err(|e| format!("queue stats of the master during the cut: {e}"))?
            .iter()
            .map(|q| (q.queue, q.end_offset))
            .collect();
        let heal = Instant::now();
        ns.set_link_up(true)?;
        let cut = Cut {
            start,
            grace_end,
            heal,
        };
        std::thread::sleep(Duration::from_millis(around));
        let (acks, failures) = finish_load(load, round, Some(&cut));
        eprintln!(
            "round {round}: cut {} ms after {before_ms} ms of load, healed; {} acks, {} sends failed; waiting for the slave",
            heal.duration_since(start).as_millis(),
            acks.len(),
            failures.len()
        );
        all_acks.extend(acks);
        all_failures.extend(failures);

        let load_end = Instant::now();
        let mut caught_up = false;
        let mut last_progress = Instant::now();
        while load_end.elapsed() < CATCH_UP_TIMEOUT {
            match replication_state(&master_addr) {
                Ok((_, true)) => {
                    caught_up = true;
                    break;
                }
                Ok((lag, false)) => {
                    if last_progress.elapsed() >= PROGRESS_INTERVAL {
                        last_progress = Instant::now();
                        eprintln!("round {round}: slave catching up, lag {lag} B");
                    }
                }
                Err(e) => eprintln!("round {round}: {e}"),
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let catch_up_ms = load_end.elapsed().as_millis() as u64;
        let (lag, _) = watch.finish();
        let master_log = drill::read_everything(&master_addr, args.queues)?;
        let slave_log = if caught_up {
            Some(drill::read_everything(&slave_addr, args.queues)?)
        } else {
            None
        };
        let mut a = audit(
            round,
            args.replication,
            args.replica_ack,
            args.message_bytes as usize,
            &all_acks,
            &all_failures,
            &Logs {
                master: &master_log,
                slave: slave_log.as_ref(),
            },
            &confirmed_at_heal,
            caught_up,
        );
        a.partition_ms = heal.duration_since(start).as_millis() as u64;
        a.slave_lag_max_bytes = lag.max_lag_bytes.unwrap_or(0);
        a.slave_lag_max_ms = lag.max_lag_ms.unwrap_or(0);
        a.reconnects = lag.reconnects;
        a.catch_up_ms = catch_up_ms;
        eprintln!(
            "round {round}: {:?}{} (slave caught up in {catch_up_ms} ms)",
            a.verdict,
            if a.why.is_empty() {
                String::new()
            } else {
                format!(": {}", a.why)
            }
        );
        audits.push(a);
    }
    // The slave first: a slave whose master vanished would only log reconnects.
    let pid = slave.pid();
    slave
        .stop()
        .map_err(|e| format!("stopping the slave {pid}: {e}"))?;
    let pid = master.pid();
    master
        .stop()
        .map_err(|e| format!("stopping the master {pid}: {e}"))?;
    drop(host);
    Ok(audits)
}

fn by_status(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn table(args: &DrillArgs, audits: &[PartitionAudit]) -> String {
    let promise = match args.replication {
        ReplicationMode::SyncMaster => format!(
            "no ack below {} and none during the cut for a message the slave had not \
             confirmed; acks during the cut counted, those after its first {} ms apart",
            required_level(args.replication, args.replica_ack).as_str(),
            args.in_flight_grace_ms
        ),
        ReplicationMode::AsyncMaster => "acks go on during the cut".to_string(),
    };
    let mut t = format!(
        "drill partition, {} / {}: every acked message on the master once and intact, and on \
         the slave after catch-up; {promise}\n\n",
        args.replication, args.flush_mode
    );
    t.push_str(
        "| round | cut ms | acked | acked during cut (after grace) | of them unconfirmed | errors during cut by status | other errors | ack levels below promise | lost (master / slave) | damaged | duplicates | slave lag max (B / ms) | link reconnects | slave caught up (ms) | verdict |\n\
         |---:|---:|---:|---|---:|---|---|---:|---|---:|---:|---|---:|---|---|\n",
    );
    for a in audits {
        t.push_str(&format!(
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} / {} | {} | {} | {} / {} | {} | {} | {} |\n",
            a.round,
            a.partition_ms,
            a.acked,
            a.acked_during_cut,
            a.acked_after_grace,
            a.acked_unconfirmed,
            by_status(&a.errors_during_cut),
            by_status(&a.errors_otherwise),
            a.downgraded,
            a.lost_master,
            a.lost_slave,
            a.damaged,
            a.duplicates,
            a.slave_lag_max_bytes,
            a.slave_lag_max_ms,
            a.reconnects,
            if a.slave_caught_up {
                format!("yes ({})", a.catch_up_ms)
            } else {
                "NO".to_string()
            },
            match a.verdict {
                Verdict::Pass => "PASS".to_string(),
                Verdict::Fail => format!("FAIL: {}", a.why),
            }
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 32;
    const SYNC: ReplicationMode = ReplicationMode::SyncMaster;
    const ASYNC: ReplicationMode = ReplicationMode::AsyncMaster;

    fn ack(id: u64, offset: u64, phase: Phase, level: Durability) -> PartitionAck {
        PartitionAck {
            round: 1,
            id,
            queue: 0,
            offset,
            phase,
            level,
            epoch: 7,
        }
    }

    fn log(ids: &[(u64, u64)]) -> BTreeMap<(u32, u64), Vec<u8>> {
        ids.iter()
            .map(|&(offset, id)| ((0, offset), payload(id, LEN)))
            .collect()
    }

    fn run(
        mode: ReplicationMode,
        acks: &[PartitionAck],
        master: &BTreeMap<(u32, u64), Vec<u8>>,
        slave: &BTreeMap<(u32, u64), Vec<u8>>,
    ) -> PartitionAudit {
        // The slave had confirmed offsets 0 and 1 of queue 0 when the link was cut.
        run_confirmed(mode, acks, master, slave, 2)
    }

    fn run_confirmed(
        mode: ReplicationMode,
        acks: &[PartitionAck],
        master: &BTreeMap<(u32, u64), Vec<u8>>,
        slave: &BTreeMap<(u32, u64), Vec<u8>>,
        confirmed: u64,
    ) -> PartitionAudit {
        let failures = [SendFailure {
            round: 1,
            status: "FLUSH_SLAVE_TIMEOUT".into(),
            phase: Phase::Cut,
        }];
        audit(
            1,
            mode,
            ReplicaAck::Durable,
            LEN,
            acks,
            &failures,
            &Logs {
                master,
                slave: Some(slave),
            },
            &BTreeMap::from([(0, confirmed)]),
            true,
        )
    }

    #[test]
    fn a_clean_sync_master_partition_passes() {
        let acks = [
            ack(1, 0, Phase::BeforeCut, Durability::ReplicaDurable),
            ack(2, 1, Phase::CutGrace, Durability::ReplicaDurable),
            ack(3, 2, Phase::AfterHeal, Durability::ReplicaDurable),
        ];
        let both = log(&[(0, 1), (1, 2), (2, 3)]);
        let a = run(SYNC, &acks, &both, &both);
        assert_eq!(a.verdict, Verdict::Pass, "{}", a.why);
        assert_eq!(
            (a.acked, a.acked_during_cut, a.acked_after_grace),
            (3, 1, 0)
        );
        assert_eq!(a.errors_during_cut.get("FLUSH_SLAVE_TIMEOUT"), Some(&1));
        assert_eq!(a.epochs, [7]);
    }

    #[test]
    fn a_disk_level_ack_during_the_cut_fails_sync_master() {
        // The silent downgrade: the master gave up on the slave and acked from its own disk.
        let acks = [
            ack(1, 0, Phase::BeforeCut, Durability::ReplicaDurable),
            ack(2, 1, Phase::Cut, Durability::Disk),
        ];
        let both = log(&[(0, 1), (1, 2)]);
        let a = run_confirmed(SYNC, &acks, &both, &both, 1);
        assert_eq!(a.verdict, Verdict::Fail);
        assert_eq!(
            (a.downgraded, a.acked_after_grace, a.acked_unconfirmed),
            (1, 1, 1)
        );
        assert!(a.why.contains("silent downgrade"), "{}", a.why);
        // The same acks are fine under ASYNC_MASTER, where the ack never waits for the slave.
        let a = run(ASYNC, &acks, &both, &both);
        assert_eq!(a.verdict, Verdict::Pass, "{}", a.why);
    }

    #[test]
    fn a_replica_level_ack_while_cut_off_fails_sync_master_unless_confirmed_before() {
        let acks = [
            ack(1, 0, Phase::Cut, Durability::ReplicaDurable),
            ack(2, 1, Phase::Cut, Durability::ReplicaDurable),
        ];
        let both = log(&[(0, 1), (1, 2)]);
        let a = run_confirmed(SYNC, &acks, &both, &both, 1);
        assert_eq!(
            (a.verdict, a.downgraded, a.acked_unconfirmed),
            (Verdict::Fail, 0, 1)
        );
        assert!(a.why.contains("cut off"), "{}", a.why);
        // Both confirmed before the cut: late acks, not lies.
        let a = run_confirmed(SYNC, &acks, &both, &both, 2);
        assert_eq!(
            (a.verdict, a.acked_after_grace),
            (Verdict::Pass, 2),
            "{}",
            a.why
        );
    }

    #[test]
    fn a_received_ack_is_a_downgrade_when_durable_was_asked() {
        let acks = [ack(1, 0, Phase::AfterHeal, Durability::ReplicaReceived)];
        let both = log(&[(0, 1)]);
        let a = run(SYNC, &acks, &both, &both);
        assert_eq!((a.verdict, a.downgraded), (Verdict::Fail, 1));
    }

    #[test]
    fn a_message_missing_on_the_slave_or_damaged_or_twice_fails_both_modes() {
        let acks = [
            ack(1, 0, Phase::BeforeCut, Durability::ReplicaDurable),
            ack(2, 1, Phase::AfterHeal, Durability::ReplicaDurable),
        ];
        let master = log(&[(0, 1), (1, 2)]);
        let mut damaged = master.clone();
        damaged.get_mut(&(0, 1)).unwrap()[LEN - 1] ^= 1;
        for mode in [SYNC, ASYNC] {
            let a = run(mode, &acks, &master, &log(&[(0, 1)]));
            assert_eq!(
                (a.verdict, a.lost_slave, a.lost_master),
                (Verdict::Fail, 1, 0)
            );
            let a = run(mode, &acks, &log(&[(1, 2)]), &master);
            assert_eq!((a.verdict, a.lost_master), (Verdict::Fail, 1));
            let a = run(mode, &acks, &master, &damaged);
            assert_eq!((a.verdict, a.damaged), (Verdict::Fail, 1));
            let twice = log(&[(0, 1), (1, 2), (2, 2)]);
            let a = run(mode, &acks, &twice, &master);
            assert_eq!((a.verdict, a.duplicates), (Verdict::Fail, 1));
        }
    }

    #[test]
    fn a_slave_that_never_caught_up_fails() {
        let acks = [ack(1, 0, Phase::BeforeCut, Durability::Disk)];
        let master = log(&[(0, 1)]);
        let a = audit(
            1,
            ASYNC,
            ReplicaAck::Durable,
            LEN,
            &acks,
            &[],
            &Logs {
                master: &master,
                slave: None,
            },
            &BTreeMap::new(),
            false,
        );
        assert_eq!(a.verdict, Verdict::Fail);
        assert!(a.why.contains("did not catch up"), "{}", a.why);
    }

    #[test]
    fn counts_are_per_round_and_presence_is_for_every_round() {
        let mut old = ack(1, 0, Phase::AfterHeal, Durability::ReplicaDurable);
        old.round = 0;
        let acks = [old, ack(2, 1, Phase::BeforeCut, Durability::ReplicaDurable)];
        let without_old = log(&[(1, 2)]);
        let a = run(SYNC, &acks, &without_old, &without_old);
        assert_eq!((a.acked, a.lost_master, a.lost_slave), (1, 1, 1));
    }

    #[test]
    fn phases_split_at_the_cut_the_grace_and_the_heal() {
        let t = Instant::now();
        let c = Cut {
            start: t + Duration::from_millis(10),
            grace_end: t + Duration::from_millis(20),
            heal: t + Duration::from_millis(30),
        };
        let at = |ms| Cut::phase(Some(&c), t + Duration::from_millis(ms));
        assert_eq!(
            [at(0), at(10), at(19), at(20), at(29), at(30)],
            [
                Phase::BeforeCut,
                Phase::CutGrace,
                Phase::CutGrace,
                Phase::Cut,
                Phase::Cut,
                Phase::AfterHeal
            ]
        );
        assert_eq!(Cut::phase(None, t), Phase::BeforeCut);
    }
}
