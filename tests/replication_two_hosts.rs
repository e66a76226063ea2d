//! Replication drills across two hosts: network namespaces joined by a veth pair (see
//! tests/common/netns.rs), a real `ringmq broker` process on each, SIGKILL, partitions. Each
//! test skips (with a message) when not root.
//!
//! The test process reaches each broker through sockets made inside that broker's namespace
//! (`in_ns`), as a client on that host would.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::{in_ns, NsBroker, TwoHosts};
use common::wait_caught_up;
use ringmq::client::{Admin, ClientError, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::format::batch::Message;
use ringmq::protocol::ErrorCode;

fn admin(ns: &str, addr: &str) -> Admin {
    let addr = addr.to_string();
    in_ns(ns, move || Admin::connect(&addr).expect("admin connects"))
}

fn producer(ns: &str, addr: &str, retries: u32) -> Producer {
    let mut cfg = ProducerConfig::new(addr);
    cfg.retries = retries;
    cfg.request_timeout = Duration::from_secs(10);
    in_ns(ns, move || {
        Producer::with_config(cfg).expect("producer connects")
    })
}

/// Every message of `topic` on the broker at `addr`, read from host `ns`.
fn read_all(ns: &str, addr: &str, topic: &str, queues: u32) -> Vec<(u32, u64, Vec<u8>)> {
    let addr = addr.to_string();
    let consumer = in_ns(ns, move || {
        Consumer::connect(&addr).expect("consumer connects")
    });
    common::read_all(&consumer, topic, queues)
}

/// `--peer <host b's broker>`: the master's slave lives there.
fn peer_b(net: &TwoHosts) -> String {
    format!("{}:{}", net.addr_b(), common::netns::BROKER_PORT)
}

/// A master on host a with `master_args` (and `--peer` host b), a slave of it on host b with
/// `slave_args`. Returns once the slave streams: until then the master, which could not reach
/// its peer at start, is fenced.
fn start_pair(
    net: &TwoHosts,
    dirs: (&Path, &Path),
    master_args: &[&str],
    slave_args: &[&str],
) -> (NsBroker, NsBroker) {
    let peer = peer_b(net);
    let mut args = vec!["--peer", peer.as_str()];
    args.extend(master_args);
    let master = NsBroker::start(net.ns_a(), net.addr_a(), dirs.0, &args);
    let mut args = vec!["--role", "slave", "--master", master.addr()];
    args.extend(slave_args);
    let slave = NsBroker::start(net.ns_b(), net.addr_b(), dirs.1, &args);
    wait_caught_up(&admin(net.ns_a(), master.addr()), Duration::from_secs(20));
    (master, slave)
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Remote(r) => Some(r.code),
        _ => None,
    }
}

fn send(p: &Producer, topic: &str, body: &str) -> Result<(u32, u64), ClientError> {
    p.send(
        topic,
        QueueSelector::Queue(0),
        &Message::new(body.as_bytes().to_vec()),
    )
    .map(|r| (r.queue, r.offset))
}

#[test]
fn sync_master_killed_under_load_then_slave_promoted_has_every_acked_message_once() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let _watchdog = common::watchdog(Duration::from_secs(180));
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    let (master, slave) = start_pair(
        &net,
        (dir_a.path(), dir_b.path()),
        &["--replication", "sync_master", "--replica-ack", "durable"],
        &[],
    );
    let maddr = master.addr().to_string();
    let madmin = admin(net.ns_a(), &maddr);
    madmin.create_topic("drill", 4).unwrap();
    wait_caught_up(&madmin, Duration::from_secs(20));

    // Pipelined sends from host a until the master dies; remember every ack.
    let producer = Arc::new(producer(net.ns_a(), &maddr, 1));
    let acked: Arc<Mutex<Vec<(u32, u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (producer, acked, stop) = (producer.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("m-{i}");
                let acked = acked.clone();
                let sent = producer.send_async(
                    "drill",
                    QueueSelector::RoundRobin,
                    &Message::new(body.clone().into_bytes()),
                    move |r| {
                        if let Ok(r) = r {
                            acked.lock().unwrap().push((r.queue, r.offset, body));
                        }
                    },
                );
                if sent.is_err() {
                    break;
                }
                i += 1;
            }
            i
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 3000 {
        assert!(
            Instant::now() < deadline,
            "too few acks: {}",
            acked.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    master.kill9();
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    producer.flush();
    let acked = acked.lock().unwrap().clone();
    assert!(
        sent as usize > acked.len(),
        "the kill caught messages in flight"
    );

    let sadmin = admin(net.ns_b(), slave.addr());
    let epoch = sadmin.promote().unwrap();
    assert!(epoch >= 2, "a promotion starts a new epoch, got {epoch}");
    let on_slave = read_all(net.ns_b(), slave.addr(), "drill", 4);
    let mut seen: HashMap<&[u8], u32> = HashMap::new();
    for (_, _, body) in &on_slave {
        *seen.entry(body.as_slice()).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "a message stored twice");
    let by_offset: HashMap<(u32, u64), &Vec<u8>> =
        on_slave.iter().map(|(q, o, b)| ((*q, *o), b)).collect();
    for (q, o, body) in &acked {
        assert_eq!(
            by_offset.get(&(*q, *o)).map(|b| b.as_slice()),
            Some(body.as_bytes()),
            "acked message {body} at queue {q} offset {o} is missing or different on the promoted slave"
        );
    }
    eprintln!(
        "kill -9 drill: {} acked, {} sent, {} on the promoted slave",
        acked.len(),
        sent,
        on_slave.len()
    );
}

#[test]
fn partition_gives_sync_master_producers_a_timeout_status_then_the_slave_catches_up() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let _watchdog = common::watchdog(Duration::from_secs(180));
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    let (master, slave) = start_pair(
        &net,
        (dir_a.path(), dir_b.path()),
        &[
            "--replication",
            "sync_master",
            "--replica-timeout-ms",
            "1000",
        ],
        &[],
    );
    let maddr = master.addr().to_string();
    let madmin = admin(net.ns_a(), &maddr);
    madmin.create_topic("p", 1).unwrap();
    wait_caught_up(&madmin, Duration::from_secs(20));
    let p = producer(net.ns_a(), &maddr, 0);
    send(&p, "p", "before").expect("acked while the slave is there");

    net.link_down();
    let mut codes = Vec::new();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let r = send(&p, "p", &format!("during-{n}"));
        n += 1;
        match r {
            Ok(ack) => panic!("acked {ack:?} while the slave was unreachable"),
            Err(e) => codes.push(code(&e).unwrap_or_else(|| panic!("not a broker status: {e}"))),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(codes[0], ErrorCode::FlushSlaveTimeout, "{codes:?}");
    assert!(
        codes.iter().all(|c| matches!(
            c,
            ErrorCode::FlushSlaveTimeout | ErrorCode::SlaveNotAvailable
        )),
        "{codes:?}"
    );
    assert_eq!(
        codes.last(),
        Some(&ErrorCode::SlaveNotAvailable),
        "a silent slave is dropped within seconds: {codes:?}"
    );
    let lagging = madmin.broker_stats().unwrap();
    assert!(lagging[0].replication.lag_bytes > 0, "{lagging:?}");
    // Consumers on the master do not see what the slave does not have.
    assert_eq!(read_all(net.ns_a(), &maddr, "p", 1).len(), 1);

    net.link_up();
    wait_caught_up(&madmin, Duration::from_secs(30));
    send(&p, "p", "after").expect("acked again after the partition healed");
    // Everything the master stored during the partition reached the slave, in order.
    let expect: Vec<Vec<u8>> = std::iter::once("before".to_string())
        .chain((0..n).map(|i| format!("during-{i}")))
        .chain(std::iter::once("after".to_string()))
        .map(String::into_bytes)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<Vec<u8>> = read_all(net.ns_b(), slave.addr(), "p", 1)
            .into_iter()
            .map(|m| m.2)
            .collect();
        if got == expect {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slave has {} of {}",
            got.len(),
            expect.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let healed = madmin.broker_stats().unwrap();
    assert!(healed[0].replication.connects >= 2, "{healed:?}");
}

#[test]
fn a_slave_restarted_empty_resyncs_everything() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let _watchdog = common::watchdog(Duration::from_secs(180));
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    // It takes writes before its slave exists.
    let peer = peer_b(&net);
    let master = NsBroker::start(
        net.ns_a(),
        net.addr_a(),
        dir_a.path(),
        &["--peer", &peer, "--force-master"],
    );
    let maddr = master.addr().to_string();
    let madmin = admin(net.ns_a(), &maddr);
    madmin.create_topic("bulk", 2).unwrap();
    let p = producer(net.ns_a(), &maddr, 3);
    let payload = "x".repeat(3000);
    for i in 0..3000u32 {
        p.send_async(
            "bulk",
            QueueSelector::Queue(i % 2),
            &Message::new(format!("{i}:{payload}").into_bytes()),
            |r| {
                r.expect("acked");
            },
        )
        .unwrap();
    }
    p.flush();
    let on_master = read_all(net.ns_a(), &maddr, "bulk", 2);
    assert_eq!(on_master.len(), 3000);

    let args = ["--role", "slave", "--master", maddr.as_str()];
    let slave = NsBroker::start(net.ns_b(), net.addr_b(), dir_b.path(), &args);
    wait_caught_up(&madmin, Duration::from_secs(30));
    slave.kill9();
    std::fs::remove_dir_all(dir_b.path()).unwrap();
    std::fs::create_dir_all(dir_b.path()).unwrap();
    let slave = NsBroker::start(net.ns_b(), net.addr_b(), dir_b.path(), &args);
    wait_caught_up(&madmin, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_all(net.ns_b(), slave.addr(), "bulk", 2) != on_master {
        assert!(Instant::now() < deadline, "the empty slave did not re-sync");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_old_master_is_refused_as_master_and_rejoins_as_slave_without_its_unreplicated_tail() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let _watchdog = common::watchdog(Duration::from_secs(180));
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    let sync = [
        "--replication",
        "sync_master",
        "--replica-timeout-ms",
        "500",
    ];
    // The same replication settings on both: they apply to whichever is master.
    let (master, slave) = start_pair(&net, (dir_a.path(), dir_b.path()), &sync, &sync);
    let maddr = master.addr().to_string();
    let saddr = slave.addr().to_string();
    let madmin = admin(net.ns_a(), &maddr);
    madmin.create_topic("r", 1).unwrap();
    wait_caught_up(&madmin, Duration::from_secs(20));
    let p = producer(net.ns_a(), &maddr, 0);
    for i in 0..100 {
        send(&p, "r", &format!("acked-{i}")).expect("acked");
    }
    // Partitioned, the master stores writes it cannot replicate (and does not ack them).
    net.link_down();
    for i in 0..20 {
        assert!(send(&p, "r", &format!("unreplicated-{i}")).is_err());
    }
    master.kill9();
    net.link_up();

    let sadmin = admin(net.ns_b(), &saddr);
    let epoch = sadmin.promote().unwrap();
    let p2 = producer(net.ns_b(), &saddr, 0);
    // The new master has no slave yet: SYNC_MASTER stores but cannot ack.
    assert_eq!(
        send(&p2, "r", "after-0").map_err(|e| code(&e)),
        Err(Some(ErrorCode::SlaveNotAvailable))
    );

    // Back as master, the old one learns from its peer that it was superseded.
    let mut args = sync.to_vec();
    args.extend(["--peer", saddr.as_str()]);
    assert_eq!(saddr, peer_b(&net));
    let refused = NsBroker::try_start(net.ns_a(), net.addr_a(), dir_a.path(), &args)
        .err()
        .expect("the old master must not start as master");
    assert!(refused.contains("superseded"), "{refused}");

    // As a slave it truncates what it never replicated and follows the new master.
    let mut old_args = vec!["--role", "slave", "--master", saddr.as_str()];
    old_args.extend(sync);
    let old = NsBroker::start(net.ns_a(), net.addr_a(), dir_a.path(), &old_args);
    wait_caught_up(&sadmin, Duration::from_secs(30));
    send(&p2, "r", "after-1").expect("acked once the old master follows");
    let expect: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("acked-{i}"))
        .chain(["after-0".to_string(), "after-1".to_string()])
        .map(String::into_bytes)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let on_old: Vec<Vec<u8>> = read_all(net.ns_a(), old.addr(), "r", 1)
            .into_iter()
            .map(|m| m.2)
            .collect();
        let on_new: Vec<Vec<u8>> = read_all(net.ns_b(), &saddr, "r", 1)
            .into_iter()
            .map(|m| m.2)
            .collect();
        if on_old == expect && on_new == expect {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not converge: old master has {} messages, new master {}",
            on_old.len(),
            on_new.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = admin(net.ns_a(), old.addr()).broker_info().unwrap();
    assert_eq!((info.role.as_str(), info.epoch), ("slave", epoch));
}

/// Issue 11 item 2: an old master that never went down (partitioned while its slave was
/// promoted) learns of the newer epoch from its peer once the partition heals, and stops
/// taking writes, naming the new master.
#[test]
fn an_old_master_that_kept_running_fences_itself_once_it_hears_its_peer_was_promoted() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    let (master, slave) = start_pair(&net, (dir_a.path(), dir_b.path()), &[], &[]);
    let maddr = master.addr().to_string();
    let saddr = slave.addr().to_string();
    let madmin = admin(net.ns_a(), &maddr);
    madmin.create_topic("f", 1).unwrap();
    wait_caught_up(&madmin, Duration::from_secs(20));
    let p = Arc::new(producer(net.ns_a(), &maddr, 0));
    send(&p, "f", "before").expect("acked");
    wait_caught_up(&madmin, Duration::from_secs(20));

    net.link_down();
    let epoch = admin(net.ns_b(), &saddr).promote().unwrap();
    net.link_up();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        // From host A: the fenced master closes the producer's connection, and the producer
        // reconnects from the thread that sends, which must be in A's namespace.
        let p = p.clone();
        match in_ns(net.ns_a(), move || send(&p, "f", "after")) {
            Err(e) if code(&e) == Some(ErrorCode::NotMaster) => break e,
            other => assert!(
                Instant::now() < deadline,
                "the old master still takes writes: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        err.to_string().contains(&saddr),
        "names the new master: {err}"
    );
    assert!(err.to_string().contains(&epoch.to_string()), "{err}");
    drop(master);
}
