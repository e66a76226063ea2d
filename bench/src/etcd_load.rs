//! `ringmq-bench etcd-load`: the etcd traffic of N broker groups, without the brokers.
//!
//! For `docs/scale.md`: how much etcd work one broker group costs and where a cluster of many
//! groups breaks first. Each simulated member does exactly what a member's control thread and
//! lease thread do (`src/cluster/node.rs`), with the same client (`cluster::etcd::Etcd`):
//!
//! - a watch on the group's master key (the broker's own `Watcher` thread); every 100 ms
//!   (the control tick) read that key when the rule of `Node::master_key_due` says so: the
//!   watch saw a change, no watch is open, or no master holds the key; else once a second;
//! - every 500 ms (the publish interval): put its member record (a real `MemberRecord`'s size)
//!   under its lease when `member_record_due` says so (its standing changed, no master, or
//!   the refresh, under half the TTL, is due); the master also reads the members (prefix), and writes the in-sync set
//!   guarded by its election key when it changes (never, in steady state) and every
//!   `IN_SYNC_REFRESH` (10 s);
//! - every TTL/4: renew its lease (a thread of its own, as in the broker);
//! - the route follower of `cluster::routes`: a prefix watch on the cluster's `routes/` and a
//!   read of that prefix when `routes::ReadRule` says so (a change, at most once a second,
//!   else every 10 s); a master
//!   writes its route (a guarded txn) once per term, so the storm's new masters wake every
//!   member's route watch.
//!
//! Member 0 of every group creates the election key first. After `--duration-secs` of steady
//! load, a **failover storm**: every master revokes its lease at once (as if all masters died
//! and their leases expired together), and every slave, seeing no master key on its next
//! tick, campaigns (`create_if_absent`, as `campaign` does); the storm ends when every group
//! has a new master.
//!
//! Reported per group count: operations per second by kind (and what the members wanted),
//! latency p50/p99/max, errors, *lapses* (a gap between two confirmed renewals longer than the
//! ack window, 3/4 TTL: a real master would have stopped acking), etcd's CPU (the drill's own
//! members only), and the storm's duration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use ringmq::cluster::etcd::Etcd;
use ringmq::cluster::node::{
    master_key_due, member_record_due, member_refresh, IN_SYNC_REFRESH, WATCHED_READ_INTERVAL,
};
use ringmq::cluster::records::{master_route_key, routes_prefix};
use ringmq::cluster::records::{unix_ms, GroupKeys, MemberRecord};
use ringmq::cluster::routes::{ReadRule, CHECK_INTERVAL as ROUTES_CHECK_INTERVAL};
use ringmq::cluster::watcher::Watcher;

use crate::drill_failover::EtcdCluster;

const TICK: Duration = Duration::from_millis(100);
const PUBLISH: Duration = Duration::from_millis(500);
/// How long the storm may take before the run gives up on it.
const STORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Before the measured window: the start-up wave of route writes and reads (see `one_run`).
const WARMUP: Duration = Duration::from_secs(3);

#[derive(Debug, Args)]
pub struct EtcdLoadArgs {
    /// Broker group counts to simulate in turn (2 members each), comma-separated.
    #[arg(long, default_value = "10,50,100", value_delimiter = ',')]
    pub groups: Vec<usize>,
    /// Steady load per group count, before the storm.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 3)]
    pub lease_ttl_secs: u64,
    /// Use this etcd (`HOST:PORT,...`) instead of starting a 3-member one on loopback (etcd's
    /// CPU is then not measured).
    #[arg(long)]
    pub etcd: Option<String>,
    /// The etcd members' data dirs go here (a real disk: etcd fsyncs every write).
    #[arg(long, default_value = ".")]
    pub data_root: std::path::PathBuf,
}

/// The kinds of calls a member makes.
#[derive(Clone, Copy)]
enum Op {
    GetMaster,
    PutMember,
    GetMembers,
    PutInSync,
    KeepAlive,
    GetRoutes,
    PutRoute,
    Campaign,
}

const OPS: [(&str, Op); 8] = [
    ("get master key", Op::GetMaster),
    ("put member record", Op::PutMember),
    ("get members (master)", Op::GetMembers),
    ("put in-sync (master, txn)", Op::PutInSync),
    ("lease keep-alive", Op::KeepAlive),
    ("get routes (prefix)", Op::GetRoutes),
    ("put master route (txn)", Op::PutRoute),
    ("campaign (storm, txn)", Op::Campaign),
];
/// The steady-state rows of the table: every kind but the campaign.
const STEADY_OPS: usize = OPS.len() - 1;

/// Latencies and errors of one kind of call.
struct Tally {
    hist: Histogram<u64>,
    errors: u64,
}

#[derive(Clone)]
struct Stats(Arc<Mutex<Vec<Tally>>>);

impl Stats {
    fn new() -> Stats {
        Stats(Arc::new(Mutex::new(
            OPS.iter()
                .map(|_| Tally {
                    hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                    errors: 0,
                })
                .collect(),
        )))
    }

    fn time<T, E>(&self, op: Op, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let start = Instant::now();
        let r = f();
        let us = start.elapsed().as_micros().max(1) as u64;
        let mut t = self.0.lock().unwrap();
        let tally = &mut t[op as usize];
        match &r {
            Ok(_) => {
                let _ = tally.hist.record(us.min(60_000_000));
            }
            Err(_) => tally.errors += 1,
        }
        r
    }
}

pub fn run(args: EtcdLoadArgs) -> Result<(), String> {
    if args.groups.is_empty() || args.groups.contains(&0) {
        return Err("--groups needs counts of at least 1".into());
    }
    if args.lease_ttl_secs == 0 || args.duration_secs == 0 {
        return Err("--lease-ttl-secs and --duration-secs must be at least 1".into());
    }
    let own = match &args.etcd {
        Some(_) => None,
        None => {
            let dir = args
                .data_root
                .join(format!(".ringmq-etcd-load-{}", std::process::id()));
            match EtcdCluster::start(&dir, 3) {
                Ok(cluster) => Some((cluster, dir)),
                Err(e) => {
                    // Its members are stopped (dropped); their data and logs go too.
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            }
        }
    };
    let endpoints = match (&args.etcd, &own) {
        (Some(list), _) => Etcd::parse_endpoints(list),
        (None, Some((cluster, _))) => cluster.endpoints.clone(),
        (None, None) => unreachable!("one of the two is set"),
    };
    eprintln!(
        "etcd-load: etcd {}, lease TTL {} s, {} s per group count",
        endpoints.join(","),
        args.lease_ttl_secs,
        args.duration_secs
    );
    let mut out = String::new();
    for &groups in &args.groups {
        let pids = own.as_ref().map(|(c, _)| c.pids()).unwrap_or_default();
        let report = one_run(&args, &endpoints, groups, &pids)?;
        eprintln!("{groups} groups: done");
        out.push_str(&report);
        out.push('\n');
    }
    if let Some((cluster, dir)) = own {
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    }
    println!("{out}");
    Ok(())
}

fn one_run(
    args: &EtcdLoadArgs,
    endpoints: &[String],
    groups: usize,
    etcd_pids: &[u32],
) -> Result<String, String> {
    let ttl = Duration::from_secs(args.lease_ttl_secs);
    let cluster = format!("load-{}-{groups}", std::process::id());
    let stats = Stats::new();
    let stop_steady = Arc::new(AtomicBool::new(false));
    let stop_all = Arc::new(AtomicBool::new(false));
    let lapses = Arc::new(Mutex::new(0u64));
    let new_masters = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let ready = Arc::new(Barrier::new(2 * groups + 1));
    let mut threads = Vec::new();
    for g in 0..groups {
        for m in 0..2 {
            let group = format!("g{g}");
            let keys = GroupKeys::new(&cluster, &group);
            let cluster = cluster.clone();
            let endpoints = endpoints.to_vec();
            let (stats, stop_steady, stop_all, lapses, new_masters, ready) = (
                stats.clone(),
                stop_steady.clone(),
                stop_all.clone(),
                lapses.clone(),
                new_masters.clone(),
                ready.clone(),
            );
            threads.push(std::thread::spawn(move || {
                member(
                    &endpoints,
                    (&cluster, &group),
                    keys,
                    m == 0,
                    ttl,
                    Shared {
                        stats,
                        stop_steady,
                        stop_all,
                        lapses,
                        new_masters,
                        ready,
                    },
                )
            }));
        }
    }
    ready.wait();
    // Every master writes its route as it starts, and every member's route watch fires on
    // each: a wave that is over before the measured window (counts start after it; latencies
    // include it).
    std::thread::sleep(WARMUP);
    let counted_before: Vec<u64> = stats
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|x| x.hist.len())
        .collect();
    let cpu_before = cpu_seconds(etcd_pids);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(args.duration_secs));
    let steady = started.elapsed();
    let cpu = cpu_seconds(etcd_pids) - cpu_before;
    let steady_stats: Vec<(u64, u64, u64, u64, u64)> = {
        let t = stats.0.lock().unwrap();
        t.iter()
            .zip(&counted_before)
            .map(|(x, before)| {
                (
                    x.hist.len() - before,
                    x.hist.value_at_quantile(0.5),
                    x.hist.value_at_quantile(0.99),
                    x.hist.max(),
                    x.errors,
                )
            })
            .collect()
    };
    let lapsed = *lapses.lock().unwrap();
    // The storm: every master gives up its lease at once.
    let storm_at = Instant::now();
    stop_steady.store(true, Ordering::Release);
    let deadline = storm_at + STORM_TIMEOUT;
    while new_masters.lock().unwrap().len() < groups && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let elected = new_masters.lock().unwrap().clone();
    stop_all.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    let (campaign, storm_route_reads) = {
        let t = stats.0.lock().unwrap();
        let c = &t[Op::Campaign as usize];
        let reads = t[Op::GetRoutes as usize].hist.len()
            - counted_before[Op::GetRoutes as usize]
            - steady_stats[Op::GetRoutes as usize].0;
        (
            (c.hist.len(), c.hist.value_at_quantile(0.99), c.errors),
            reads,
        )
    };

    let secs = steady.as_secs_f64();
    let members = 2 * groups;
    let wanted = |op: Op| -> f64 {
        let per = |every: Duration| 1.0 / every.as_secs_f64();
        match op {
            // Once a second with a watch and a master (the steady state).
            Op::GetMaster => members as f64 * per(WATCHED_READ_INTERVAL),
            // Nothing of a member's standing changes in steady state: the refresh only.
            Op::PutMember => members as f64 * per(member_refresh(ttl)),
            Op::GetMembers => groups as f64 * per(PUBLISH),
            Op::PutInSync => groups as f64 * per(IN_SYNC_REFRESH),
            Op::KeepAlive => members as f64 * per(ttl / 4),
            // Behind the watch, the check read; the routes do not change in steady state.
            Op::GetRoutes => members as f64 * per(ROUTES_CHECK_INTERVAL),
            Op::PutRoute | Op::Campaign => 0.0,
        }
    };
    let mut out = format!(
        "### {groups} groups ({members} members), {:.1} s steady\n\n\
         | call | wanted/s | done/s | p50 | p99 | max | errors |\n|---|---:|---:|---:|---:|---:|---:|\n",
        secs
    );
    let mut total = 0.0;
    for (i, (name, op)) in OPS.iter().enumerate().take(STEADY_OPS) {
        let (n, p50, p99, max, errors) = steady_stats[i];
        total += n as f64 / secs;
        out.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {} | {} | {} | {errors} |\n",
            wanted(*op),
            n as f64 / secs,
            ms(p50),
            ms(p99),
            ms(max)
        ));
    }
    let storm = match elected.iter().max() {
        Some(last) if elected.len() == groups => {
            format!(
                "{:.0} ms",
                last.duration_since(storm_at).as_secs_f64() * 1e3
            )
        }
        _ => format!(
            "incomplete: {} of {groups} groups elected within {STORM_TIMEOUT:?}",
            elected.len()
        ),
    };
    out.push_str(&format!(
        "\ncalls/s in all: {total:.0}; lapses (renewal gap > 3/4 TTL): {lapsed}; etcd CPU: {}; \
         storm (every master gone at once): all {groups} groups re-elected in {storm} ({} \
         campaigns, p99 {}, {} errors; {storm_route_reads} route reads after it began, {:.1} \
         per member)\n",
        if etcd_pids.is_empty() {
            "not measured".to_string()
        } else {
            format!("{:.2} cores", cpu / secs)
        },
        campaign.0,
        ms(campaign.1),
        campaign.2,
        storm_route_reads as f64 / members as f64
    ));
    Ok(out)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

struct Shared {
    stats: Stats,
    stop_steady: Arc<AtomicBool>,
    stop_all: Arc<AtomicBool>,
    lapses: Arc<Mutex<u64>>,
    new_masters: Arc<Mutex<Vec<Instant>>>,
    ready: Arc<Barrier>,
}

/// One simulated member of `(cluster, group)` until `stop_all`; the master gives up at
/// `stop_steady`.
fn member(
    endpoints: &[String],
    (cluster, group): (&str, &str),
    keys: GroupKeys,
    first: bool,
    ttl: Duration,
    s: Shared,
) {
    let node = if first { "a" } else { "b" };
    let timeout = (ttl / 5).max(Duration::from_millis(200));
    let setup = Etcd::new(endpoints, timeout)
        .map_err(|e| e.to_string())
        .and_then(|etcd| {
            let lease = etcd.grant_lease(ttl.as_secs()).map_err(|e| e.to_string())?;
            Ok((etcd, lease))
        });
    let Ok((etcd, lease)) = setup else {
        eprintln!("etcd-load: a member could not start: {:?}", setup.err());
        s.ready.wait();
        return;
    };
    let etcd = Arc::new(etcd);
    let mut term = 0;
    if first {
        let value = format!("{{\"node\":\"{node}\",\"addr\":\"127.0.0.1:10911\"}}");
        if let Ok(Ok(kv)) = etcd.create_if_absent(&keys.master(), value.as_bytes(), Some(lease)) {
            term = kv.create_revision;
        }
    }
    // The lease thread.
    let renewing = Arc::new(AtomicBool::new(true));
    let renewer = {
        let (etcd, stats, renewing, lapses) = (
            etcd.clone(),
            s.stats.clone(),
            renewing.clone(),
            s.lapses.clone(),
        );
        std::thread::spawn(move || {
            let mut last_ok = Instant::now();
            while renewing.load(Ordering::Acquire) {
                let sent = Instant::now();
                if let Ok(Some(_)) = stats.time(Op::KeepAlive, || etcd.keep_alive(lease)) {
                    if sent.duration_since(last_ok) > ttl.mul_f64(0.75) {
                        *lapses.lock().unwrap() += 1;
                    }
                    last_ok = sent;
                }
                let next = sent + ttl / 4;
                while renewing.load(Ordering::Acquire) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        })
    };
    s.ready.wait();
    let record = |role: &str| MemberRecord {
        node: node.into(),
        addr: "127.0.0.1:10911".into(),
        role: role.into(),
        epoch: 1 << 48,
        log_end: 1 << 40,
        following: (role == "slave").then(|| "127.0.0.1:10921".to_string()),
        streaming: true,
        lag_bytes: 0,
        lag_ms: 0,
        updated_unix_ms: unix_ms(),
    };
    let mut last_publish = Instant::now() - PUBLISH;
    let mut master = first && term != 0;
    let mut gave_up = false;
    let watch = Watcher::start(etcd.clone(), keys.master()).expect("a watch thread");
    // The route follower of `cluster::routes`, and the master's route, written once per term.
    let routes = Watcher::start_prefix(etcd.clone(), routes_prefix(cluster)).expect("a watch");
    let mut route_rule = ReadRule::default();
    let mut route_written = 0;
    let put_route = |term: u64| {
        let value =
            format!("{{\"node\":\"{node}\",\"shards\":[\"127.0.0.1:10911\"],\"term\":{term}}}");
        s.stats.time(Op::PutRoute, || {
            etcd.put_if_guard(
                &keys.master(),
                term,
                &master_route_key(cluster, group),
                value.as_bytes(),
                Some(lease),
            )
        })
    };
    let mut last_read: Option<Instant> = None;
    let mut masterless = false;
    let mut last_in_sync: Option<Instant> = None;
    let mut member_written: Option<(MemberRecord, Instant)> = None;
    while !s.stop_all.load(Ordering::Acquire) {
        let tick = Instant::now();
        if master && !gave_up && s.stop_steady.load(Ordering::Acquire) {
            // The storm: this master is gone (its lease revoked deletes its keys).
            renewing.store(false, Ordering::Release);
            let _ = etcd.revoke_lease(lease);
            gave_up = true;
            master = false;
        }
        if gave_up {
            std::thread::sleep(TICK);
            continue;
        }
        let due = master_key_due(&watch, masterless, last_read);
        // Not due: masterless was false, and stays so.
        let current = due.then(|| {
            last_read = Some(Instant::now());
            s.stats.time(Op::GetMaster, || etcd.get(&keys.master()))
        });
        masterless = matches!(current, Some(Ok(None)));
        if masterless && !master && s.stop_steady.load(Ordering::Acquire) {
            let value = format!("{{\"node\":\"{node}\",\"addr\":\"127.0.0.1:10921\"}}");
            if let Ok(Ok(kv)) = s.stats.time(Op::Campaign, || {
                etcd.create_if_absent(&keys.master(), value.as_bytes(), Some(lease))
            }) {
                s.new_masters.lock().unwrap().push(Instant::now());
                master = true;
                term = kv.create_revision;
            }
        }
        if master && route_written != term && matches!(put_route(term), Ok(true)) {
            route_written = term;
        }
        if route_rule.due(&routes) {
            let read = s
                .stats
                .time(Op::GetRoutes, || etcd.get_prefix(&routes_prefix(cluster)));
            route_rule.read_done(read.is_ok());
        }
        if last_publish.elapsed() >= PUBLISH {
            last_publish = Instant::now();
            let role = if master { "master" } else { "slave" };
            let next = record(role);
            let last = member_written.as_ref().map(|(r, at)| (r, *at));
            if member_record_due(last, &next, masterless, member_refresh(ttl)) {
                let value = serde_json::to_vec(&next).expect("a record serializes");
                let put = s.stats.time(Op::PutMember, || {
                    etcd.put(&keys.member(node), &value, Some(lease))
                });
                if put.is_ok() {
                    member_written = Some((next, Instant::now()));
                }
            }
            if master && !s.stop_steady.load(Ordering::Acquire) {
                let _ = s
                    .stats
                    .time(Op::GetMembers, || etcd.get_prefix(&keys.members()));
                // The set does not change in steady state: written at the refresh only.
                if last_in_sync.map_or(true, |t| t.elapsed() >= IN_SYNC_REFRESH) {
                    last_in_sync = Some(Instant::now());
                    let in_sync = format!(
                        "{{\"master\":\"{node}\",\"term\":{term},\"nodes\":[\"b\"],\"updated_unix_ms\":{}}}",
                        unix_ms()
                    );
                    let _ = s.stats.time(Op::PutInSync, || {
                        etcd.put_if_guard(
                            &keys.master(),
                            term,
                            &keys.in_sync(),
                            in_sync.as_bytes(),
                            None,
                        )
                    });
                }
            }
        }
        if let Some(rest) = TICK.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    renewing.store(false, Ordering::Release);
    let _ = renewer.join();
    if !gave_up {
        let _ = etcd.revoke_lease(lease);
    }
}

/// User + system CPU seconds of these processes so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces) end with ')'.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / hz)
        })
        .sum()
}
