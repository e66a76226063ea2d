//! A broker group on a real etcd cluster (3 members on 127.0.0.1), brokers as real
//! processes: the master is replaced by its in-sync slave without anyone's help, nothing
//! acked is lost or doubled, a master cut off from etcd stops acking before the slave takes
//! over, and an old master rejoins as a slave.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::process::BrokerProcess;
use common::tcp_proxy::TcpProxy;
use common::{free_port, wait_until};
use ringmq::client::{
    Admin, Consumer, GroupConfig, GroupConsumer, Producer, ProducerConfig, QueueSelector,
};
use ringmq::cluster::etcd::Etcd;
use ringmq::format::batch::Message;
use ringmq::protocol::Durability;

const TOPIC: &str = "orders";
const QUEUES: u32 = 2;
const GROUP: &str = "g1";

/// One drill at a time: each runs 3 etcd members and 2 brokers, and a lease of 2 s should not
/// have to compete with three other drills for 2 cores.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A member of group g1 on core `core`, one shard, etcd at `etcd`.
fn member(dir: &Path, core: usize, port: u16, node: &str, etcd: &str, mode: &str) -> BrokerProcess {
    member_with_metrics(dir, core, port, node, etcd, mode, None)
}

/// [`member`], its metrics endpoint on `127.0.0.1:metrics` if given.
fn member_with_metrics(
    dir: &Path,
    core: usize,
    port: u16,
    node: &str,
    etcd: &str,
    mode: &str,
    metrics: Option<u16>,
) -> BrokerProcess {
    member_of(GROUP, dir, core, port, node, etcd, mode, metrics)
}

/// [`member_with_metrics`] of broker group `group`.
#[allow(clippy::too_many_arguments)]
fn member_of(
    group: &str,
    dir: &Path,
    core: usize,
    port: u16,
    node: &str,
    etcd: &str,
    mode: &str,
    metrics: Option<u16>,
) -> BrokerProcess {
    let cluster = format!("etcd={etcd}");
    let metrics = metrics.map(|p| format!("127.0.0.1:{p}"));
    let mut extra = vec![
        "--cluster",
        &cluster,
        "--group",
        group,
        "--node",
        node,
        "--replication",
        mode,
    ];
    let ttl = lease_ttl_secs();
    extra.extend(["--lease-ttl-secs", &ttl]);
    if let Some(m) = &metrics {
        extra.extend(["--metrics-listen", m]);
    }
    BrokerProcess::start_on_port(dir, &format!("{core},"), port, &extra, &[])
}

/// One sample of a broker's metrics (`name{labels}` as exposed), if it is there.
fn metric(port: u16, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The lease TTL of the drills: 2 s, or `RINGMQ_TEST_LEASE_TTL_SECS` to measure another.
fn lease_ttl_secs() -> String {
    std::env::var("RINGMQ_TEST_LEASE_TTL_SECS").unwrap_or_else(|_| "2".into())
}

/// The in-sync set the master published, as JSON text.
fn in_sync(etcd: &Etcd) -> String {
    etcd.get(&format!("/ringmq/ringmq/groups/{GROUP}/in_sync"))
        .ok()
        .flatten()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default()
}

fn role(addr: &str) -> Option<String> {
    Admin::connect(addr)
        .and_then(|a| a.broker_info())
        .ok()
        .map(|i| i.role)
}

/// Every message of the topic on `addr`, by queue.
fn stored(addr: &str) -> HashMap<u32, Vec<u64>> {
    let consumer = Consumer::connect(addr).unwrap();
    let mut out: HashMap<u32, Vec<u64>> = HashMap::new();
    for (q, _, payload) in common::read_all(&consumer, TOPIC, QUEUES) {
        let n = String::from_utf8(payload).unwrap().parse().unwrap();
        out.entry(q).or_default().push(n);
    }
    out
}

/// Group g1 of two members, ready: a elected, b following, the topic created, b in the
/// in-sync set. With `proxied`, a reaches etcd only through `proxy` (its clients and its
/// slave reach it directly), so a test can cut that one path.
struct Pair {
    etcd: EtcdCluster,
    client: Etcd,
    /// etcd's endpoints, comma-joined.
    endpoints: String,
    tmp: tempfile::TempDir,
    pa: u16,
    pb: u16,
    addr_a: String,
    addr_b: String,
    a: BrokerProcess,
    b: BrokerProcess,
    proxy: Option<TcpProxy>,
    /// a's metrics endpoint (127.0.0.1).
    metrics_a: u16,
}

impl Pair {
    fn start(mode: &str, proxied: bool) -> Option<Pair> {
        let etcd = EtcdCluster::start(3)?;
        let endpoints = etcd.endpoint_list();
        let client = Etcd::new(&etcd.endpoints(), Duration::from_secs(1)).unwrap();
        let proxy = proxied.then(|| TcpProxy::start(&etcd.endpoints()[0]));
        let etcd_of_a = proxy
            .as_ref()
            .map_or(endpoints.clone(), |p| p.addr().to_string());
        let tmp = common::data_dir();
        let (pa, pb) = (free_port(), free_port());
        let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
        let metrics_a = free_port();
        let dir_a = tmp.path().join("a");
        let a = member_with_metrics(&dir_a, 0, pa, "a", &etcd_of_a, mode, Some(metrics_a));
        wait_until("a to be elected", Duration::from_secs(15), || {
            a.log().contains("cluster: master of group g1")
        });
        let b = member(&tmp.path().join("b"), 1, pb, "b", &endpoints, mode);
        Admin::connect(&addr_a)
            .unwrap()
            .create_topic(TOPIC, QUEUES)
            .unwrap();
        wait_until("b in the in-sync set", Duration::from_secs(15), || {
            in_sync(&client).contains("\"b\"")
        });
        Some(Pair {
            etcd,
            client,
            endpoints,
            tmp,
            pa,
            pb,
            addr_a,
            addr_b,
            a,
            b,
            proxy,
            metrics_a,
        })
    }
}

/// One ack as the client heard it.
#[derive(Debug, Clone, Copy)]
struct Ack {
    n: u64,
    epoch: u64,
    at: Instant,
}

#[test]
fn a_killed_master_is_replaced_by_its_in_sync_slave_and_nothing_acked_is_lost() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client,
        endpoints,
        tmp,
        pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy: _proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("sync_master", false)
    else {
        return;
    };
    let old_epoch = Admin::connect(&addr_a)
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;

    // A pipelined producer that knows both brokers, paced so the run spans the failover.
    let mut config = ProducerConfig::new(format!("{addr_a},{addr_b}"));
    config.linger = Duration::from_millis(1);
    let producer = Producer::with_config(config).unwrap();
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    const TOTAL: u64 = 3000;
    let mut killed_at = None;
    let mut a = Some(a);
    // At least TOTAL sends, and on until the kill has fallen inside the run: on a busy machine
    // the first 1000 acks can come after the 3000th send.
    let mut n = 0;
    while n < TOTAL || killed_at.is_none() {
        assert!(n < 10 * TOTAL, "no 1000 acks in {n} sends");
        let (acked, failed) = (acks.clone(), failures.clone());
        producer
            .send_async(
                TOPIC,
                QueueSelector::Queue((n % u64::from(QUEUES)) as u32),
                &Message::new(n.to_string().into_bytes()),
                move |r| match r {
                    Ok(r) => acked.lock().unwrap().push(Ack {
                        n,
                        epoch: r.epoch,
                        at: Instant::now(),
                    }),
                    Err(e) => failed.lock().unwrap().push(format!("{n}: {e}")),
                },
            )
            .unwrap();
        if killed_at.is_none() && acks.lock().unwrap().len() >= 1000 {
            a.take().unwrap().kill9();
            killed_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(500));
        n += 1;
    }
    let sent = n;
    producer.flush();
    wait_until("every send to finish", Duration::from_secs(60), || {
        acks.lock().unwrap().len() + failures.lock().unwrap().len() == sent as usize
    });
    let killed_at = killed_at.expect("the master was killed");
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "sends failed: {failures:?}");
    let acks = acks.lock().unwrap().clone();
    let first_new = acks
        .iter()
        .filter(|a| a.epoch != old_epoch)
        .map(|a| a.at)
        .min()
        .expect("acks from the new master");
    let new_epochs: Vec<u64> = acks
        .iter()
        .map(|a| a.epoch)
        .filter(|e| *e != old_epoch)
        .collect();
    assert!(
        new_epochs.iter().all(|e| *e > old_epoch),
        "a new master acked with an epoch not newer than the old one's {old_epoch}"
    );
    eprintln!(
        "failover: kill -> first ack from the new master {:?} (lease TTL {} s)",
        first_new.saturating_duration_since(killed_at),
        lease_ttl_secs()
    );
    assert_eq!(role(&addr_b).as_deref(), Some("master"));

    // Every acked message exactly once on the new master, each queue in order.
    let s = stored(&addr_b);
    let mut count: HashMap<u64, usize> = HashMap::new();
    for (q, ns) in &s {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "queue {q} is out of order or doubled"
        );
        for n in ns {
            *count.entry(*n).or_default() += 1;
        }
    }
    for ack in &acks {
        assert_eq!(
            count.get(&ack.n).copied().unwrap_or(0),
            1,
            "acked message {} is stored {} time(s) on the new master",
            ack.n,
            count.get(&ack.n).copied().unwrap_or(0)
        );
    }

    // The old master comes back as a slave of the new one and catches up.
    let a = member(&tmp.path().join("a"), 0, pa, "a", &endpoints, "sync_master");
    wait_until("a to rejoin as a slave", Duration::from_secs(20), || {
        role(&addr_a).as_deref() == Some("slave")
    });
    // Its broker answers as a slave before the control thread's line about it is printed
    // (and read from its stderr): wait for the line too.
    let following = format!("as Slave of {addr_b}");
    wait_until("a to say whom it follows", Duration::from_secs(5), || {
        a.log().contains(&following)
    });
    common::wait_caught_up(&Admin::connect(&addr_b).unwrap(), Duration::from_secs(20));

    // What a person sees: b the master, a its slave, a in sync.
    wait_until("a in the in-sync set", Duration::from_secs(15), || {
        in_sync(&client).contains("\"a\"")
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["admin", "cluster", "--etcd", &endpoints])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("group=g1 master=b addr={addr_b}")) && text.contains("in_sync=a"),
        "{text}"
    );
    assert!(
        text.contains(&format!("member=a addr={addr_a} role=slave")),
        "{text}"
    );
    eprintln!("{text}");
    drop(b);
}

#[test]
fn a_master_cut_off_from_etcd_stops_acking_before_its_slave_takes_over() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client: _client,
        endpoints: _endpoints,
        tmp: _tmp,
        pa: _pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("async_master", true)
    else {
        return;
    };
    let proxy = proxy.expect("a proxied pair");
    let epoch_a = Admin::connect(&addr_a)
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;

    // Clients of each broker (no fail-over: each keeps to its broker), one sync send at a
    // time, every ack timed.
    let acks: Arc<Mutex<Vec<(String, Ack)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for (who, addr) in [("a", addr_a.clone()), ("b", addr_b.clone())] {
        let (acks, stop) = (acks.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut config = ProducerConfig::new(addr);
            config.retries = 0;
            config.request_timeout = Duration::from_secs(2);
            let Ok(producer) = Producer::with_config(config) else {
                return;
            };
            let mut n = if who == "a" { 0 } else { 1_000_000 };
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let m = Message::new(n.to_string().into_bytes());
                if let Ok(r) = producer.send(TOPIC, QueueSelector::Queue(0), &m) {
                    let at = Instant::now();
                    acks.lock().unwrap().push((
                        who.to_string(),
                        Ack {
                            n,
                            epoch: r.epoch,
                            at,
                        },
                    ));
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }));
    }
    wait_until("acks from a", Duration::from_secs(10), || {
        acks.lock().unwrap().len() > 50
    });
    let cut_at = Instant::now();
    proxy.cut();
    wait_until("b to take over", Duration::from_secs(20), || {
        acks.lock().unwrap().iter().any(|(w, _)| w == "b")
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    let last_a = acks
        .iter()
        .filter(|(w, _)| w == "a")
        .map(|(_, a)| a.at)
        .max()
        .unwrap();
    let first_b = acks
        .iter()
        .filter(|(w, _)| w == "b")
        .map(|(_, a)| *a)
        .min_by_key(|a| a.at)
        .unwrap();
    eprintln!(
        "partition: a's last ack {:?} after the cut, b's first {:?} after the cut",
        last_a.saturating_duration_since(cut_at),
        first_b.at.saturating_duration_since(cut_at)
    );
    assert!(
        last_a < first_b.at,
        "two masters acked in the same window: a's last ack came {:?} after b's first",
        last_a.saturating_duration_since(first_b.at)
    );
    assert!(
        first_b.epoch > epoch_a,
        "b acked with an epoch not newer than a's"
    );

    // Healed, a learns that b is the master and rejoins as its slave.
    proxy.heal();
    wait_until("a to rejoin as a slave", Duration::from_secs(20), || {
        role(&addr_a).as_deref() == Some("slave")
    });
    assert_eq!(role(&addr_b).as_deref(), Some("master"));
    drop((a, b));
}

/// The in-sync rule: a slave that missed acks may not take over. The slave dies, the master
/// goes on alone (its acks say `disk`, and the published in-sync set names no slave), then
/// the master dies and the stale slave comes back: it stays out of office, and the old
/// master, back, is elected again with every ack.
#[test]
fn a_slave_that_missed_acks_is_never_elected() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client,
        endpoints,
        tmp,
        pa,
        pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy: _proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("sync_master", false)
    else {
        return;
    };

    b.kill9();
    let mut config = ProducerConfig::new(addr_a.clone());
    config.retries = 50;
    let producer = Producer::with_config(config).unwrap();
    for n in 0..100u64 {
        let r = producer
            .send(
                TOPIC,
                QueueSelector::Queue((n % u64::from(QUEUES)) as u32),
                &Message::new(n.to_string().into_bytes()),
            )
            .unwrap_or_else(|e| panic!("message {n} alone on the master: {e}"));
        assert_eq!(
            r.durability,
            ringmq::protocol::Durability::Disk,
            "an ack without a slave must say disk"
        );
    }
    drop(producer);
    assert!(!in_sync(&client).contains("\"b\""), "{}", in_sync(&client));
    a.kill9();

    // The stale slave alone: it must not take over, however long it waits.
    let b = BrokerProcessLater::start(&tmp.path().join("b"), 1, pb, "b", &endpoints);
    std::thread::sleep(Duration::from_secs(6));
    assert_ne!(
        role(&addr_b).as_deref(),
        Some("master"),
        "a slave that missed acks took over"
    );
    let master = client
        .get(&format!("/ringmq/ringmq/groups/{GROUP}/master"))
        .unwrap();
    assert!(master.is_none(), "someone holds the election: {master:?}");

    // The old master comes back alone: elected again, acking alone, and its consumers see
    // everything it acked before (not only what it had saved as confirmed).
    drop(b);
    let a = member(&tmp.path().join("a"), 0, pa, "a", &endpoints, "sync_master");
    wait_until("a to be elected again", Duration::from_secs(20), || {
        role(&addr_a).as_deref() == Some("master")
    });
    let mut seen = 0;
    wait_until(
        "a's consumers to see its acks",
        Duration::from_secs(10),
        || {
            seen = stored(&addr_a).values().map(Vec::len).sum::<usize>();
            seen == 100
        },
    );
    // The slave comes back, follows and catches up.
    let b = member(&tmp.path().join("b"), 1, pb, "b", &endpoints, "sync_master");
    wait_until("b to follow a", Duration::from_secs(20), || {
        role(&addr_b).as_deref() == Some("slave")
    });
    common::wait_caught_up(&Admin::connect(&addr_a).unwrap(), Duration::from_secs(20));
    for addr in [&addr_a, &addr_b] {
        let s = stored(addr);
        let total: usize = s.values().map(Vec::len).sum();
        assert_eq!(total, 100, "{addr} lacks acked messages: {s:?}");
    }
    drop((a, b));
}

/// A member that prints nothing until it is elected or follows someone: started without
/// waiting for its listeners.
struct BrokerProcessLater {
    child: std::process::Child,
}

impl BrokerProcessLater {
    fn start(dir: &Path, core: usize, port: u16, node: &str, etcd: &str) -> BrokerProcessLater {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
            .args([
                "broker",
                "--metrics-listen",
                "off",
                "--segment-bytes",
                "33554432",
            ])
            .args(["--cores", &format!("{core},"), "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(dir)
            .args(["--cluster", &format!("etcd={etcd}"), "--group", GROUP])
            .args(["--node", node, "--replication", "sync_master"])
            .args(["--lease-ttl-secs", &lease_ttl_secs()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn broker");
        common::netns::track_broker(child.id());
        BrokerProcessLater { child }
    }
}

impl Drop for BrokerProcessLater {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What lives in the log moves with an automatic failover: open half messages (ended on
/// the new master by the same transactional producer, which follows the list) and a
/// consumer group's committed offsets (a member joining the new master goes on after them).
#[test]
fn half_messages_and_group_offsets_move_with_the_master() {
    use ringmq::client::{TransactionConfig, TransactionalProducer};
    use ringmq::protocol::TransactionOutcome;
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client: _client,
        endpoints: _endpoints,
        tmp: _tmp,
        pa: _pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy: _proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("sync_master", false)
    else {
        return;
    };
    let both = format!("{addr_a},{addr_b}");

    // 20 halves left open, 40 plain messages, 20 of them consumed and committed.
    let checker: ringmq::client::transaction::Checker = Arc::new(|_| TransactionOutcome::Unknown);
    let tp =
        TransactionalProducer::start(TransactionConfig::new(both.clone(), "pg"), checker).unwrap();
    let halves: Vec<_> = (0..20u64)
        .map(|i| {
            let m = Message::new(format!("tx-{i}").into_bytes());
            tp.send_half(TOPIC, QueueSelector::Queue((i % 2) as u32), &[m])
                .unwrap()
        })
        .collect();
    let producer = Producer::with_config(ProducerConfig::new(both.clone())).unwrap();
    for n in 0..40u64 {
        let m = Message::new(format!("plain-{n}").into_bytes());
        producer
            .send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m)
            .unwrap();
    }
    let mut first_read = Vec::new();
    {
        let group = GroupConsumer::join(&both, GroupConfig::new("cg", &[TOPIC])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while first_read.len() < 20 {
            assert!(
                Instant::now() < deadline,
                "the group read {}",
                first_read.len()
            );
            for m in group.poll(Duration::from_millis(200)).unwrap() {
                group.ack(&m);
                first_read.push(String::from_utf8(m.payload.to_vec()).unwrap());
            }
        }
        group.commit().unwrap();
        group.close().unwrap();
    }
    // The commit is a log record: wait until the slave has it.
    common::wait_caught_up(&Admin::connect(&addr_a).unwrap(), Duration::from_secs(20));

    a.kill9();
    // Ended on the new master: the first ten committed, the rest rolled back.
    for (i, half) in halves.iter().enumerate() {
        let outcome = if i < 10 {
            TransactionOutcome::Commit
        } else {
            TransactionOutcome::Rollback
        };
        tp.end(half, outcome)
            .unwrap_or_else(|e| panic!("ending half {i} after the failover: {e}"));
    }
    assert_eq!(role(&addr_b).as_deref(), Some("master"));

    // A member of the same group on the new master reads on after the committed offsets.
    let group = GroupConsumer::join(&both, GroupConfig::new("cg", &[TOPIC])).unwrap();
    let mut second_read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while second_read.len() < 30 && Instant::now() < deadline {
        for m in group.poll(Duration::from_millis(200)).unwrap() {
            group.ack(&m);
            second_read.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for m in group.poll(Duration::from_millis(200)).unwrap() {
        second_read.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    let mut all: Vec<String> = first_read.iter().chain(&second_read).cloned().collect();
    all.sort();
    let mut expected: Vec<String> = (0..40)
        .map(|n| format!("plain-{n}"))
        .chain((0..10).map(|i| format!("tx-{i}")))
        .collect();
    expected.sort();
    assert_eq!(
        all, expected,
        "after the failover the group read again or missed (first {first_read:?}, then \
         {second_read:?})"
    );
    drop(group);
    drop(b);
}

/// Under SYNC_MASTER a master cut off from etcd acks nothing its slave lacks; the slave takes
/// over and writes on; the old master, healed, rejoins as a slave, dropping only its tail
/// that was never acked, and ends up with the new master's log exactly.
#[test]
fn a_sync_master_cut_off_from_etcd_rejoins_with_only_its_unacked_tail_dropped() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client: _client,
        endpoints: _endpoints,
        tmp: _tmp,
        pa: _pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("sync_master", true)
    else {
        return;
    };
    let proxy = proxy.expect("a proxied pair");

    // One client per broker, each keeping to its broker; every ack remembered.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for (base, addr) in [(0u64, addr_a.clone()), (1_000_000, addr_b.clone())] {
        let (acked, stop) = (acked.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut config = ProducerConfig::new(addr);
            config.retries = 0;
            config.request_timeout = Duration::from_secs(2);
            let Ok(producer) = Producer::with_config(config) else {
                return;
            };
            let mut n = base;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let m = Message::new(n.to_string().into_bytes());
                match producer.send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m) {
                    Ok(_) => acked.lock().unwrap().push(n),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    wait_until("acks from a", Duration::from_secs(10), || {
        acked.lock().unwrap().len() > 50
    });
    proxy.cut();
    wait_until("b to take over and ack", Duration::from_secs(20), || {
        acked.lock().unwrap().iter().any(|n| *n > 1_000_000)
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }

    // Every ack, from either master, once on the new master.
    let on_b = stored(&addr_b);
    let mut count: HashMap<u64, usize> = HashMap::new();
    for ns in on_b.values() {
        for n in ns {
            *count.entry(*n).or_default() += 1;
        }
    }
    let acked = acked.lock().unwrap().clone();
    for n in &acked {
        assert_eq!(
            count.get(n),
            Some(&1),
            "acked message {n} on the new master"
        );
    }

    // Healed: a rejoins as b's slave and holds exactly b's log.
    proxy.heal();
    wait_until("a to rejoin as a slave", Duration::from_secs(20), || {
        role(&addr_a).as_deref() == Some("slave")
    });
    common::wait_caught_up(&Admin::connect(&addr_b).unwrap(), Duration::from_secs(20));
    let (on_a, on_b) = (stored(&addr_a), stored(&addr_b));
    assert_eq!(
        on_a, on_b,
        "the old master's queues differ from the new master's"
    );
    eprintln!(
        "acked {} ({} by the new master); the new master holds {}",
        acked.len(),
        acked.iter().filter(|n| **n > 1_000_000).count(),
        on_b.values().map(Vec::len).sum::<usize>()
    );
    drop((a, b));
}

/// A consumer-group member that stays joined across an automatic failover goes on by itself
/// at the new master, after the offsets it had committed: nothing lost, nothing committed
/// read again.
#[test]
fn a_group_member_stays_joined_across_an_automatic_failover() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client: _client,
        endpoints: _endpoints,
        tmp: _tmp,
        pa: _pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy: _proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("sync_master", false)
    else {
        return;
    };
    let both = format!("{addr_a},{addr_b}");
    let producer = Producer::with_config(ProducerConfig::new(both.clone())).unwrap();
    let send = |range: std::ops::Range<u64>| {
        for n in range {
            let m = Message::new(n.to_string().into_bytes());
            producer
                .send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m)
                .unwrap_or_else(|e| panic!("message {n}: {e}"));
        }
    };
    send(0..40);
    let group = GroupConsumer::join(&both, GroupConfig::new("cg", &[TOPIC])).unwrap();
    let mut before = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while before.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "read {} before the kill",
            before.len()
        );
        for m in group.poll(Duration::from_millis(200)).unwrap_or_default() {
            group.ack(&m);
            before.push(
                String::from_utf8(m.payload.to_vec())
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
    }
    group.commit().unwrap();
    common::wait_caught_up(&Admin::connect(&addr_a).unwrap(), Duration::from_secs(20));

    a.kill9();
    // Sent straight to the new master, so only the member has a failover to follow.
    wait_until("b to take over", Duration::from_secs(20), || {
        role(&addr_b).as_deref() == Some("master")
    });
    let mut config = ProducerConfig::new(addr_b.clone());
    config.retries = 50;
    let on_b = Producer::with_config(config).unwrap();
    for n in 40..60u64 {
        let m = Message::new(n.to_string().into_bytes());
        on_b.send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m)
            .unwrap_or_else(|e| panic!("message {n} to the new master: {e}"));
    }
    let mut after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while after.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "the member read {after:?} after the failover"
        );
        // Errors while the group elects a new master are the member's to ride out.
        for m in group.poll(Duration::from_millis(200)).unwrap_or_default() {
            group.ack(&m);
            after.push(
                String::from_utf8(m.payload.to_vec())
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
    }
    after.sort();
    assert_eq!(
        after,
        (40..60).collect::<Vec<u64>>(),
        "after the failover the member read committed messages again or missed some"
    );
    drop(group);
    drop(b);
}

/// etcd losing one member changes nothing; etcd losing its quorum stops no SYNC_MASTER: no
/// election can happen without etcd, and every ack of a master whose lease lapsed still waits
/// for its in-sync slave, which would stop confirming before it could take over. The master
/// says so (log line, `ringmq_cluster_etcd_reachable`, `ringmq_cluster_lease_state`) and its
/// lease holds again once the quorum is back, with no failover on the way.
#[test]
fn etcd_losing_a_member_or_its_quorum_stops_no_sync_master() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(180));
    let Some(Pair {
        mut etcd,
        client: _client,
        endpoints: _endpoints,
        tmp: _tmp,
        pa: _pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy: _proxy,
        metrics_a,
    }) = Pair::start("sync_master", false)
    else {
        return;
    };
    let ttl = Duration::from_secs(lease_ttl_secs().parse().unwrap());
    let epoch_a = Admin::connect(&addr_a)
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    let lease = |state: &str| {
        metric(
            metrics_a,
            &format!("ringmq_cluster_lease_state{{shard=\"0\",state=\"{state}\"}}"),
        )
    };
    let reachable = || metric(metrics_a, "ringmq_cluster_etcd_reachable{shard=\"0\"}");
    wait_until(
        "a's lease held in its metrics",
        Duration::from_secs(10),
        || lease("held") == Some(1.0),
    );
    assert_eq!(reachable(), Some(1.0));

    // One producer that knows both brokers, one send at a time; every ack remembered.
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Acks that did not say the slave had the batch.
    let alone: Arc<Mutex<Vec<String>>> = Arc::default();
    let sender = {
        let (acks, failures, stop) = (acks.clone(), failures.clone(), stop.clone());
        let alone = alone.clone();
        let producer =
            Producer::with_config(ProducerConfig::new(format!("{addr_a},{addr_b}"))).unwrap();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let m = Message::new(n.to_string().into_bytes());
                match producer.send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m) {
                    Ok(r) => {
                        if !matches!(
                            r.durability,
                            Durability::ReplicaReceived | Durability::ReplicaDurable
                        ) {
                            alone
                                .lock()
                                .unwrap()
                                .push(format!("{n}: {:?}", r.durability));
                        }
                        acks.lock().unwrap().push(Ack {
                            n,
                            epoch: r.epoch,
                            at: Instant::now(),
                        })
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{n}: {e}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let acked = || acks.lock().unwrap().len();
    // Acks keep coming for `span`: at least `min` of them, the last one recent.
    let acks_go_on = |what: &str, span: Duration| {
        let before = acked();
        std::thread::sleep(span);
        let during = acked() - before;
        let last = acks.lock().unwrap().last().map(|a| a.at.elapsed());
        eprintln!("{what}: {during} acks in {span:?}");
        assert!(
            during >= 20 && last.is_some_and(|l| l < Duration::from_secs(1)),
            "{what}: acks stopped ({during} in {span:?}, the last {last:?} ago; failures {:?})",
            failures.lock().unwrap()
        );
    };
    let no_failover = |what: &str| {
        assert_eq!(role(&addr_a).as_deref(), Some("master"), "{what}: a's role");
        assert_eq!(role(&addr_b).as_deref(), Some("slave"), "{what}: b's role");
    };
    wait_until("first acks", Duration::from_secs(10), || acked() > 20);

    // One member down: nothing changes.
    etcd.kill(2);
    acks_go_on("one etcd member down", ttl * 3);
    no_failover("one etcd member down");

    // Quorum lost: a's lease lapses, and it says so, but it goes on acking with b.
    etcd.kill(1);
    wait_until("a's lease to lapse", ttl * 5, || {
        lease("lapsed") == Some(1.0)
    });
    assert_eq!(reachable(), Some(0.0), "etcd reachable without a quorum");
    acks_go_on("etcd without a quorum", ttl * 3);
    no_failover("etcd without a quorum");
    wait_until("a to log its lapse", Duration::from_secs(5), || {
        a.log()
            .contains("acks go on only as the in-sync slave confirms them")
    });

    // Quorum back: the lease holds again, no election happened.
    etcd.restart(1);
    etcd.restart(2);
    wait_until("a's lease to hold again", ttl * 10, || {
        lease("held") == Some(1.0)
    });
    assert_eq!(reachable(), Some(1.0));
    acks_go_on("quorum back", ttl * 2);
    no_failover("quorum back");
    stop.store(true, std::sync::atomic::Ordering::Release);
    sender.join().unwrap();

    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "sends failed: {failures:?}");
    let alone = alone.lock().unwrap().clone();
    assert!(
        alone.is_empty(),
        "acks without the slave (a went solo: {}): {alone:?}",
        a.log().contains("no slave is in sync")
    );
    let acks = acks.lock().unwrap().clone();
    assert!(
        acks.iter().all(|x| x.epoch == epoch_a),
        "an ack from another epoch than a's {epoch_a}: a failover happened"
    );
    common::wait_caught_up(&Admin::connect(&addr_a).unwrap(), Duration::from_secs(20));
    let (on_a, on_b) = (stored(&addr_a), stored(&addr_b));
    let mut count: HashMap<u64, usize> = HashMap::new();
    for n in on_a.values().flatten() {
        *count.entry(*n).or_default() += 1;
    }
    for x in &acks {
        assert_eq!(count.get(&x.n), Some(&1), "acked message {} on a", x.n);
    }
    assert_eq!(on_a, on_b, "the slave's queues differ from the master's");
    drop((a, b));
}

/// A scheduled retry and a dead letter move with an automatic failover: both are records in
/// the log the slave replicated, so the same group member, following the failover by itself,
/// gets the retry from the new master when it is due (not before, and nothing it committed),
/// and the new master's `%DLQ%` topic holds exactly the dead message.
#[test]
fn retries_and_dead_letters_move_with_an_automatic_failover() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let Some(Pair {
        etcd: _etcd,
        client: _client,
        endpoints: _endpoints,
        tmp: _tmp,
        pa: _pa,
        pb: _pb,
        addr_a,
        addr_b,
        a,
        b,
        proxy: _proxy,
        metrics_a: _metrics_a,
    }) = Pair::start("sync_master", false)
    else {
        return;
    };
    const GROUP_NAME: &str = "rg";
    const LEVEL2_MS: u64 = 5_000;
    Admin::connect(&addr_a)
        .unwrap()
        .create_group(GROUP_NAME, 1, 0)
        .unwrap();
    let both = format!("{addr_a},{addr_b}");
    let producer = Producer::with_config(ProducerConfig::new(both.clone())).unwrap();
    for n in 0..20u64 {
        let m = Message::new(n.to_string().into_bytes());
        producer
            .send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m)
            .unwrap_or_else(|e| panic!("message {n}: {e}"));
    }
    let number = |m: &ringmq::client::GroupMessage| -> u64 {
        String::from_utf8(m.payload.to_vec())
            .unwrap()
            .parse()
            .unwrap()
    };
    // n % 5 == 1: retry at level 2 (due after the failover); n % 5 == 2: level 1, then dead.
    let group = GroupConsumer::join(&both, GroupConfig::new(GROUP_NAME, &[TOPIC])).unwrap();
    let mut firsts = 0;
    let mut dead = Vec::new();
    let mut scheduled_at = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while firsts < 20 || dead.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "before the kill: {firsts} read, dead {dead:?}"
        );
        for m in group.poll(Duration::from_millis(200)).unwrap_or_default() {
            let n = number(&m);
            if m.reconsume_times > 0 {
                assert_eq!(n % 5, 2, "a retry of {n} before the kill");
                let sent = group.nack(&m, 1, "second failure").unwrap();
                assert!(sent.topic.starts_with("%DLQ%"), "{sent:?}");
                dead.push(n);
                continue;
            }
            firsts += 1;
            match n % 5 {
                1 => {
                    scheduled_at.insert(n, Instant::now());
                    group.nack(&m, 2, "later").unwrap();
                }
                2 => {
                    group.nack(&m, 1, "first failure").unwrap();
                }
                _ => group.ack(&m),
            }
        }
    }
    group.commit().unwrap();
    common::wait_caught_up(&Admin::connect(&addr_a).unwrap(), Duration::from_secs(20));

    a.kill9();
    // The member rides out the election and gets each scheduled retry once, when due.
    let mut retried = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while retried.len() < scheduled_at.len() {
        assert!(
            Instant::now() < deadline,
            "after the failover the member got only the retries {retried:?} of {:?}",
            scheduled_at.keys()
        );
        for m in group.poll(Duration::from_millis(200)).unwrap_or_default() {
            let n = number(&m);
            assert_eq!(
                m.reconsume_times, 1,
                "after the failover: {n} again, not as a retry (committed before the kill)"
            );
            let due = scheduled_at[&n] + Duration::from_millis(LEVEL2_MS);
            assert!(
                Instant::now() + Duration::from_millis(200) >= due,
                "retry of {n} delivered {:?} early",
                due - Instant::now()
            );
            group.ack(&m);
            retried.push(n);
        }
    }
    assert_eq!(role(&addr_b).as_deref(), Some("master"), "b took over");
    // Nothing more comes.
    let more = group.poll(Duration::from_millis(1500)).unwrap_or_default();
    assert!(
        more.is_empty(),
        "after the retries: {:?}",
        more.iter().map(number).collect::<Vec<_>>()
    );
    group.commit().unwrap();
    retried.sort();
    let mut expected: Vec<u64> = scheduled_at.keys().copied().collect();
    expected.sort();
    assert_eq!(retried, expected, "each scheduled retry once");

    let admin = Admin::connect(&addr_b).unwrap();
    let consumer = Consumer::connect(&addr_b).unwrap();
    let dlq = format!("%DLQ%{GROUP_NAME}");
    let mut on_b: Vec<u64> = Vec::new();
    for s in admin.queue_stats(&dlq).unwrap() {
        let f = consumer
            .fetch(&dlq, s.queue, s.min_offset, Duration::ZERO)
            .unwrap();
        on_b.extend(f.messages.iter().map(|m| {
            String::from_utf8(m.payload.to_vec())
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }));
    }
    on_b.sort();
    dead.sort();
    assert_eq!(on_b, dead, "the new master's dead-letter queue");
    drop(group);
    drop(b);
}

/// Three broker groups on one etcd: the masters of two are SIGKILLed at once (a small failover
/// storm); each of those fails over to its own slave with every ack kept, and the third group
/// goes on acking with the master it has, untouched. No group's keys or clients meet
/// another's.
#[test]
fn three_groups_on_one_etcd_fail_over_independently() {
    let _serial = one_at_a_time();
    let _watchdog = common::watchdog(Duration::from_secs(180));
    let Some(etcd) = EtcdCluster::start(3) else {
        return;
    };
    let endpoints = etcd.endpoint_list();
    let client = Etcd::new(&etcd.endpoints(), Duration::from_secs(1)).unwrap();
    let tmp = common::data_dir();
    const GROUPS: [&str; 3] = ["ga", "gb", "gc"];
    struct Group {
        name: &'static str,
        addr_a: String,
        addr_b: String,
        a: Option<BrokerProcess>,
        /// Kept running until the end.
        _b: BrokerProcess,
        epoch_a: u64,
    }
    let mut groups = Vec::new();
    for name in GROUPS {
        let (pa, pb) = (free_port(), free_port());
        let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
        let dir = tmp.path().join(name);
        let a = member_of(
            name,
            &dir.join("a"),
            0,
            pa,
            "a",
            &endpoints,
            "sync_master",
            None,
        );
        wait_until(
            &format!("a of {name} to be elected"),
            Duration::from_secs(20),
            || {
                a.log()
                    .contains(&format!("cluster: master of group {name}"))
            },
        );
        Admin::connect(&addr_a)
            .unwrap()
            .create_topic(TOPIC, QUEUES)
            .unwrap();
        let b = member_of(
            name,
            &dir.join("b"),
            1,
            pb,
            "b",
            &endpoints,
            "sync_master",
            None,
        );
        let key = format!("/ringmq/ringmq/groups/{name}/in_sync");
        wait_until(
            &format!("b in {name}'s in-sync set"),
            Duration::from_secs(20),
            || {
                client
                    .get(&key)
                    .ok()
                    .flatten()
                    .is_some_and(|kv| String::from_utf8_lossy(&kv.value).contains("\"b\""))
            },
        );
        let epoch_a = Admin::connect(&addr_a)
            .unwrap()
            .broker_info()
            .unwrap()
            .epoch;
        groups.push(Group {
            name,
            addr_a,
            addr_b,
            a: Some(a),
            _b: b,
            epoch_a,
        });
    }

    // One producer per group, given its group's two brokers; every ack remembered.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acks: Vec<Arc<Mutex<Vec<Ack>>>> = GROUPS.iter().map(|_| Arc::default()).collect();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut senders = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let (stop, acks, failures) = (stop.clone(), acks[g].clone(), failures.clone());
        let brokers = format!("{},{}", group.addr_a, group.addr_b);
        let name = group.name;
        senders.push(std::thread::spawn(move || {
            let producer = Producer::with_config(ProducerConfig::new(brokers)).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let m = Message::new(n.to_string().into_bytes());
                match producer.send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m) {
                    Ok(r) => acks.lock().unwrap().push(Ack {
                        n,
                        epoch: r.epoch,
                        at: Instant::now(),
                    }),
                    Err(e) => failures.lock().unwrap().push(format!("{name} {n}: {e}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    wait_until("acks in every group", Duration::from_secs(10), || {
        acks.iter().all(|a| a.lock().unwrap().len() > 20)
    });

    // The storm: ga's and gb's masters die together.
    let killed_at = Instant::now();
    for group in &mut groups[..2] {
        group.a.take().unwrap().kill9();
    }
    for (g, group) in groups[..2].iter().enumerate() {
        let epoch_a = group.epoch_a;
        wait_until(
            &format!("{}'s new master to ack", group.name),
            Duration::from_secs(30),
            || acks[g].lock().unwrap().iter().any(|x| x.epoch != epoch_a),
        );
    }
    let recovered_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in senders {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "sends failed: {failures:?}");

    for (g, group) in groups.iter().enumerate() {
        let acks = acks[g].lock().unwrap().clone();
        let (master, killed) = if g < 2 {
            (&group.addr_b, true)
        } else {
            (&group.addr_a, false)
        };
        assert_eq!(
            role(master).as_deref(),
            Some("master"),
            "{}'s master",
            group.name
        );
        if killed {
            let first = acks.iter().find(|x| x.epoch != group.epoch_a).unwrap();
            eprintln!(
                "{}: kill -> first ack from the new master {:?}",
                group.name,
                first.at - killed_at
            );
        } else {
            assert!(
                acks.iter().all(|x| x.epoch == group.epoch_a),
                "{} changed master although its master was not killed",
                group.name
            );
            let during = acks
                .iter()
                .filter(|x| x.at > killed_at && x.at < recovered_at)
                .count();
            assert!(
                during > 0,
                "{} stopped acking while the other groups failed over",
                group.name
            );
        }
        // Every ack once on the group's master, and nothing of another group there.
        let mut count: HashMap<u64, usize> = HashMap::new();
        for n in stored(master).values().flatten() {
            *count.entry(*n).or_default() += 1;
        }
        for x in &acks {
            assert_eq!(
                count.get(&x.n),
                Some(&1),
                "{}: acked message {}",
                group.name,
                x.n
            );
        }
        let top = acks.iter().map(|x| x.n).max().unwrap_or(0);
        assert!(
            count.keys().all(|n| *n <= top),
            "{} holds messages it was never sent",
            group.name
        );
    }
    // Each group's master key names its own node and nobody else's.
    let masters = client
        .get_prefix("/ringmq/ringmq/groups/")
        .unwrap()
        .into_iter()
        .filter(|kv| kv.key.ends_with("/master"))
        .count();
    assert_eq!(masters, 3, "one master key per group");
    drop(groups);
}
