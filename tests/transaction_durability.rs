//! Transactional messages with real broker processes: half messages survive a SIGKILL of the
//! broker (SYNC_FLUSH) and are ended after it by the producer's own end or by a check-back; a
//! crash between a commit's record and its copy (the `txn-commit-before-copy` failpoint) is
//! repaired by the replay, once; a SYNC_MASTER slave holds the halves invisibly and resolves
//! them after its promotion, even for a topic it had not copied from its master yet. Every
//! committed message is visible exactly once, a rolled-back one never.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::BrokerProcess;
use ringmq::client::transaction::{CheckBack, Checker, HalfSent, TransactionConfig};
use ringmq::client::{Admin, Consumer, Durability, QueueSelector, TransactionalProducer};
use ringmq::format::batch::Message;
use ringmq::protocol::{TransactionOutcome, TransactionState};

/// Check-backs due 1 s after the half, repeated every 300 ms, and never given up on within a
/// drill (a discard would hide a lost end).
const QUICK_CHECKS: [&str; 6] = [
    "--transaction-timeout-ms",
    "1000",
    "--transaction-check-interval-ms",
    "300",
    "--transaction-check-max",
    "1000",
];

fn shards() -> String {
    common::available_cores().min(2).to_string()
}

fn answer(outcome: TransactionOutcome) -> Checker {
    Arc::new(move |_: &CheckBack| outcome)
}

/// A producer of `group` on `addr` whose checker is `checker`; `retries` 0 for a broker that
/// is about to die (its error comes at once instead of after the retries' backoff).
fn producer(addr: &str, group: &str, checker: Checker, retries: u32) -> TransactionalProducer {
    let mut c = TransactionConfig::new(addr, group);
    c.check_wait = Duration::from_millis(300);
    c.retries = retries;
    TransactionalProducer::start(c, checker).expect("transactional producer")
}

/// How often each payload is visible in `topic`, read from `addr`.
fn visible(addr: &str, topic: &str, queues: u32) -> BTreeMap<String, usize> {
    let consumer = Consumer::connect(addr).expect("consumer");
    let mut out = BTreeMap::new();
    for (_, _, p) in common::read_all(&consumer, topic, queues) {
        *out.entry(String::from_utf8(p).expect("utf-8 payload"))
            .or_default() += 1;
    }
    out
}

/// Each of `payloads` once.
fn once(payloads: &[&str]) -> BTreeMap<String, usize> {
    payloads.iter().map(|p| (p.to_string(), 1)).collect()
}

fn open_count(addr: &str) -> u64 {
    Admin::connect(addr)
        .expect("admin")
        .transactions()
        .expect("list transactions")
        .iter()
        .map(|l| l.open_total)
        .sum()
}

fn slave_knows(addr: &str, topic: &str) -> bool {
    Admin::connect(addr)
        .and_then(|a| a.list_topics())
        .is_ok_and(|t| t.iter().any(|t| t.name == topic))
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A checker that answers by payload (`commit-*` commits, anything else rolls back) and
/// records what it was asked.
fn by_payload(asked: Arc<Mutex<Vec<String>>>) -> Checker {
    Arc::new(move |c: &CheckBack| {
        let p = String::from_utf8_lossy(&c.messages[0].payload).into_owned();
        let outcome = if p.starts_with("commit-") {
            TransactionOutcome::Commit
        } else {
            TransactionOutcome::Rollback
        };
        asked.lock().unwrap().push(p);
        outcome
    })
}

#[test]
fn kill_9_between_half_and_end_keeps_every_half_for_its_end_or_a_check_back() {
    let _watchdog = common::watchdog(Duration::from_secs(60));
    let started = Instant::now();
    let tmp = common::data_dir();
    let broker = BrokerProcess::start(tmp.path(), &shards(), &QUICK_CHECKS);
    Admin::connect(broker.addr())
        .unwrap()
        .create_topic("orders", 4)
        .unwrap();

    // Group shop ends its own transactions; its first member knows no outcome when asked.
    let shop = producer(
        broker.addr(),
        "shop",
        answer(TransactionOutcome::Unknown),
        0,
    );
    let halves: Vec<HalfSent> = (0..6)
        .map(|i| {
            let h = shop
                .send_half(
                    "orders",
                    QueueSelector::RoundRobin,
                    &[Message::new(format!("a{i}"))],
                )
                .expect("half");
            assert_eq!(h.durability, Durability::Disk, "SYNC_FLUSH acks from disk");
            h
        })
        .collect();
    // Two ended before the crash, four after.
    shop.end(&halves[0], TransactionOutcome::Commit).unwrap();
    shop.end(&halves[1], TransactionOutcome::Rollback).unwrap();
    // Group orphan's halves only a check-back can end: their producer never comes back.
    let orphan = producer(
        broker.addr(),
        "orphan",
        answer(TransactionOutcome::Unknown),
        0,
    );
    for p in ["commit-b", "rollback-b"] {
        let h = orphan
            .send_half("orders", QueueSelector::RoundRobin, &[Message::new(p)])
            .expect("half");
        assert_eq!(h.durability, Durability::Disk);
    }
    assert_eq!(visible(broker.addr(), "orders", 4), once(&["a0"]));
    assert_eq!(open_count(broker.addr()), 6);

    broker.kill9();
    shop.close();
    orphan.close();
    let broker = BrokerProcess::start(tmp.path(), &shards(), &QUICK_CHECKS);
    let addr = broker.addr().to_string();
    assert_eq!(
        visible(&addr, "orders", 4),
        once(&["a0"]),
        "the restart shows no half"
    );
    assert_eq!(open_count(&addr), 6, "every acked half survived the kill");

    // (a) A new member of shop ends the halves with the handles saved before the crash.
    let shop = producer(&addr, "shop", answer(TransactionOutcome::Unknown), 3);
    let ended = |i: usize, outcome| shop.end(&halves[i], outcome).expect("end");
    // Ends retried across the crash, as by a producer whose answer the crash swallowed: known,
    // whatever order the records came in (before the fix of the load floor, the restart
    // forgot ends of halves below the oldest open one: TRANSACTION_NOT_FOUND).
    let e = ended(0, TransactionOutcome::Commit);
    assert!(
        e.duplicate && e.state == TransactionState::Committed,
        "{e:?}"
    );
    let e = ended(1, TransactionOutcome::Commit);
    assert!(
        e.duplicate && e.state == TransactionState::RolledBack,
        "the first end wins across the crash: {e:?}"
    );
    for (i, h) in halves.iter().enumerate().skip(2) {
        let (outcome, state) = if i % 2 == 0 {
            (TransactionOutcome::Commit, TransactionState::Committed)
        } else {
            (TransactionOutcome::Rollback, TransactionState::RolledBack)
        };
        let e = shop.end(h, outcome).expect("end");
        assert!(!e.duplicate && e.state == state, "{i}: {e:?}");
        assert!(shop.end(h, outcome).unwrap().duplicate, "a retried end");
    }

    // (b) A live member of orphan answers the check-backs of the halves nobody ended.
    let asked = Arc::new(Mutex::new(Vec::new()));
    let member = producer(&addr, "orphan", by_payload(asked.clone()), 3);
    wait_for(
        "check-backs end the orphans",
        Duration::from_secs(15),
        || open_count(&addr) == 0,
    );
    // Asked about both (a slow answer may be asked for again; the end is idempotent).
    assert!(member.answered_checks() >= 2);
    let asked: BTreeSet<String> = asked.lock().unwrap().iter().cloned().collect();
    assert_eq!(
        asked,
        BTreeSet::from(["commit-b".into(), "rollback-b".into()])
    );

    let expect = once(&["a0", "a2", "a4", "commit-b"]);
    assert_eq!(visible(&addr, "orders", 4), expect);
    member.close();
    shop.close();
    // A second crash and replay copies nothing again.
    broker.kill9();
    let broker = BrokerProcess::start(tmp.path(), &shards(), &QUICK_CHECKS);
    std::thread::sleep(Duration::from_millis(500)); // a few checker rounds
    assert_eq!(visible(broker.addr(), "orders", 4), expect);
    assert_eq!(open_count(broker.addr()), 0);
    eprintln!("kill -9 drill: {:?}", started.elapsed());
}

#[test]
fn a_crash_between_the_commit_record_and_its_copy_is_repaired_once_by_the_replay() {
    let _watchdog = common::watchdog(Duration::from_secs(60));
    let started = Instant::now();
    let tmp = common::data_dir();
    let mut broker = BrokerProcess::start_with_env(
        tmp.path(),
        &shards(),
        &[],
        &[("RINGMQ_FAILPOINT", "txn-commit-before-copy")],
    );
    Admin::connect(broker.addr())
        .unwrap()
        .create_topic("pay", 2)
        .unwrap();
    let p = producer(
        broker.addr(),
        "billing",
        answer(TransactionOutcome::Unknown),
        0,
    );
    let half = p
        .send_half("pay", QueueSelector::Queue(1), &[Message::new("invoice-7")])
        .expect("half");
    let e = p
        .end(&half, TransactionOutcome::Commit)
        .expect_err("the broker aborts in the commit");
    assert!(e.code().is_none(), "a lost connection, not an answer: {e}");
    let status = broker
        .wait_exit(Duration::from_secs(10))
        .expect("the failpoint aborts the broker");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    assert!(
        broker
            .log()
            .contains("failpoint txn-commit-before-copy: aborting"),
        "{}",
        broker.log()
    );
    p.close();
    drop(broker);

    // Restarted without the failpoint: the commit record is there, its copy is not, and the
    // replay (the checker's round, no end needed) writes the copy.
    let broker = BrokerProcess::start(tmp.path(), &shards(), &[]);
    let addr = broker.addr().to_string();
    wait_for(
        "the replay copies the committed half",
        Duration::from_secs(10),
        || !visible(&addr, "pay", 2).is_empty(),
    );
    assert_eq!(visible(&addr, "pay", 2), once(&["invoice-7"]));
    assert!(
        broker.log().contains("has no copy in pay/1"),
        "the copy was written by the repair: {}",
        broker.log()
    );
    let p = producer(&addr, "billing", answer(TransactionOutcome::Unknown), 3);
    let e = p
        .end(&half, TransactionOutcome::Commit)
        .expect("retried end");
    assert!(
        e.duplicate && e.state == TransactionState::Committed,
        "{e:?}"
    );
    let e = p
        .end(&half, TransactionOutcome::Rollback)
        .expect("late rollback");
    assert!(
        e.duplicate && e.state == TransactionState::Committed,
        "{e:?}"
    );
    assert_eq!(open_count(&addr), 0);
    p.close();
    std::thread::sleep(Duration::from_millis(1500)); // more checker rounds
    assert_eq!(visible(&addr, "pay", 2), once(&["invoice-7"]));

    // A second crash and replay finds the copy and writes none.
    broker.kill9();
    let broker = BrokerProcess::start(tmp.path(), &shards(), &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let p = producer(
        broker.addr(),
        "billing",
        answer(TransactionOutcome::Unknown),
        3,
    );
    let e = p.end(&half, TransactionOutcome::Commit).expect("end again");
    assert!(
        e.duplicate && e.state == TransactionState::Committed,
        "{e:?}"
    );
    assert_eq!(visible(broker.addr(), "pay", 2), once(&["invoice-7"]));
    assert!(
        !broker.log().contains("has no copy"),
        "the second replay repaired again: {}",
        broker.log()
    );
    eprintln!("failpoint drill: {:?}", started.elapsed());
}

#[test]
fn a_sync_master_failover_between_half_and_end_resolves_on_the_promoted_slave() {
    let _watchdog = common::watchdog(Duration::from_secs(60));
    let started = Instant::now();
    let (mdir, sdir) = (common::data_dir(), common::data_dir());
    // One shard each, on cores of their own. The peer answers nothing (the slave dials the
    // master, not the other way), so the master is forced to start as master.
    let mut master_flags = vec![
        "--replication",
        "sync_master",
        "--replica-ack",
        "durable",
        "--peer",
        "127.0.0.1:1",
        "--force-master",
    ];
    master_flags.extend(QUICK_CHECKS);
    let master = BrokerProcess::start(mdir.path(), "0,", &master_flags);
    let mut slave_flags = vec!["--role", "slave", "--master", master.addr()];
    slave_flags.extend(QUICK_CHECKS);
    let slave_core = if common::available_cores() > 1 {
        "1,"
    } else {
        "0,"
    };
    let slave = BrokerProcess::start(sdir.path(), slave_core, &slave_flags);
    let admin = Admin::connect(master.addr()).unwrap();
    common::wait_caught_up(&admin, Duration::from_secs(20));
    admin.create_topic("pay", 2).unwrap();
    let slave_addr = slave.addr().to_string();
    wait_for(
        "the slave copies the topic",
        Duration::from_secs(10),
        || slave_knows(&slave_addr, "pay"),
    );

    let billing = producer(
        master.addr(),
        "billing",
        answer(TransactionOutcome::Unknown),
        0,
    );
    let audit = producer(
        master.addr(),
        "audit",
        answer(TransactionOutcome::Unknown),
        0,
    );
    let half = |p: &TransactionalProducer, body: &'static str, queue: u32| {
        let h = p
            .send_half("pay", QueueSelector::Queue(queue), &[Message::new(body)])
            .expect("half");
        assert_eq!(
            h.durability,
            Durability::ReplicaDurable,
            "SYNC_MASTER acks a half once the slave has it on disk"
        );
        h
    };
    let by_end = half(&billing, "commit-by-end", 0);
    let rolled = half(&billing, "rollback-by-end", 1);
    half(&audit, "commit-by-check", 1);

    // The slave holds the three halves, and shows none of them.
    assert_eq!(open_count(&slave_addr), 3, "the halves are on the slave");
    assert!(
        visible(&slave_addr, "pay", 2).is_empty(),
        "a half is never visible on the slave"
    );

    master.kill9();
    billing.close();
    audit.close();
    let epoch = Admin::connect(&slave_addr)
        .unwrap()
        .promote()
        .expect("promote");
    eprintln!("slave promoted, epoch {epoch}");

    // An end sent to the new master, with the handle the old one acked.
    let billing = producer(
        &slave_addr,
        "billing",
        answer(TransactionOutcome::Unknown),
        3,
    );
    let e = billing
        .end(&by_end, TransactionOutcome::Commit)
        .expect("end");
    assert!(
        !e.duplicate && e.state == TransactionState::Committed,
        "{e:?}"
    );
    assert_eq!(e.epoch, epoch, "answered by the new master");
    let e = billing
        .end(&rolled, TransactionOutcome::Rollback)
        .expect("end");
    assert!(
        !e.duplicate && e.state == TransactionState::RolledBack,
        "{e:?}"
    );
    // A check-back from the new master to a member connected to it.
    let asked = Arc::new(Mutex::new(Vec::new()));
    let audit = producer(&slave_addr, "audit", by_payload(asked.clone()), 3);
    wait_for(
        "the new master's check-back ends the last half",
        Duration::from_secs(15),
        || open_count(&slave_addr) == 0,
    );
    assert!(audit.answered_checks() >= 1);
    let asked: BTreeSet<String> = asked.lock().unwrap().iter().cloned().collect();
    assert_eq!(asked, BTreeSet::from(["commit-by-check".into()]));
    assert_eq!(billing.answered_checks(), 0, "billing ended its own");
    std::thread::sleep(Duration::from_millis(600)); // a doubled copy would show now
    assert_eq!(
        visible(&slave_addr, "pay", 2),
        once(&["commit-by-end", "commit-by-check"])
    );
    eprintln!("failover drill: {:?}", started.elapsed());
}

#[test]
fn a_half_for_a_topic_the_slave_had_not_copied_yet_commits_after_the_failover() {
    let _watchdog = common::watchdog(Duration::from_secs(60));
    let started = Instant::now();
    let (mdir, sdir) = (common::data_dir(), common::data_dir());
    let mut master_flags = vec![
        "--replication",
        "sync_master",
        "--replica-ack",
        "durable",
        "--peer",
        "127.0.0.1:1",
        "--force-master",
    ];
    master_flags.extend(QUICK_CHECKS);
    let master = BrokerProcess::start(mdir.path(), "0,", &master_flags);
    let mut slave_flags = vec!["--role", "slave", "--master", master.addr()];
    slave_flags.extend(QUICK_CHECKS);
    let slave_core = if common::available_cores() > 1 {
        "1,"
    } else {
        "0,"
    };
    let slave = BrokerProcess::start(sdir.path(), slave_core, &slave_flags);
    let slave_addr = slave.addr().to_string();
    common::wait_caught_up(
        &Admin::connect(master.addr()).unwrap(),
        Duration::from_secs(20),
    );
    // A new topic whose first message is a half: no record of the topic itself reaches the
    // slave (the half is in %SYS%TXN), and the master dies before the slave's periodic copy
    // of the topic table (every second).
    Admin::connect(master.addr())
        .unwrap()
        .create_topic("fresh", 3)
        .unwrap();
    let p = producer(master.addr(), "g", answer(TransactionOutcome::Unknown), 0);
    let h = p
        .send_half("fresh", QueueSelector::Queue(2), &[Message::new("first")])
        .expect("half");
    assert_eq!(h.durability, Durability::ReplicaDurable);
    let unknown_to_slave = !slave_knows(&slave_addr, "fresh");
    master.kill9();
    p.close();
    Admin::connect(&slave_addr)
        .unwrap()
        .promote()
        .expect("promote");
    // The new master's first check-back round creates the topic its open half names (until
    // then a client cannot route an end to it).
    wait_for(
        "the new master creates the half's topic",
        Duration::from_secs(5),
        || slave_knows(&slave_addr, "fresh"),
    );
    let p = producer(&slave_addr, "g", answer(TransactionOutcome::Unknown), 3);
    let e = p
        .end(&h, TransactionOutcome::Commit)
        .expect("the new master commits the half");
    assert_eq!(e.state, TransactionState::Committed, "{e:?}");
    assert_eq!(visible(&slave_addr, "fresh", 3), once(&["first"]));
    eprintln!(
        "new-topic failover drill: {:?}; the slave had not copied the topic before the \
         failover: {unknown_to_slave}",
        started.elapsed()
    );
}
