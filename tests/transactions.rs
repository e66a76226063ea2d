//! Transactional messages on an embedded two-shard broker: commit visible exactly once,
//! rollback never, idempotent ends, check-backs answered by another member of the group,
//! the roll-back after the most checks, a clean restart between half and end, bad requests.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{read_all, test_config, TestBroker};
use ringmq::client::transaction::{CheckBack, Checker, HalfSent, TransactionConfig};
use ringmq::client::{
    Admin, ClientError, Connection, Consumer, QueueSelector, TransactionalProducer,
};
use ringmq::format::batch::Message;
use ringmq::protocol::{
    EndTransactionRequest, ErrorCode, ProduceRequest, Request, Transaction, TransactionOutcome,
    TransactionState,
};

/// A broker whose check-backs come quickly: due 300 ms after the half, every 300 ms, at most
/// `check_max` times.
fn quick_broker(check_max: u32) -> TestBroker {
    let tmp = common::data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.transaction_timeout_ms = 300;
    cfg.server.transaction_check_interval_ms = 300;
    cfg.server.transaction_check_max = check_max;
    TestBroker::start_with(cfg, tmp)
}

fn answer(outcome: TransactionOutcome) -> Checker {
    Arc::new(move |_: &CheckBack| outcome)
}

fn producer(addr: &str, group: &str, checker: Checker) -> TransactionalProducer {
    let mut c = TransactionConfig::new(addr, group);
    c.check_wait = Duration::from_millis(300);
    TransactionalProducer::start(c, checker).expect("transactional producer")
}

fn payloads(addr: &str, topic: &str, queues: u32) -> Vec<String> {
    let consumer = Consumer::connect(addr).expect("consumer");
    read_all(&consumer, topic, queues)
        .into_iter()
        .map(|(_, _, p)| String::from_utf8(p).unwrap())
        .collect()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn open_count(addr: &str) -> u64 {
    Admin::connect(addr)
        .unwrap()
        .transactions()
        .unwrap()
        .iter()
        .map(|l| l.open_total)
        .sum()
}

#[test]
fn a_committed_half_is_visible_once_and_a_rolled_back_one_never() {
    let b = TestBroker::start();
    b.create_topic("orders", 4);
    let addr = b.addr();
    let p = producer(&addr, "shop", answer(TransactionOutcome::Unknown));
    let mut halves = Vec::new();
    for i in 0..8 {
        let body = format!("m{i}");
        halves.push(
            p.send_half("orders", QueueSelector::RoundRobin, &[Message::new(body)])
                .expect("half"),
        );
    }
    assert!(
        payloads(&addr, "orders", 4).is_empty(),
        "a half message is invisible until it is committed"
    );
    assert_eq!(open_count(&addr), 8);
    for (i, h) in halves.iter().enumerate() {
        let outcome = if i % 2 == 0 {
            TransactionOutcome::Commit
        } else {
            TransactionOutcome::Rollback
        };
        let ended = p.end(h, outcome).expect("end");
        assert!(!ended.duplicate);
        // A retried end is harmless: the same state, marked duplicate, nothing stored twice.
        let again = p.end(h, outcome).expect("end again");
        assert!(again.duplicate);
        assert_eq!(again.state, ended.state);
        let other = if outcome == TransactionOutcome::Commit {
            TransactionOutcome::Rollback
        } else {
            TransactionOutcome::Commit
        };
        let changed = p.end(h, other).expect("a different second end");
        assert_eq!(changed.state, ended.state, "the first end wins");
    }
    let mut seen = payloads(&addr, "orders", 4);
    seen.sort();
    assert_eq!(seen, vec!["m0", "m2", "m4", "m6"]);
    assert_eq!(open_count(&addr), 0);
}

/// Under ASYNC_FLUSH an end is acked before its record is visible (the view of the
/// transactions is built from visible records): a second end that comes in that window must
/// still find the first, never commit the half again (the bench found every commit visible
/// twice).
#[test]
fn an_end_repeated_before_the_first_is_flushed_is_a_duplicate() {
    let tmp = common::data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.storage.flush_mode = ringmq::storage::FlushMode::AsyncFlush;
    cfg.storage.flush_interval_ms = 1500;
    let b = TestBroker::start_with(cfg, tmp);
    b.create_topic("orders", 2);
    let addr = b.addr();
    let p = producer(&addr, "shop", answer(TransactionOutcome::Unknown));
    for (i, outcome) in [TransactionOutcome::Commit, TransactionOutcome::Rollback]
        .into_iter()
        .enumerate()
    {
        let h = p
            .send_half(
                "orders",
                QueueSelector::Queue(0),
                &[Message::new(format!("a{i}"))],
            )
            .expect("half");
        let first = p.end(&h, outcome).expect("end");
        assert!(!first.duplicate);
        let again = p.end(&h, TransactionOutcome::Commit).expect("end again");
        assert!(
            again.duplicate,
            "the second end committed the half again: {again:?}"
        );
        assert_eq!(again.state, first.state);
        assert_eq!(again.offset, first.offset);
    }
    wait_for("the commit is visible", Duration::from_secs(10), || {
        !payloads(&addr, "orders", 2).is_empty()
    });
    std::thread::sleep(Duration::from_millis(1600)); // a second copy would be flushed by now
    assert_eq!(payloads(&addr, "orders", 2), vec!["a0"]);
}

#[test]
fn send_runs_the_local_transaction_between_half_and_end() {
    let b = TestBroker::start();
    b.create_topic("t", 2);
    let addr = b.addr();
    let p = producer(&addr, "g", answer(TransactionOutcome::Unknown));
    let messages = [Message::new("a").with_key("k"), Message::new("b")];
    let r = p
        .send(
            "t",
            QueueSelector::Queue(1),
            &messages,
            |half: &HalfSent| {
                // Inside the local transaction the messages are stored but not visible.
                assert_eq!(half.messages, 2);
                assert!(payloads(&addr, "t", 2).is_empty());
                TransactionOutcome::Commit
            },
        )
        .expect("send");
    assert_eq!(r.state, TransactionState::Committed);
    assert_eq!(r.offset, Some(0));
    let consumer = Consumer::connect(&addr).unwrap();
    let got = consumer.fetch("t", 1, 0, Duration::ZERO).unwrap().messages;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].key.as_deref(), Some(&b"k"[..]));
    assert!(
        got.iter()
            .all(|m| m.properties.iter().all(|(k, _)| !k.starts_with(b"%TXN_ID"))),
        "the copy does not carry the half's own properties"
    );
    let rolled = p
        .send("t", QueueSelector::Queue(1), &[Message::new("c")], |_| {
            TransactionOutcome::Rollback
        })
        .unwrap();
    assert_eq!(rolled.state, TransactionState::RolledBack);
    assert_eq!(payloads(&addr, "t", 2), vec!["a", "b"]);
}

#[test]
fn another_member_of_the_group_answers_for_a_producer_that_went_away() {
    let b = quick_broker(15);
    b.create_topic("pay", 2);
    let addr = b.addr();
    let first = producer(&addr, "billing", answer(TransactionOutcome::Unknown));
    let half = first
        .send_half("pay", QueueSelector::Queue(0), &[Message::new("invoice-1")])
        .unwrap();
    first.close(); // gone before its end: only a check-back can resolve it
    let asked = Arc::new(AtomicU32::new(0));
    let asked2 = asked.clone();
    let id = half.transaction_id.clone();
    let second = producer(
        &addr,
        "billing",
        Arc::new(move |c: &CheckBack| {
            assert_eq!(c.transaction_id, id);
            assert_eq!(c.messages[0].payload.as_ref(), b"invoice-1");
            asked2.fetch_add(1, Ordering::Relaxed);
            TransactionOutcome::Commit
        }),
    );
    let started = Instant::now();
    wait_for("the check-back commits", Duration::from_secs(10), || {
        payloads(&addr, "pay", 2) == ["invoice-1"]
    });
    eprintln!(
        "check-back resolved the transaction {:?} after the half (timeout 300 ms)",
        started.elapsed()
    );
    assert!(asked.load(Ordering::Relaxed) >= 1);
    assert_eq!(second.answered_checks(), 1);
    // A member of another group is never asked.
    assert_eq!(open_count(&addr), 0);
}

#[test]
fn a_member_that_keeps_answering_unknown_is_asked_again_then_the_half_is_discarded() {
    let b = quick_broker(3);
    b.create_topic("t", 2);
    let addr = b.addr();
    let asked = Arc::new(AtomicU32::new(0));
    let asked2 = asked.clone();
    let p = producer(
        &addr,
        "undecided",
        Arc::new(move |_: &CheckBack| {
            asked2.fetch_add(1, Ordering::Relaxed);
            TransactionOutcome::Unknown
        }),
    );
    let half = p
        .send_half("t", QueueSelector::Queue(0), &[Message::new("maybe")])
        .unwrap();
    wait_for("the half is discarded", Duration::from_secs(10), || {
        open_count(&addr) == 0
    });
    assert_eq!(
        asked.load(Ordering::Relaxed),
        3,
        "checked transaction_check_max times"
    );
    let lists = Admin::connect(&addr).unwrap().transactions().unwrap();
    assert_eq!(lists.iter().map(|l| l.discarded).sum::<u64>(), 1);
    assert!(
        payloads(&addr, "t", 2).is_empty(),
        "a discarded half is rolled back"
    );
    // ... and kept where a person can look at it.
    let kept = payloads(&addr, "%TXN_DISCARDED%undecided", 2);
    assert_eq!(kept, vec!["maybe"]);
    // A late commit changes nothing.
    let late = p.end(&half, TransactionOutcome::Commit).unwrap();
    assert_eq!(late.state, TransactionState::RolledBack);
    assert!(late.duplicate);
}

#[test]
fn with_no_member_alive_the_half_is_rolled_back_after_the_most_checks() {
    let b = quick_broker(2);
    b.create_topic("t", 2);
    let addr = b.addr();
    let p = producer(&addr, "lonely", answer(TransactionOutcome::Unknown));
    p.send_half("t", QueueSelector::Queue(1), &[Message::new("orphan")])
        .unwrap();
    p.close();
    wait_for("the half is discarded", Duration::from_secs(10), || {
        open_count(&addr) == 0
    });
    assert!(payloads(&addr, "t", 2).is_empty());
    assert_eq!(payloads(&addr, "%TXN_DISCARDED%lonely", 2), vec!["orphan"]);
}

#[test]
fn a_restart_between_half_and_end_keeps_the_half_and_its_state() {
    let mut b = TestBroker::start();
    b.create_topic("t", 2);
    let (committed, rolled, open) = {
        let p = producer(&b.addr(), "g", answer(TransactionOutcome::Unknown));
        let c = p
            .send_half("t", QueueSelector::Queue(0), &[Message::new("c")])
            .unwrap();
        let r = p
            .send_half("t", QueueSelector::Queue(0), &[Message::new("r")])
            .unwrap();
        let o = p
            .send_half("t", QueueSelector::Queue(1), &[Message::new("o")])
            .unwrap();
        p.end(&c, TransactionOutcome::Commit).unwrap();
        (c, r, o)
    };
    b.restart();
    let addr = b.addr();
    assert_eq!(payloads(&addr, "t", 2), vec!["c"]);
    assert_eq!(open_count(&addr), 2);
    let p = producer(&addr, "g", answer(TransactionOutcome::Unknown));
    let again = p.end(&committed, TransactionOutcome::Commit).unwrap();
    assert!(
        again.duplicate,
        "the commit is remembered across the restart"
    );
    assert_eq!(
        p.end(&rolled, TransactionOutcome::Rollback).unwrap().state,
        TransactionState::RolledBack
    );
    assert_eq!(
        p.end(&open, TransactionOutcome::Commit).unwrap().state,
        TransactionState::Committed
    );
    let mut seen = payloads(&addr, "t", 2);
    seen.sort();
    assert_eq!(seen, vec!["c", "o"]);
    b.restart();
    let mut seen = payloads(&b.addr(), "t", 2);
    seen.sort();
    assert_eq!(seen, vec!["c", "o"], "nothing committed twice by a replay");
    assert_eq!(open_count(&b.addr()), 0);
}

#[test]
fn a_half_resent_with_its_transaction_id_is_stored_once() {
    let b = TestBroker::start();
    b.create_topic("t", 2);
    let addr = b.addr();
    // The raw request, as a retrying client sends it twice.
    let shard = b.shard_addrs();
    let route = Admin::connect(&addr).unwrap().route("t").unwrap();
    let owner = &route.queues[0].address;
    assert!(shard.contains(owner));
    let conn = Connection::connect(owner).unwrap();
    let body = {
        let mut out = bytes::BytesMut::new();
        ringmq::format::batch::BatchBuilder::new(&mut out)
            .push(&Message::new("once"))
            .unwrap();
        out.freeze()
    };
    let half = |id: &str| {
        Request::Produce(ProduceRequest {
            topic: "t".into(),
            queue: Some(0),
            producer_id: 0,
            producer_epoch: 0,
            base_sequence: 0,
            message_count: 1,
            timeout_ms: 5000,
            known_epoch: 0,
            delay: None,
            transaction: Some(Transaction {
                producer_group: "g".into(),
                id: id.into(),
            }),
        })
    };
    let ack =
        |r: Result<(ringmq::protocol::Response, bytes::Bytes), ClientError>| match r.unwrap().0 {
            ringmq::protocol::Response::Produced(a) => a,
            other => panic!("{other:?}"),
        };
    let t = Duration::from_secs(10);
    let first = ack(conn.call(&half("tx-1"), body.clone(), t));
    let second = ack(conn.call(&half("tx-1"), body.clone(), t));
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.base_offset, second.base_offset);
    assert_eq!(open_count(&addr), 1);
    let end = |id: &str, offset: u64| {
        Request::EndTransaction(EndTransactionRequest {
            topic: "t".into(),
            queue: 0,
            half_offset: offset,
            transaction: Transaction {
                producer_group: "g".into(),
                id: id.into(),
            },
            outcome: TransactionOutcome::Commit,
            from_check: false,
        })
    };
    // Bad ends: a wrong id, a wrong offset.
    for (id, offset) in [("tx-2", first.base_offset), ("tx-1", first.base_offset + 7)] {
        let e = conn
            .call(&end(id, offset), bytes::Bytes::new(), t)
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::TransactionNotFound), "{e}");
    }
    conn.call(&end("tx-1", first.base_offset), bytes::Bytes::new(), t)
        .unwrap();
    assert_eq!(payloads(&addr, "t", 2), vec!["once"]);
}

#[test]
fn bad_transactional_requests_get_clear_errors() {
    let b = TestBroker::start();
    b.create_topic("t", 1);
    let owner = Admin::connect(&b.addr())
        .unwrap()
        .route("t")
        .unwrap()
        .queues[0]
        .address
        .clone();
    let conn = Connection::connect(&owner).unwrap();
    let body = {
        let mut out = bytes::BytesMut::new();
        ringmq::format::batch::BatchBuilder::new(&mut out)
            .push(&Message::new("x"))
            .unwrap();
        out.freeze()
    };
    let half = |group: &str, id: &str, producer_id: u64| {
        Request::Produce(ProduceRequest {
            topic: "t".into(),
            queue: Some(0),
            producer_id,
            producer_epoch: 0,
            base_sequence: 0,
            message_count: 1,
            timeout_ms: 5000,
            known_epoch: 0,
            delay: None,
            transaction: Some(Transaction {
                producer_group: group.into(),
                id: id.into(),
            }),
        })
    };
    let t = Duration::from_secs(10);
    for (req, why) in [
        (half("bad group!", "x", 0), "producer group"),
        (half("g", &"x".repeat(129), 0), "transaction id"),
        (half("g", "x", 7), "producer id 0"),
    ] {
        let e = conn.call(&req, body.clone(), t).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }
    let e = conn
        .call(
            &Request::ListTransactions { shard: 99 },
            bytes::Bytes::new(),
            t,
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    // Nothing half-stored by the refusals.
    assert_eq!(open_count(&b.addr()), 0);
}

fn cli(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ringmq");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_rehearses_commit_rollback_and_check_backs() {
    let b = quick_broker(15);
    b.create_topic("t", 2);
    let addr = b.addr();
    let produce = |outcome: &str, extra: &[&str], lines: &str| {
        let mut args = vec![
            "produce",
            "--broker",
            &addr,
            "--topic",
            "t",
            "--print-acks",
            "--transaction",
            outcome,
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = cli(&args, lines);
        assert!(ok, "produce --transaction {outcome}: {err}");
        (out, err)
    };
    let (out, _) = produce("commit", &[], "a\nb\n");
    assert_eq!(out.matches("state=committed").count(), 2, "{out}");
    let (out, _) = produce("rollback", &[], "c\n");
    assert!(out.contains("state=rolled-back"), "{out}");
    // Left open, with nobody to answer for a while: `admin transactions` lists it.
    let (_, err) = produce("unknown", &["--check-wait-ms", "1"], "d\n");
    assert!(err.contains("still open"), "{err}");
    let (ok, listing, err) = cli(&["admin", "--broker", &addr, "transactions"], "");
    assert!(ok, "{err}");
    assert!(listing.contains("group=ringmq-cli"), "{listing}");
    assert!(listing.contains("open=1"), "{listing}");
    // A member answering commit resolves its own and the earlier one of its group.
    let (_, err) = produce("unknown", &["--check-answer", "commit"], "e\n");
    assert!(err.contains("resolved by check-backs"), "{err}");
    wait_for(
        "d is committed by a check-back",
        Duration::from_secs(10),
        || payloads(&addr, "t", 2).len() == 4,
    );
    let mut seen = payloads(&addr, "t", 2);
    seen.sort();
    assert_eq!(seen, vec!["a", "b", "d", "e"]);
    // Flags that make no sense together are refused before anything is sent.
    let (ok, _, err) = cli(
        &[
            "produce",
            "--broker",
            &addr,
            "--topic",
            "t",
            "--check-answer",
            "commit",
        ],
        "x\n",
    );
    assert!(!ok && err.contains("--transaction"), "{err}");
}
