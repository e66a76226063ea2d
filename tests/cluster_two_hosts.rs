//! A broker group on two hosts (network namespaces joined by a veth pair, loopback-range
//! addresses only): host A runs a 3-member etcd cluster and broker a, host B runs broker b
//! and the clients. SIGKILL of the master, then a partition of the new master from etcd and
//! from its old master: each time the other broker takes over, no two masters ack in the
//! same window, and every acked message is on the master once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::netns::{in_ns, NsBroker, TwoHosts};
use ringmq::client::{Admin, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::cluster::etcd::Etcd;
use ringmq::format::batch::Message;

const TOPIC: &str = "orders";

/// Every ack a client heard: (message number, epoch, when).
type Acks = Arc<Mutex<Vec<(u64, u64, Instant)>>>;
const QUEUES: u32 = 2;

fn member_flags(etcd: &str, node: &str) -> Vec<String> {
    [
        "--cluster",
        &format!("etcd={etcd}"),
        "--group",
        "g1",
        "--node",
        node,
        "--replication",
        "sync_master",
        "--lease-ttl-secs",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(ns: &str, host: &str, dir: &std::path::Path, etcd: &str, node: &str) -> NsBroker {
    let flags = member_flags(etcd, node);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    NsBroker::start(ns, host, dir, &flags)
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `addr`'s role, asked from namespace `ns`.
fn role(ns: &str, addr: &str) -> Option<String> {
    let addr = addr.to_string();
    in_ns(ns, move || {
        Admin::connect(&addr)
            .and_then(|a| a.broker_info())
            .ok()
            .map(|i| i.role)
    })
}

fn in_sync(ns: &str, endpoints: &[String]) -> String {
    let endpoints = endpoints.to_vec();
    in_ns(ns, move || {
        let etcd = Etcd::new(&endpoints, Duration::from_secs(1)).unwrap();
        etcd.get("/ringmq/ringmq/groups/g1/in_sync")
            .ok()
            .flatten()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default()
    })
}

/// Every message of the topic at `addr` (asked from `ns`), counted.
fn stored(ns: &str, addr: &str) -> HashMap<u64, usize> {
    let addr = addr.to_string();
    in_ns(ns, move || {
        let consumer = Consumer::connect(&addr).unwrap();
        let mut out = HashMap::new();
        for (_, _, payload) in common::read_all(&consumer, TOPIC, QUEUES) {
            let n: u64 = String::from_utf8(payload).unwrap().parse().unwrap();
            *out.entry(n).or_default() += 1;
        }
        out
    })
}

/// One client per host, each keeping to its own host's broker, sending one message at a
/// time from numbers `base..`; every ack as (number, epoch, when).
fn clients(
    hosts: [(String, String, u64); 2],
    stop: &Arc<AtomicBool>,
    acks: &Acks,
) -> Vec<std::thread::JoinHandle<()>> {
    hosts
        .into_iter()
        .map(|(ns, addr, base)| {
            let (stop, acks) = (stop.clone(), acks.clone());
            std::thread::spawn(move || {
                in_ns(&ns, move || {
                    let mut config = ProducerConfig::new(addr);
                    config.retries = 0;
                    config.request_timeout = Duration::from_secs(2);
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
                        match p.send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m) {
                            Ok(r) => acks.lock().unwrap().push((n, r.epoch, Instant::now())),
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                })
            })
        })
        .collect()
}

#[test]
fn a_group_on_two_hosts_fails_over_on_a_kill_and_on_a_partition_without_two_masters() {
    let _watchdog = common::watchdog(Duration::from_secs(150));
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let Some(etcd) = EtcdCluster::start_in(net.ns_a(), net.addr_a(), 3) else {
        return;
    };
    let (ns_a, ns_b) = (net.ns_a().to_string(), net.ns_b().to_string());
    let endpoints = etcd.endpoints();
    let list = etcd.endpoint_list();
    let dir = common::data_dir();
    let a = start(&ns_a, net.addr_a(), &dir.path().join("a"), &list, "a");
    let b = start(&ns_b, net.addr_b(), &dir.path().join("b"), &list, "b");
    let (addr_a, addr_b) = (a.addr().to_string(), b.addr().to_string());
    wait_until("a to be the master", Duration::from_secs(20), || {
        role(&ns_a, &addr_a).as_deref() == Some("master")
    });
    {
        let addr = addr_a.clone();
        in_ns(&ns_a, move || {
            Admin::connect(&addr)
                .unwrap()
                .create_topic(TOPIC, QUEUES)
                .unwrap()
        });
    }
    wait_until("b in the in-sync set", Duration::from_secs(20), || {
        in_sync(&ns_a, &endpoints).contains("\"b\"")
    });

    // 1. SIGKILL of the master a, clients on host B given both brokers.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let producer_done = {
        let (ns, list, acked) = (ns_b.clone(), format!("{addr_a},{addr_b}"), acked.clone());
        std::thread::spawn(move || {
            in_ns(&ns, move || {
                let producer = Producer::with_config(ProducerConfig::new(list)).unwrap();
                for n in 0..400u64 {
                    let m = Message::new(n.to_string().into_bytes());
                    producer
                        .send(TOPIC, QueueSelector::Queue((n % 2) as u32), &m)
                        .unwrap_or_else(|e| panic!("message {n}: {e}"));
                    acked.lock().unwrap().push(n);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
    };
    wait_until("100 acks", Duration::from_secs(20), || {
        acked.lock().unwrap().len() >= 100
    });
    let killed = Instant::now();
    a.kill9();
    producer_done
        .join()
        .expect("the producer went on by itself");
    eprintln!(
        "two hosts: kill -> all 400 acked {:?} later",
        killed.elapsed()
    );
    let on_b = stored(&ns_b, &addr_b);
    for n in acked.lock().unwrap().iter() {
        assert_eq!(on_b.get(n), Some(&1), "acked message {n} on the new master");
    }

    // a comes back as b's slave.
    let a = start(&ns_a, net.addr_a(), &dir.path().join("a"), &list, "a");
    wait_until("a to follow b", Duration::from_secs(20), || {
        role(&ns_a, &addr_a).as_deref() == Some("slave")
    });
    wait_until("a in the in-sync set", Duration::from_secs(20), || {
        in_sync(&ns_a, &endpoints).contains("\"a\"")
    });

    // 2. The link goes down: b (master, on host B) loses etcd and its slave. It stops acking
    // within its lease; a, in sync and next to etcd, takes over. No overlap.
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let threads = clients(
        [
            (ns_a.clone(), addr_a.clone(), 1_000_000),
            (ns_b.clone(), addr_b.clone(), 2_000_000),
        ],
        &stop,
        &acks,
    );
    wait_until("acks from b", Duration::from_secs(10), || {
        acks.lock()
            .unwrap()
            .iter()
            .filter(|a| a.0 > 2_000_000)
            .count()
            > 20
    });
    let cut = Instant::now();
    net.link_down();
    wait_until("a to take over", Duration::from_secs(20), || {
        acks.lock()
            .unwrap()
            .iter()
            .any(|a| a.0 > 1_000_000 && a.0 < 2_000_000)
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    let last_b = acks
        .iter()
        .filter(|a| a.0 > 2_000_000)
        .map(|a| a.2)
        .max()
        .unwrap();
    let first_a = acks
        .iter()
        .filter(|a| a.0 < 2_000_000)
        .map(|a| a.2)
        .min()
        .unwrap();
    eprintln!(
        "two hosts, partition: b's last ack {:?} after the cut, a's first {:?}",
        last_b.saturating_duration_since(cut),
        first_a.saturating_duration_since(cut)
    );
    assert!(
        last_b < first_a,
        "two masters acked in the same window: b's last ack {:?} after a's first",
        last_b.saturating_duration_since(first_a)
    );

    // Healed: b rejoins as a's slave; every ack of the drill is on a once.
    net.link_up();
    wait_until("b to rejoin as a slave", Duration::from_secs(30), || {
        role(&ns_b, &addr_b).as_deref() == Some("slave")
    });
    let on_a = stored(&ns_a, &addr_a);
    for (n, _, _) in &acks {
        assert_eq!(on_a.get(n), Some(&1), "acked message {n} on the master");
    }
    drop((a, b));
}
