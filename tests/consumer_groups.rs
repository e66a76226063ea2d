//! Consumer groups end to end on an embedded two-shard broker: committed offsets, the CLI,
//! a consumer killed mid-stream, members joining and leaving under load, retries with delay
//! levels and the dead-letter queue, and bad group requests.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TestBroker;
use ringmq::client::{
    Admin, ClientError, Connection, Consumer, Durability, GroupConfig, GroupConsumer, Producer,
    QueueSelector,
};
use ringmq::format::batch::Message;
use ringmq::protocol::{
    CommitOffsetsRequest, CommittedOffset, ErrorCode, JoinGroupRequest, Membership, Request,
    Response,
};

const BIN: &str = env!("CARGO_BIN_EXE_ringmq");

fn produce(addr: &str, topic: &str, bodies: impl IntoIterator<Item = String>) {
    let p = Producer::connect(addr).expect("producer");
    for b in bodies {
        p.send(topic, QueueSelector::RoundRobin, &Message::new(b))
            .expect("send");
    }
}

fn config(group: &str, topic: &str) -> GroupConfig {
    let mut c = GroupConfig::new(group, &[topic]);
    c.session_timeout = Duration::from_secs(2);
    c.auto_commit_interval = Duration::from_millis(200);
    c.fetch_wait = Duration::from_millis(200);
    c
}

/// Polls until `want` messages arrived or `within` passed; acks each.
fn drain(c: &GroupConsumer, want: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        for m in c.poll(Duration::from_millis(200)).expect("poll") {
            out.push(String::from_utf8(m.payload.to_vec()).unwrap());
            c.ack(&m);
        }
    }
    out
}

fn run_cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run ringmq");
    assert!(
        out.status.success(),
        "ringmq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_plain_consume_of_every_queue_prints_each_message_once_with_its_offset() {
    let b = TestBroker::start();
    b.create_topic("orders", 4);
    let addr = b.addr();
    produce(&addr, "orders", (0..40).map(|i| format!("m{i}")));
    let out = run_cli(&[
        "consume",
        "--broker",
        &addr,
        "--topic",
        "orders",
        "--from",
        "beginning",
        "--exit-at-end",
        "--print-offsets",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 40, "{out}");
    let mut seen = BTreeSet::new();
    for l in &lines {
        let (at, payload) = l.split_once('\t').expect("queue offset<TAB>payload");
        assert!(seen.insert(payload.to_string()), "{payload} printed twice");
        assert_eq!(at.split(' ').count(), 2, "{l}");
    }
    assert_eq!(seen, (0..40).map(|i| format!("m{i}")).collect());
}

#[test]
fn a_second_run_of_the_same_group_prints_only_what_is_new() {
    let b = TestBroker::start();
    b.create_topic("orders", 4);
    let addr = b.addr();
    produce(&addr, "orders", (0..40).map(|i| format!("m{i}")));
    let consume = || {
        let out = run_cli(&[
            "consume",
            "--broker",
            &addr,
            "--topic",
            "orders",
            "--group",
            "billing",
            "--exit-at-end",
        ]);
        out.lines().map(str::to_owned).collect::<BTreeSet<_>>()
    };
    let first = consume();
    assert_eq!(first, (0..40).map(|i| format!("m{i}")).collect());
    assert!(consume().is_empty(), "everything was committed");
    produce(&addr, "orders", (40..45).map(|i| format!("m{i}")));
    assert_eq!(consume(), (40..45).map(|i| format!("m{i}")).collect());
    // Another group starts from the beginning.
    let other = run_cli(&[
        "consume",
        "--broker",
        &addr,
        "--topic",
        "orders",
        "--group",
        "audit",
        "--exit-at-end",
    ]);
    assert_eq!(other.lines().count(), 45);
}

#[test]
fn a_commit_is_acked_with_its_durability_and_survives_a_restart() {
    let mut b = TestBroker::start();
    b.create_topic("t", 2);
    produce(&b.addr(), "t", (0..10).map(|i| i.to_string()));
    let c = GroupConsumer::join(&b.addr(), config("g", "t")).unwrap();
    assert_eq!(drain(&c, 10, Duration::from_secs(10)).len(), 10);
    // SYNC_FLUSH (the default): the commit's record is on disk when it is acked.
    assert_eq!(c.commit().unwrap(), Some(Durability::Disk));
    assert_eq!(c.commit().unwrap(), None, "nothing new to commit");
    c.close().unwrap();
    // Commit up to an offset: messages below it are done without an ack each.
    produce(&b.addr(), "t", (10..14).map(|i| i.to_string()));
    let c = GroupConsumer::join(&b.addr(), config("g", "t")).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 4 && Instant::now() < deadline {
        got.extend(c.poll(Duration::from_millis(200)).unwrap());
    }
    assert_eq!(got.len(), 4);
    for m in &got {
        c.commit_up_to(&m.source.0, m.source.1, m.source.2 + 1)
            .unwrap();
    }
    c.close().unwrap();
    let before = Admin::connect(&b.addr())
        .unwrap()
        .describe_group("g")
        .unwrap();
    b.restart();
    let after = Admin::connect(&b.addr())
        .unwrap()
        .describe_group("g")
        .unwrap();
    let committed = |d: &ringmq::protocol::GroupDescription| {
        d.queues
            .iter()
            .map(|q| ((q.topic.clone(), q.queue), q.committed))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(committed(&before), committed(&after));
    let total: u64 = committed(&after)
        .iter()
        .filter(|(k, _)| k.0 == "t")
        .map(|(_, c)| c.unwrap_or(0))
        .sum();
    assert_eq!(total, 14, "10 acked and committed, then 4 committed up to");
    // Generations never repeat across a restart: a stale member of the last run cannot
    // pass for a member of this one.
    let c = GroupConsumer::join(&b.addr(), config("g", "t")).unwrap();
    assert!(c.membership().generation > before.generation);
    c.close().unwrap();
}

/// A `ringmq consume --group` process is SIGKILLed mid-stream: the next member gets exactly
/// the messages at or above the committed offsets again, never a gap.
#[test]
fn a_consumer_killed_mid_stream_gets_back_only_its_uncommitted_messages() {
    let b = TestBroker::start();
    b.create_topic("stream", 4);
    let addr = b.addr();
    let total = 4000;
    produce(&addr, "stream", (0..total).map(|i| format!("x{i}")));
    let mut child = Command::new(BIN)
        .args([
            "consume",
            "--broker",
            &addr,
            "--topic",
            "stream",
            "--group",
            "g",
            "--print-offsets",
            "--session-timeout-ms",
            "1500",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("consumer starts");
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = Vec::new();
    let mut line = String::new();
    while first.len() < 1500 {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        first.push(line.trim_end().to_string());
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    // What it printed before it died, whether or not we had read it yet.
    for l in reader.lines() {
        first.push(l.unwrap());
    }
    // The dead member's session ends; its queues go to the next member.
    std::thread::sleep(Duration::from_millis(2000));
    let d = Admin::connect(&addr).unwrap().describe_group("g").unwrap();
    let committed: HashMap<u32, u64> = d
        .queues
        .iter()
        .filter(|q| q.topic == "stream")
        .map(|q| (q.queue, q.committed.unwrap_or(0)))
        .collect();
    let second = run_cli(&[
        "consume",
        "--broker",
        &addr,
        "--topic",
        "stream",
        "--group",
        "g",
        "--print-offsets",
        "--exit-at-end",
    ]);
    // A queue the dead member read from but never committed (killed before its first
    // commit there) has no entry once its session ended: nothing committed, all again.
    let committed_of = |q: &u32| committed.get(q).copied().unwrap_or(0);
    let parse = |l: &str| {
        let (pos, body) = l.split_once('\t').expect("offset prefix");
        let (q, o) = pos.split_once(' ').unwrap();
        (
            q.parse::<u32>().unwrap(),
            o.parse::<u64>().unwrap(),
            body.to_string(),
        )
    };
    let first: Vec<_> = first.iter().map(|l| parse(l)).collect();
    let second: Vec<_> = second.lines().map(parse).collect();
    let seen: BTreeSet<String> = first.iter().chain(&second).map(|m| m.2.clone()).collect();
    assert_eq!(seen.len(), total, "every message printed at least once");
    // Re-delivered: exactly what the first member printed at or above the committed offsets.
    let again: BTreeSet<_> = second.iter().map(|m| (m.0, m.1)).collect();
    let uncommitted: BTreeSet<_> = first
        .iter()
        .filter(|m| m.1 >= committed_of(&m.0))
        .map(|m| (m.0, m.1))
        .collect();
    let duplicates = again
        .intersection(&first.iter().map(|m| (m.0, m.1)).collect())
        .count();
    assert!(
        second.iter().all(|m| m.1 >= committed_of(&m.0)),
        "nothing below a committed offset comes back"
    );
    assert_eq!(
        duplicates,
        uncommitted.len(),
        "re-delivered = printed but uncommitted"
    );
    eprintln!(
        "killed after printing {} line(s); committed {:?}; re-delivered {duplicates}",
        first.len(),
        committed
    );
}

/// Three members join and leave while a producer writes: every message is processed at least
/// once; duplicates only come from uncommitted windows at each rebalance.
#[test]
fn members_joining_and_leaving_under_load_lose_nothing() {
    let _watchdog = common::watchdog(Duration::from_secs(120));
    let b = TestBroker::start();
    b.create_topic("load", 6);
    let addr = b.addr();
    let total = 6000usize;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let addr = addr.clone();
        let producing = producing.clone();
        std::thread::spawn(move || {
            let p = Producer::connect(&addr).unwrap();
            for i in 0..total {
                p.send(
                    "load",
                    QueueSelector::RoundRobin,
                    &Message::new(format!("{i}")),
                )
                .unwrap();
                if i % 500 == 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            producing.store(false, Ordering::Release);
        })
    };
    let member = |life: Duration, close: bool| {
        let addr = addr.clone();
        let seen = seen.clone();
        std::thread::spawn(move || {
            let c = GroupConsumer::join(&addr, config("workers", "load")).unwrap();
            let end = Instant::now() + life;
            while Instant::now() < end {
                match c.poll(Duration::from_millis(100)) {
                    Ok(ms) => {
                        for m in ms {
                            seen.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&m.payload).into());
                            c.ack(&m);
                        }
                    }
                    // A rebalance: the consumer re-joins by itself.
                    Err(e) => eprintln!("poll: {e}"),
                }
            }
            if close {
                c.close().unwrap();
            } // else dropped: like a crash, its session times out
        })
    };
    let a = member(Duration::from_secs(4), true);
    std::thread::sleep(Duration::from_millis(300));
    let b2 = member(Duration::from_secs(2), false);
    std::thread::sleep(Duration::from_millis(300));
    let c = member(Duration::from_secs(3), true);
    for t in [a, b2, c] {
        t.join().unwrap();
    }
    producer.join().unwrap();
    assert!(!producing.load(Ordering::Acquire));
    // The last member drains what is left (and what the dropped one had not committed).
    std::thread::sleep(Duration::from_millis(2100));
    let last = GroupConsumer::join(&addr, config("workers", "load")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ms = last.poll(Duration::from_millis(300)).unwrap();
        for m in &ms {
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&m.payload).into());
            last.ack(m);
        }
        if ms.is_empty() && last.at_end() || Instant::now() > deadline {
            break;
        }
    }
    last.close().unwrap();
    let seen = seen.lock().unwrap();
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        total,
        "every message processed at least once"
    );
    eprintln!(
        "{total} messages, {} deliveries, {} duplicates (from uncommitted windows at rebalances)",
        seen.len(),
        seen.len() - total
    );
}

#[test]
fn a_nacked_message_comes_back_after_its_delay_then_goes_to_the_dead_letter_queue() {
    let b = TestBroker::start();
    b.create_topic("jobs", 2);
    let addr = b.addr();
    let admin = Admin::connect(&addr).unwrap();
    admin.create_group("flaky", 2, 0).unwrap();
    produce(&addr, "jobs", ["job-1".to_string()]);
    let c = GroupConsumer::join(&addr, config("flaky", "jobs")).unwrap();
    let other = GroupConsumer::join(&addr, config("steady", "jobs")).unwrap();
    let mut deliveries = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut nacked_at = Instant::now();
    while deliveries.len() < 3 && Instant::now() < deadline {
        for m in c.poll(Duration::from_millis(200)).unwrap() {
            let waited = nacked_at.elapsed();
            deliveries.push((
                m.reconsume_times,
                m.topic.clone(),
                m.source.0.clone(),
                waited,
            ));
            nacked_at = Instant::now();
            let sent = c
                .nack(&m, 1, &format!("failure {}", m.reconsume_times))
                .unwrap();
            let want = if m.reconsume_times < 2 {
                "%RETRY%flaky"
            } else {
                "%DLQ%flaky"
            };
            assert_eq!(sent.topic, want);
            assert_eq!(sent.durability, Durability::Disk);
        }
    }
    assert_eq!(deliveries.len(), 3, "{deliveries:?}");
    for (i, (times, topic, source, waited)) in deliveries.iter().enumerate() {
        assert_eq!(*times as usize, i);
        assert_eq!(topic, "jobs", "a retry names its original topic");
        if i > 0 {
            assert_eq!(source, "%RETRY%flaky");
            // Level 1 is 1 s: never earlier (the broker's clock, measured here from before
            // the nack was sent).
            assert!(
                *waited >= Duration::from_millis(990),
                "retry {i} after {waited:?}"
            );
            eprintln!("retry {i}: {waited:?} after the nack (level 1 = 1 s)");
        }
    }
    // Third failure > max_reconsume_times 2: in the DLQ, not delivered again.
    assert!(drain(&c, 1, Duration::from_millis(2500)).is_empty());
    let dlq = run_cli(&["admin", "--broker", &addr, "dlq", "show", "flaky"]);
    let lines: Vec<&str> = dlq.lines().collect();
    assert_eq!(lines.len(), 1, "{dlq}");
    assert!(lines[0].contains("origin=jobs/"), "{dlq}");
    assert!(
        lines[0].contains("failures=3 error=failure 2\tjob-1"),
        "{dlq}"
    );
    // The other group saw the message once, from the topic itself.
    assert_eq!(drain(&other, 2, Duration::from_millis(1500)), ["job-1"]);
    // Redrive publishes it to its topic once: a second redrive finds nothing new.
    let out = run_cli(&["admin", "--broker", &addr, "dlq", "redrive", "flaky"]);
    assert!(out.contains("redriven 1 message"), "{out}");
    let out = run_cli(&["admin", "--broker", &addr, "dlq", "redrive", "flaky"]);
    assert!(out.contains("redriven 0 message"), "{out}");
    let again = drain(&c, 1, Duration::from_secs(5));
    assert_eq!(again, ["job-1"], "redriven back to its topic");
    c.close().unwrap();
    other.close().unwrap();
}

fn call(conn: &Connection, request: Request) -> Result<Response, ClientError> {
    conn.call(&request, Bytes::new(), Duration::from_secs(10))
        .map(|r| r.0)
}

fn code(r: Result<Response, ClientError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a broker error: {e}")),
        Ok(r) => panic!("accepted: {r:?}"),
    }
}

#[test]
fn bad_group_requests_get_clear_errors_and_change_nothing() {
    let b = TestBroker::start();
    b.create_topic("t", 2);
    produce(&b.addr(), "t", (0..4).map(|i| i.to_string()));
    let conn = Connection::connect(&b.addr()).unwrap();
    let join = |group: &str, topics: &[&str]| {
        Request::JoinGroup(JoinGroupRequest {
            group: group.into(),
            member: String::new(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            session_timeout_ms: 5000,
        })
    };
    let Response::GroupJoined(joined) = call(&conn, join("g", &["t"])).unwrap() else {
        panic!()
    };
    let who = Membership {
        group: "g".into(),
        member: joined.member.clone(),
        generation: joined.generation,
    };
    let commit = |who: &Membership, topic: &str, queue: u32, offset: u64| {
        Request::CommitOffsets(CommitOffsetsRequest {
            who: who.clone(),
            offsets: vec![CommittedOffset {
                topic: topic.into(),
                queue,
                offset,
            }],
        })
    };
    // A valid commit, the baseline that nothing below may change.
    call(&conn, commit(&who, "t", 0, 1)).unwrap();
    let unknown_group = Membership {
        group: "nope".into(),
        ..who.clone()
    };
    assert_eq!(
        code(call(&conn, commit(&unknown_group, "t", 0, 0))),
        ErrorCode::GroupNotFound
    );
    assert_eq!(
        code(call(&conn, commit(&who, "missing", 0, 0))),
        ErrorCode::TopicNotFound
    );
    assert_eq!(
        code(call(&conn, commit(&who, "t", 9, 0))),
        ErrorCode::QueueNotFound
    );
    assert_eq!(
        code(call(&conn, commit(&who, "t", 0, 1_000))),
        ErrorCode::OffsetOutOfRange
    );
    let stale = Membership {
        generation: who.generation - 1,
        ..who.clone()
    };
    assert_eq!(
        code(call(&conn, commit(&stale, "t", 0, 0))),
        ErrorCode::StaleGeneration
    );
    let stranger = Membership {
        member: "someone-else".into(),
        ..who.clone()
    };
    assert_eq!(
        code(call(&conn, commit(&stranger, "t", 0, 0))),
        ErrorCode::UnknownMember
    );
    let operator = Membership {
        group: "g".into(),
        ..Membership::default()
    };
    assert_eq!(
        code(call(&conn, commit(&operator, "t", 0, 0))),
        ErrorCode::StaleGeneration,
        "an operator commit may not move a queue a member holds"
    );
    let long = "g".repeat(121);
    assert_eq!(
        code(call(&conn, join(&long, &["t"]))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(call(&conn, join("g%x", &["t"]))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(call(&conn, join("g", &["%RETRY%g"]))),
        ErrorCode::InvalidTopic
    );
    assert_eq!(
        code(call(&conn, join("g", &["missing"]))),
        ErrorCode::TopicNotFound
    );
    assert_eq!(
        code(call(&conn, join("g", &[]))),
        ErrorCode::InvalidArgument
    );
    // Clients neither create nor write the broker's topics.
    assert_eq!(
        code(call(
            &conn,
            Request::CreateTopic {
                name: "%DLQ%x".into(),
                queues: 1
            }
        )),
        ErrorCode::InvalidTopic
    );
    let p = Producer::connect(&b.addr()).unwrap();
    let err = p
        .send("%RETRY%g", QueueSelector::Queue(0), &Message::new("x"))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidTopic));
    // A stale member's fetch is refused too.
    let consumer = Consumer::connect(&b.addr()).unwrap();
    let fetch = ringmq::client::consumer::fetch_request(
        "t",
        0,
        0,
        1 << 20,
        Duration::ZERO,
        Some(stale.clone()),
    );
    let conn0 = consumer.cluster().connection_for("t", 0).unwrap();
    assert_eq!(code(call(&conn0, fetch)), ErrorCode::StaleGeneration);
    // Nothing changed: the committed offsets are the baseline.
    let d = Admin::connect(&b.addr())
        .unwrap()
        .describe_group("g")
        .unwrap();
    let committed: Vec<_> = d
        .queues
        .iter()
        .filter(|q| q.committed.is_some())
        .map(|q| (q.topic.as_str(), q.queue, q.committed.unwrap()))
        .collect();
    assert_eq!(committed, [("t", 0, 1)]);
    assert_eq!(d.generation, who.generation, "refusals do not rebalance");
}

/// Thousands of commits: the table is restated as a snapshot, a restart loads from it, and a
/// snapshot file that names the wrong record is ignored (the load starts at the oldest record).
#[test]
fn commits_are_compacted_into_a_snapshot_that_a_restart_loads_from() {
    let mut b = TestBroker::start();
    b.create_topic("t", 2);
    produce(&b.addr(), "t", (0..40).map(|i| i.to_string()));
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.create_group("busy", 16, 0).unwrap();
    let commit = |queue: u32, offset: u64| {
        admin
            .commit_offsets(
                "busy",
                vec![CommittedOffset {
                    topic: "t".into(),
                    queue,
                    offset,
                }],
            )
            .unwrap();
    };
    // Queue 0 is committed once, first; queue 1 back and forth 3000 times after it: only a
    // snapshot still holds queue 0's offset past the first records.
    commit(0, 7);
    for i in 0..3000u64 {
        commit(1, i % 10);
    }
    let coordinator = ringmq::broker::groups::coordinator_of("busy", b.shard_addrs().len());
    let file = b
        .dir
        .join(format!("shard-{coordinator}"))
        .join(ringmq::broker::groups::SNAPSHOT_FILE);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(Instant::now() < deadline, "no snapshot written");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let offset: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
    // Past queue 0's only commit (the settings and that commit are the first records): a load
    // from the snapshot finds queue 0's offset only in the snapshot.
    assert!(
        offset > 2,
        "the snapshot comes after queue 0's commit: {text}"
    );
    let committed = |b: &TestBroker| {
        let d = Admin::connect(&b.addr())
            .unwrap()
            .describe_group("busy")
            .unwrap();
        let of = |queue: u32| {
            d.queues
                .iter()
                .find(|q| q.topic == "t" && q.queue == queue)
                .and_then(|q| q.committed)
        };
        (d.settings.max_reconsume_times, of(0), of(1))
    };
    assert_eq!(committed(&b), (16, Some(7), Some(9)));
    b.restart();
    assert_eq!(
        committed(&b),
        (16, Some(7), Some(9)),
        "loaded from the snapshot"
    );
    // A file naming another record: ignored, and the log alone gives the same answer.
    b.stop();
    std::fs::write(&file, format!("{} 12345\n", offset + 1)).unwrap();
    b.restart();
    assert_eq!(
        committed(&b),
        (16, Some(7), Some(9)),
        "loaded from the oldest record"
    );
}

/// A member gives a message back and dies before its commit passes it: the next holder of the
/// queue gets it only from the retry topic, not again from the queue.
#[test]
fn a_message_given_back_is_never_delivered_again_from_its_queue() {
    let b = TestBroker::start();
    b.create_topic("once", 1);
    let addr = b.addr();
    produce(&addr, "once", (0..5).map(|i| format!("m{i}")));
    let a = GroupConsumer::join(&addr, config("g", "once")).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 5 && Instant::now() < deadline {
        got.extend(a.poll(Duration::from_millis(200)).unwrap());
    }
    assert_eq!(got.len(), 5);
    // m1 stays in flight (so the commit cannot pass m2), m2 is given back, the rest acked.
    for m in &got {
        match &m.payload[..] {
            b"m1" => {}
            b"m2" => {
                a.nack(m, 1, "try later").unwrap();
            }
            _ => a.ack(m),
        }
    }
    a.commit().unwrap();
    drop(a); // dies: no close, no further commit; its session times out
    std::thread::sleep(Duration::from_millis(2300));
    let b2 = GroupConsumer::join(&addr, config("g", "once")).unwrap();
    let mut deliveries: Vec<(String, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        for m in b2.poll(Duration::from_millis(200)).unwrap() {
            deliveries.push((
                String::from_utf8_lossy(&m.payload).into(),
                m.source.0.clone(),
            ));
            b2.ack(&m);
        }
    }
    b2.close().unwrap();
    let m2: Vec<_> = deliveries.iter().filter(|(p, _)| p == "m2").collect();
    assert_eq!(
        m2,
        [&("m2".to_string(), "%RETRY%g".to_string())],
        "m2 only as a retry: {deliveries:?}"
    );
    let again: BTreeSet<&str> = deliveries.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(again, ["m1", "m2", "m3", "m4"].into_iter().collect());
}

#[test]
fn a_group_takes_up_the_queues_of_a_topic_that_grew() {
    let b = TestBroker::start();
    b.create_topic("grows", 2);
    let addr = b.addr();
    let mut cfg = config("growers", "grows");
    cfg.session_timeout = Duration::from_millis(1200); // heartbeats every 400 ms
    let c = GroupConsumer::join(&addr, cfg).expect("join");
    // The member also holds its group's retry topic: count the queues of `grows` only.
    let held = |c: &GroupConsumer| {
        let a = c.assignment();
        a.into_iter().filter(|(t, _)| t == "grows").count()
    };
    assert_eq!(held(&c), 2);
    Admin::connect(&addr)
        .unwrap()
        .alter_topic("grows", 4)
        .expect("alter");
    // The member keeps heartbeating; one of its heartbeats sees the topic grew.
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&c) < 4 && Instant::now() < deadline {
        let _ = c.poll(Duration::from_millis(100)).expect("poll");
    }
    assert_eq!(
        held(&c),
        4,
        "the member never got the new queues: {:?}",
        c.assignment()
    );
    let p = Producer::connect(&addr).expect("producer");
    for q in 2..4 {
        p.send(
            "grows",
            QueueSelector::Queue(q),
            &Message::new(format!("new{q}")),
        )
        .expect("send");
    }
    let mut got = drain(&c, 2, Duration::from_secs(10));
    got.sort();
    assert_eq!(got, vec!["new2".to_string(), "new3".to_string()]);
    c.close().expect("close");
}

/// Issue 14: a member of a group whose topic is deleted hears TOPIC_NOT_FOUND at its next poll
/// instead of polling an empty assignment forever.
#[test]
fn a_member_hears_that_its_topic_was_deleted() {
    let b = TestBroker::start();
    b.create_topic("gone", 2);
    produce(&b.addr(), "gone", (0..4).map(|i| i.to_string()));
    let c = GroupConsumer::join(&b.addr(), config("g", "gone")).unwrap();
    assert_eq!(drain(&c, 4, Duration::from_secs(10)).len(), 4);
    ringmq::client::Admin::connect(&b.addr())
        .unwrap()
        .delete_topic("gone")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let e = loop {
        match c.poll(Duration::from_millis(200)) {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "no error 15 s after the delete"),
        }
    };
    assert!(
        e.to_string().contains("TOPIC_NOT_FOUND") || e.to_string().contains("does not exist"),
        "{e}"
    );
}
