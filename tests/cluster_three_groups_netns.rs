//! Three broker groups × two brokers, each broker on a host of its own, on one 3-member etcd
//! cluster: seven network namespaces on one switch (`common::netns::Hosts`, loopback-range
//! addresses only). Host 0 runs etcd and every client; hosts 1 to 6 run the brokers, a
//! group's two on two hosts.
//!
//! The drill: a producer per group, given its group's two brokers, runs from start to end.
//! The masters of g1 and g2 are SIGKILLed together; each group's slave takes over by itself
//! while g3 goes on acking with the master it has. The killed brokers come back as slaves.
//! Then g3's master has its cable pulled (cut off from etcd, its slave and the clients): it
//! stops acking, its slave takes over, and once plugged in again it rejoins as a slave. In
//! every group no ack of an older master comes after one of a newer, and every acked message
//! is on the group's master once (and on its slave, which has the same queues). A cluster
//! topic spread over the three groups has a producer of its own through all of it, given
//! every broker: each of its acks is once on the master of the group that serves its queue,
//! and no other group stored any of that queue.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::netns::{in_ns, Hosts, NsBroker};
use ringmq::client::{Admin, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::cluster::etcd::Etcd;
use ringmq::cluster::records::MasterRecord;
use ringmq::format::batch::Message;
use ringmq::protocol::BrokerInfo;

/// The groups; group `g` runs on hosts `2g + 1` (node a) and `2g + 2` (node b).
const GROUPS: [&str; 3] = ["g1", "g2", "g3"];
/// The host of etcd and of every client.
const CLIENT_HOST: usize = 0;
const HOSTS: usize = 1 + 2 * GROUPS.len();
const QUEUES: u32 = 2;
/// The cluster topic: its queues spread over the three groups (queue q to GROUPS[q % 3]).
const SPREAD_TOPIC: &str = "spread";
const SPREAD_QUEUES: u32 = 6;
const LEASE_TTL_SECS: &str = "2";
/// Generous bounds for a 2-core machine running 6 brokers and 3 etcd members.
const ELECTION_WITHIN: Duration = Duration::from_secs(20);
const FAILOVER_WITHIN: Duration = Duration::from_secs(30);
const REJOIN_WITHIN: Duration = Duration::from_secs(30);
/// How long one produce waits for its ack before the producer gives the connection up: short,
/// so a producer notices a master that went silent (a pulled cable) within the drill.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// The pace of each group's pipelined producer.
const SEND_EVERY: Duration = Duration::from_millis(3);
/// The master-local client's message numbers start here (the group's producer counts from 1).
const LOCAL_BASE: u64 = 1_000_000;
/// Host 0's sync client's message numbers start here.
const FOLLOWER_BASE: u64 = 2_000_000;

/// One ack as a client heard it.
#[derive(Debug, Clone, Copy)]
struct Ack {
    n: u64,
    epoch: u64,
    at: Instant,
}

type Acks = Arc<Mutex<Vec<Ack>>>;

/// A broker of a group: where it runs and, while it runs, its process.
struct Member {
    node: &'static str,
    host: usize,
    /// `host_ip:10911`.
    addr: String,
    dir: PathBuf,
    /// `--cores`: a group's two brokers on different cores when there are two.
    cores: &'static str,
    broker: Option<NsBroker>,
}

struct Group {
    name: &'static str,
    topic: String,
    a: Member,
    b: Member,
    /// Every ack any client of the group heard.
    acks: Acks,
    /// The first master's epoch.
    first_epoch: u64,
}

impl Group {
    fn brokers(&self) -> String {
        format!("{},{}", self.a.addr, self.b.addr)
    }

    fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first ack of an epoch other than `epoch`, if any came.
    fn first_ack_not_of(&self, epoch: u64) -> Option<Ack> {
        self.acks()
            .into_iter()
            .filter(|x| x.epoch != epoch)
            .min_by_key(|x| x.at)
    }
}

/// etcd as the brokers and the test reach it.
struct EtcdAccess {
    ns: String,
    endpoints: Vec<String>,
}

impl EtcdAccess {
    /// The value of `key`, read from host 0; None if absent or etcd did not answer.
    fn get(&self, key: &str) -> Option<(String, u64)> {
        let (endpoints, key) = (self.endpoints.clone(), key.to_string());
        in_ns(&self.ns, move || {
            let etcd = Etcd::new(&endpoints, Duration::from_secs(1)).ok()?;
            let kv = etcd.get(&key).ok().flatten()?;
            Some((
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.create_revision,
            ))
        })
    }

    fn in_sync(&self, group: &str) -> String {
        self.get(&format!("/ringmq/ringmq/groups/{group}/in_sync"))
            .map(|(v, _)| v)
            .unwrap_or_default()
    }

    /// The node holding `group`'s election key and the key's create revision (its term).
    fn master(&self, group: &str) -> Option<(String, u64)> {
        let (value, revision) = self.get(&format!("/ringmq/ringmq/groups/{group}/master"))?;
        let record: MasterRecord = serde_json::from_str(&value).ok()?;
        Some((record.node, revision))
    }
}

fn start_member(net: &Hosts, group: &str, m: &mut Member, etcd: &str) {
    let cluster = format!("etcd={etcd}");
    #[rustfmt::skip]
    let flags = [
        "--cluster", &cluster, "--group", group, "--node", m.node,
        "--replication", "sync_master", "--lease-ttl-secs", LEASE_TTL_SECS,
    ];
    let broker =
        NsBroker::start_on_cores(net.ns(m.host), net.addr(m.host), &m.dir, m.cores, &flags);
    assert_eq!(broker.addr(), m.addr, "{group} {}'s address", m.node);
    m.broker = Some(broker);
}

/// What the broker at `addr` says of itself, asked from namespace `ns`.
fn info(ns: &str, addr: &str) -> Option<BrokerInfo> {
    let addr = addr.to_string();
    in_ns(ns, move || {
        Admin::connect(&addr).and_then(|a| a.broker_info()).ok()
    })
}

fn role(ns: &str, addr: &str) -> Option<String> {
    info(ns, addr).map(|i| i.role)
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every message of `topic` at `addr` (read from `ns`): how many times each number is there.
fn stored(ns: &str, addr: &str, topic: &str, queues: u32) -> Result<HashMap<u64, usize>, String> {
    let (addr, topic) = (addr.to_string(), topic.to_string());
    in_ns(ns, move || {
        let consumer = Consumer::connect(&addr).map_err(|e| format!("consumer of {addr}: {e}"))?;
        let mut out = HashMap::new();
        for (q, offset, payload) in common::read_all(&consumer, &topic, queues) {
            let n: u64 = String::from_utf8_lossy(&payload)
                .parse()
                .map_err(|e| format!("{topic} queue {q} offset {offset} on {addr}: {e}"))?;
            *out.entry(n).or_default() += 1;
        }
        Ok(out)
    })
}

/// A pipelined producer from host 0 to the `queues` of `topic`, given `brokers` (a group's
/// two, so it follows a failover by itself; or every broker, for the cluster topic), sending
/// numbers 1, 2, ... (to queue n % queues) until `stop`; every ack into `acks`, every failure
/// into `failures`. It flushes before it ends.
#[allow(clippy::too_many_arguments)]
fn producer(
    net: &Hosts,
    name: &'static str,
    topic: &str,
    queues: u32,
    brokers: String,
    acks: &Acks,
    stop: &Arc<AtomicBool>,
    failures: &Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    let ns = net.ns(CLIENT_HOST).to_string();
    let (stop, acks, failures) = (stop.clone(), acks.clone(), failures.clone());
    let topic = topic.to_string();
    std::thread::spawn(move || {
        in_ns(&ns, move || {
            let mut config = ProducerConfig::new(brokers);
            config.linger = Duration::from_millis(1);
            config.request_timeout = REQUEST_TIMEOUT;
            config.failover_timeout = FAILOVER_WITHIN;
            let producer = match Producer::with_config(config) {
                Ok(p) => p,
                Err(e) => {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{name}: no producer: {e}"));
                    return;
                }
            };
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let (acks, failed) = (acks.clone(), failures.clone());
                let sent = producer.send_async(
                    &topic,
                    QueueSelector::Queue((n % u64::from(queues)) as u32),
                    &Message::new(n.to_string().into_bytes()),
                    move |r| match r {
                        Ok(r) => acks.lock().unwrap().push(Ack {
                            n,
                            epoch: r.epoch,
                            at: Instant::now(),
                        }),
                        Err(e) => failed.lock().unwrap().push(format!("{name} {n}: {e}")),
                    },
                );
                if let Err(e) = sent {
                    failures.lock().unwrap().push(format!("{name} {n}: {e}"));
                }
                std::thread::sleep(SEND_EVERY);
            }
            producer.flush();
        })
    })
}

/// A client that sends one message at a time to `topic`, numbers from `base` + 1, until
/// `stop`; its acks go into `mine` and the group's `all` (they must be kept).
///
/// With `follow` it is given the group's two brokers and follows a failover by itself (the
/// client of host 0); without, it keeps to the one broker it is given and does not retry (the
/// client on a master's own host: it hears whatever that master acks while cut off).
#[allow(clippy::too_many_arguments)]
fn sync_client(
    ns: &str,
    brokers: String,
    follow: bool,
    topic: &str,
    base: u64,
    stop: &Arc<AtomicBool>,
    mine: &Acks,
    all: &Acks,
) -> JoinHandle<()> {
    let (ns, topic) = (ns.to_string(), topic.to_string());
    let (stop, mine, all) = (stop.clone(), mine.clone(), all.clone());
    std::thread::spawn(move || {
        in_ns(&ns, move || {
            let mut config = ProducerConfig::new(brokers);
            if follow {
                config.request_timeout = REQUEST_TIMEOUT;
                config.failover_timeout = FAILOVER_WITHIN;
            } else {
                config.retries = 0;
                config.request_timeout = Duration::from_secs(2);
            }
            let mut producer = None;
            let mut n = base;
            while !stop.load(Ordering::Acquire) {
                if producer.is_none() {
                    producer = Producer::with_config(config.clone()).ok();
                }
                let Some(p) = &producer else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                n += 1;
                let m = Message::new(n.to_string().into_bytes());
                match p.send(&topic, QueueSelector::Queue((n % 2) as u32), &m) {
                    Ok(r) => {
                        let ack = Ack {
                            n,
                            epoch: r.epoch,
                            at: Instant::now(),
                        };
                        mine.lock().unwrap().push(ack);
                        all.lock().unwrap().push(ack);
                    }
                    // Not acked: it may or may not be stored; only acks are checked.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    })
}

/// No two masters of `group` acked in the same window: in the order the acks were heard,
/// epochs never go back. Prints each epoch's window relative to `t0`.
fn assert_one_master_at_a_time(group: &str, acks: &[Ack], t0: Instant) {
    let mut windows: BTreeMap<u64, (Instant, Instant, usize)> = BTreeMap::new();
    for x in acks {
        let w = windows.entry(x.epoch).or_insert((x.at, x.at, 0));
        w.0 = w.0.min(x.at);
        w.1 = w.1.max(x.at);
        w.2 += 1;
    }
    for (epoch, (first, last, count)) in &windows {
        eprintln!(
            "{group}: epoch {epoch}: {count} acks from {:?} to {:?}",
            first.saturating_duration_since(t0),
            last.saturating_duration_since(t0)
        );
    }
    let windows: Vec<_> = windows.into_iter().collect();
    for pair in windows.windows(2) {
        let ((older, (_, older_last, _)), (newer, (newer_first, _, _))) = (pair[0], pair[1]);
        assert!(
            older_last < newer_first,
            "{group}: two masters acked in the same window: epoch {older}'s last ack came \
             {:?} after epoch {newer}'s first",
            older_last.saturating_duration_since(newer_first)
        );
    }
}

#[test]
fn three_groups_on_seven_hosts_fail_over_on_kills_and_on_a_partition_without_two_masters() {
    let _watchdog = common::watchdog(Duration::from_secs(240));
    let Some(net) = Hosts::create(HOSTS) else {
        return;
    };
    let Some(etcd) = EtcdCluster::start_in(net.ns(CLIENT_HOST), net.addr(CLIENT_HOST), 3) else {
        return;
    };
    let t0 = Instant::now();
    let etcd_list = etcd.endpoint_list();
    let kv = EtcdAccess {
        ns: net.ns(CLIENT_HOST).to_string(),
        endpoints: etcd.endpoints(),
    };
    let client_ns = net.ns(CLIENT_HOST).to_string();
    let tmp = common::data_dir();
    let second_core = if common::available_cores() >= 2 {
        "1,"
    } else {
        "1"
    };
    let mut groups: Vec<Group> = GROUPS
        .iter()
        .enumerate()
        .map(|(g, &name)| {
            let member = |node: &'static str, host: usize, cores: &'static str| Member {
                node,
                host,
                addr: format!("{}:{}", net.addr(host), common::netns::BROKER_PORT),
                dir: tmp.path().join(name).join(node),
                cores,
                broker: None,
            };
            Group {
                name,
                topic: format!("orders-{name}"),
                a: member("a", 2 * g + 1, "1"),
                b: member("b", 2 * g + 2, second_core),
                acks: Arc::default(),
                first_epoch: 0,
            }
        })
        .collect();

    // 1. Every group's a is elected (alone at first), gets its topic, then b follows it.
    for group in &mut groups {
        start_member(&net, group.name, &mut group.a, &etcd_list);
    }
    for group in &mut groups {
        wait_until(
            &format!("{}'s a to be the master", group.name),
            ELECTION_WITHIN,
            || role(&client_ns, &group.a.addr).as_deref() == Some("master"),
        );
        let (addr, topic) = (group.a.addr.clone(), group.topic.clone());
        in_ns(&client_ns, move || {
            Admin::connect(&addr)
                .and_then(|a| a.create_topic(&topic, QUEUES))
                .unwrap_or_else(|e| panic!("create {topic} on {addr}: {e}"))
        });
        group.first_epoch = info(&client_ns, &group.a.addr)
            .unwrap_or_else(|| panic!("{}'s a answers", group.name))
            .epoch;
    }
    for group in &mut groups {
        start_member(&net, group.name, &mut group.b, &etcd_list);
    }
    for group in &groups {
        wait_until(
            &format!("b in {}'s in-sync set", group.name),
            ELECTION_WITHIN,
            || kv.in_sync(group.name).contains("\"b\""),
        );
    }
    // The cluster topic, created through etcd from host 0: each group's master creates it.
    let (bin, endpoints) = (env!("CARGO_BIN_EXE_ringmq"), etcd_list.clone());
    let out = in_ns(&client_ns, move || {
        std::process::Command::new(bin)
            .args([
                "admin",
                "cluster",
                "--etcd",
                &endpoints,
                "topic-create",
                SPREAD_TOPIC,
            ])
            .args([
                "--queues",
                &SPREAD_QUEUES.to_string(),
                "--groups",
                &GROUPS.join(","),
            ])
            .output()
    })
    .expect("ringmq admin cluster topic-create runs");
    assert!(
        out.status.success(),
        "topic-create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let g3_term = kv.master("g3").expect("g3 has a master key");
    assert_eq!(g3_term.0, "a", "g3's master key");
    eprintln!("three groups ready after {:?}", t0.elapsed());

    // 2. A producer per group from host 0; g1's and g2's masters die together.
    let stops: Vec<Arc<AtomicBool>> = groups.iter().map(|_| Arc::default()).collect();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut producers: Vec<Option<JoinHandle<()>>> = groups
        .iter()
        .zip(&stops)
        .map(|(g, stop)| {
            let brokers = g.brokers();
            Some(producer(
                &net, g.name, &g.topic, QUEUES, brokers, &g.acks, stop, &failures,
            ))
        })
        .collect();
    // And one to the cluster topic, given every broker: its queues go to all three groups.
    let every_broker: Vec<String> = groups.iter().map(|g| g.brokers()).collect();
    let spread_acks: Acks = Arc::default();
    let spread_stop: Arc<AtomicBool> = Arc::default();
    let spread_producer = producer(
        &net,
        "spread",
        SPREAD_TOPIC,
        SPREAD_QUEUES,
        every_broker.join(","),
        &spread_acks,
        &spread_stop,
        &failures,
    );
    wait_until("200 acks in every group", ELECTION_WITHIN, || {
        groups.iter().all(|g| g.acks().len() >= 200)
    });
    let storm_at = Instant::now();
    let mut killed_at = Vec::new();
    for group in &mut groups[..2] {
        let master = group.a.broker.take().expect("a runs");
        killed_at.push(Instant::now());
        master.kill9();
    }
    let mut failover_times = Vec::new();
    for (group, killed) in groups[..2].iter().zip(&killed_at) {
        let mut first = None;
        wait_until(
            &format!("{}'s new master to ack", group.name),
            FAILOVER_WITHIN,
            || {
                first = group.first_ack_not_of(group.first_epoch);
                first.is_some()
            },
        );
        let first = first.expect("waited for it");
        assert!(
            first.epoch > group.first_epoch,
            "{}: the new master's epoch {} is not above the old one's {}",
            group.name,
            first.epoch,
            group.first_epoch
        );
        let took = first.at.saturating_duration_since(*killed);
        eprintln!(
            "{}: SIGKILL of the master -> first ack from the new master {took:?} \
             (lease TTL {LEASE_TTL_SECS} s)",
            group.name
        );
        failover_times.push(took);
    }
    let recovered_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    for group in &groups[..2] {
        assert_eq!(
            role(&client_ns, &group.b.addr).as_deref(),
            Some("master"),
            "{}'s b took over",
            group.name
        );
        assert_eq!(
            kv.master(group.name).map(|m| m.0).as_deref(),
            Some("b"),
            "{}'s master key",
            group.name
        );
    }
    // g3 was not touched: same master, same term, same epoch, and it acked all along.
    let g3 = &groups[2];
    assert_eq!(role(&client_ns, &g3.a.addr).as_deref(), Some("master"));
    assert_eq!(kv.master("g3"), Some(g3_term.clone()), "g3's master key");
    let g3_acks = g3.acks();
    assert!(
        g3_acks.iter().all(|x| x.epoch == g3.first_epoch),
        "g3 changed master although its master was not killed"
    );
    let during = g3_acks
        .iter()
        .filter(|x| x.at > storm_at && x.at < recovered_at)
        .count();
    assert!(during > 0, "g3 stopped acking while g1 and g2 failed over");
    eprintln!(
        "g3: {during} acks while g1 and g2 failed over ({:?})",
        recovered_at - storm_at
    );

    // The killed brokers come back as slaves of the new masters.
    for group in &mut groups[..2] {
        start_member(&net, group.name, &mut group.a, &etcd_list);
    }
    for group in &groups[..2] {
        wait_until(
            &format!("{}'s a to follow b", group.name),
            REJOIN_WITHIN,
            || {
                info(&client_ns, &group.a.addr)
                    .is_some_and(|i| i.role == "slave" && i.master_address == group.b.addr)
            },
        );
    }

    // 3. g3's master has its cable pulled: off etcd, its slave and host 0. g3's pipelined
    // producer goes on through it (its writes to the silent master block once the socket
    // buffers are full, until its request timeout closes the connection; then it fails
    // over); two sync clients join it: one on host 0 given both brokers, one on the master's
    // own host keeping to it. The master must stop acking before b's first ack.
    let g3 = &groups[2];
    let (ns_a3, host_a3) = (net.ns(g3.a.host).to_string(), g3.a.host);
    wait_until("b in g3's in-sync set", ELECTION_WITHIN, || {
        kv.in_sync("g3").contains("\"b\"")
    });
    let sync_stop = Arc::new(AtomicBool::new(false));
    let (local_acks, follower_acks): (Acks, Acks) = Default::default();
    let local = sync_client(
        &ns_a3,
        g3.a.addr.clone(),
        false,
        &g3.topic,
        LOCAL_BASE,
        &sync_stop,
        &local_acks,
        &g3.acks,
    );
    let follower = sync_client(
        &client_ns,
        g3.brokers(),
        true,
        &g3.topic,
        FOLLOWER_BASE,
        &sync_stop,
        &follower_acks,
        &g3.acks,
    );
    let clients = [local, follower];
    wait_until("acks to both of g3's sync clients", ELECTION_WITHIN, || {
        local_acks.lock().unwrap().len() >= 20 && follower_acks.lock().unwrap().len() >= 20
    });
    let cut_at = Instant::now();
    net.cut(host_a3);
    let mut first_new = None;
    wait_until("g3's b to take over", FAILOVER_WITHIN, || {
        first_new = g3.first_ack_not_of(g3.first_epoch);
        first_new.is_some()
    });
    let first_new = first_new.expect("waited for it");
    wait_until(
        "g3's pipelined producer to follow b",
        FAILOVER_WITHIN,
        || {
            g3.acks()
                .iter()
                .any(|x| x.n < LOCAL_BASE && x.epoch != g3.first_epoch)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    sync_stop.store(true, Ordering::Release);
    for c in clients {
        c.join().expect("a sync client ends without a panic");
    }
    let last_local = local_acks
        .lock()
        .unwrap()
        .iter()
        .map(|x| x.at)
        .max()
        .expect("the local client had acks");
    let partition_took = first_new.at.saturating_duration_since(cut_at);
    eprintln!(
        "g3: cable pulled -> the old master's last ack {:?} after the cut, the new master's \
         first {partition_took:?} after it",
        last_local.saturating_duration_since(cut_at)
    );
    assert!(
        last_local < first_new.at,
        "g3: the cut-off master acked {:?} after the new master's first ack",
        last_local.saturating_duration_since(first_new.at)
    );
    assert!(
        first_new.epoch > g3.first_epoch,
        "g3: the new master's epoch is not above the old one's"
    );
    // Cut off, a keeps its role (its lease lapsed: it acks only as its in-sync slave confirms,
    // and that slave is gone); plugged in again, it sees b's key and follows b.
    net.heal(host_a3);
    wait_until("g3's a to rejoin as b's slave", REJOIN_WITHIN, || {
        info(&client_ns, &g3.a.addr)
            .is_some_and(|i| i.role == "slave" && i.master_address == g3.b.addr)
    });
    assert_eq!(kv.master("g3").map(|m| m.0).as_deref(), Some("b"));

    // The end: every producer flushes; every ack once on its group's master, whose slave
    // holds the same; no ack of an old master after one of a new.
    for (stop, p) in stops.iter().zip(&mut producers) {
        stop.store(true, Ordering::Release);
        if let Some(p) = p.take() {
            p.join().expect("a producer ends without a panic");
        }
    }
    spread_stop.store(true, Ordering::Release);
    spread_producer
        .join()
        .expect("the cluster topic's producer ends without a panic");
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "sends failed: {failures:?}");
    for group in &groups {
        let acks = group.acks();
        assert_one_master_at_a_time(group.name, &acks, t0);
        let epochs: std::collections::BTreeSet<u64> = acks.iter().map(|x| x.epoch).collect();
        assert_eq!(epochs.len(), 2, "{}: acks of two masters", group.name);
        let (master, slave) = (&group.b.addr, &group.a.addr);
        let admin = {
            let addr = master.clone();
            in_ns(&client_ns, move || Admin::connect(&addr))
                .unwrap_or_else(|e| panic!("{}'s master {master}: {e}", group.name))
        };
        common::wait_caught_up(&admin, REJOIN_WITHIN);
        let topics = admin
            .list_topics()
            .unwrap_or_else(|e| panic!("{}'s topics: {e}", group.name));
        let ours: Vec<&str> = topics
            .iter()
            .map(|t| t.name.as_str())
            .filter(|t| t.starts_with("orders-"))
            .collect();
        assert_eq!(ours, [group.topic.as_str()], "{}'s topics", group.name);
        let on_master =
            stored(&client_ns, master, &group.topic, QUEUES).unwrap_or_else(|e| panic!("{e}"));
        for x in &acks {
            assert_eq!(
                on_master.get(&x.n),
                Some(&1),
                "{}: acked message {} (epoch {}) on the master {master}",
                group.name,
                x.n,
                x.epoch
            );
        }
        let on_slave =
            stored(&client_ns, slave, &group.topic, QUEUES).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            on_slave == on_master,
            "{}: the slave {slave} holds {} messages, the master {master} {}",
            group.name,
            on_slave.len(),
            on_master.len()
        );
        eprintln!(
            "{}: {} acks, all on the master once; {} messages on master and slave",
            group.name,
            acks.len(),
            on_master.len()
        );
    }
    // The cluster topic: each queue on the master of the group that serves it, nowhere else,
    // and every ack there once (read through any broker: the routes lead to each master).
    let spread = spread_acks.lock().unwrap().clone();
    let on_masters = stored(&client_ns, &groups[0].a.addr, SPREAD_TOPIC, SPREAD_QUEUES)
        .unwrap_or_else(|e| panic!("{e}"));
    for x in &spread {
        assert_eq!(
            on_masters.get(&x.n),
            Some(&1),
            "cluster topic: acked message {} (epoch {})",
            x.n,
            x.epoch
        );
    }
    for (g, group) in groups.iter().enumerate() {
        let addr = group.b.addr.clone();
        let ends = in_ns(&client_ns, move || {
            Admin::connect(&addr).and_then(|a| a.queue_stats(SPREAD_TOPIC))
        })
        .unwrap_or_else(|e| panic!("{}'s queue stats: {e}", group.name));
        for s in ends {
            let served = s.queue as usize % GROUPS.len() == g;
            assert!(
                served || s.end_offset == 0,
                "{} stored {} message(s) in queue {} of the cluster topic, served by {}",
                group.name,
                s.end_offset,
                s.queue,
                GROUPS[s.queue as usize % GROUPS.len()]
            );
        }
    }
    eprintln!(
        "cluster topic: {} acks over {SPREAD_QUEUES} queues of three groups, all once on the \
         masters that serve them",
        spread.len()
    );
    eprintln!(
        "failover after SIGKILL: g1 {:?}, g2 {:?}; after the partition: g3 {partition_took:?}; \
         drill took {:?}",
        failover_times[0],
        failover_times[1],
        t0.elapsed()
    );
    drop(groups);
    drop(etcd);
}
