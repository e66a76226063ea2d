//! Consumer-group durability drills with real broker processes: committed offsets, scheduled
//! retries and dead letters survive a SIGKILL of the broker (SYNC_FLUSH) and a failover to a
//! promoted SYNC_MASTER slave, exactly: nothing lost, nothing doubled; and a `ringmq consume
//! --group` killed mid-stream prints again only its uncommitted window.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringmq::client::{
    Admin, Consumer, GroupConfig, GroupConsumer, GroupMessage, Producer, QueueSelector,
};
use ringmq::format::batch::Message;

const BIN: &str = env!("CARGO_BIN_EXE_ringmq");
/// Messages produced to the drilled topic.
const N: u64 = 400;
const TOPIC: &str = "orders";
const QUEUES: u32 = 4;
/// Group that commits the first half of every queue.
const HALF: &str = "half";
/// Group with max_reconsume_times=1 that nacks: some scheduled at level 3, some dead.
const RETRY: &str = "retrier";
/// Delay level 3 waits 10 s.
const LEVEL3_MS: u64 = 10_000;

/// Pids of the processes this binary started, for the watchdog's last act.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every process started here and aborts if the guard lives longer than `limit`: a hung
/// drill fails instead of blocking CI.
#[must_use = "the watchdog stops when the guard is dropped"]
fn watchdog(limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let test = std::thread::current().name().unwrap_or("?").to_string();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: {test} still running after {limit:?}; killing its processes");
            for pid in LIVE.lock().map(|v| v.clone()).unwrap_or_default() {
                // SAFETY: kill with the pid of a child we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::process::abort();
        }
    });
    tx
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sigkill(child: &mut Child) {
    // SAFETY: kill with the pid of our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

/// A broker process; its shard addresses come from its stderr.
struct BrokerProcess {
    child: Child,
    addrs: Vec<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl BrokerProcess {
    /// Starts `ringmq broker` on free ports over `dir` with `extra` flags; waits until every
    /// shard listens.
    fn start(dir: &Path, cores: &str, extra: &[&str]) -> BrokerProcess {
        let mut child = Command::new(BIN)
            .args(["broker", "--metrics-listen", "off", "--port", "0"])
            .args(["--segment-bytes", "33554432", "--cores", cores])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn broker");
        LIVE.lock().unwrap().push(child.id());
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("shard ") {
                    if let Some(addr) = line.split(" listening on ").nth(1) {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let shards = match cores.strip_suffix(',') {
            Some(_) => 1,
            None => cores.parse::<usize>().expect("a core count or `N,`"),
        };
        let mut addrs = Vec::new();
        while addrs.len() < shards {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(a) => addrs.push(a),
                Err(e) => {
                    sigkill(&mut child);
                    panic!(
                        "the broker did not print its addresses ({e}); its stderr:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
        BrokerProcess { child, addrs, log }
    }

    fn addr(&self) -> &str {
        &self.addrs[0]
    }

    fn kill9(mut self) {
        sigkill(&mut self.child);
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            sigkill(&mut self.child);
            if std::thread::panicking() {
                eprintln!("broker stderr:\n{}", self.log.lock().unwrap().join("\n"));
            }
        }
    }
}

/// Shards of a single-host broker in these drills.
fn shards() -> usize {
    common::available_cores().min(2)
}

/// Committed offsets of `group` by (topic, queue), from `admin group describe`'s source.
fn committed(admin: &Admin, group: &str) -> BTreeMap<(String, u32), Option<u64>> {
    admin
        .describe_group(group)
        .expect("describe group")
        .queues
        .into_iter()
        .map(|q| ((q.topic, q.queue), q.committed))
        .collect()
}

/// One stored message of a broker topic, with the broker properties that matter here.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Stored {
    queue: u32,
    offset: u64,
    origin: String,
    reconsume: String,
    payload: Vec<u8>,
}

fn prop(m: &ringmq::client::ConsumedMessage, name: &str) -> String {
    m.properties
        .iter()
        .find(|(k, _)| k.as_ref() == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Every stored message of `topic` (all its queues), read with a plain consumer.
fn read_topic(addr: &str, topic: &str) -> Vec<Stored> {
    let admin = Admin::connect(addr).expect("admin");
    let consumer = Consumer::connect(addr).expect("consumer");
    let mut out = Vec::new();
    for s in admin.queue_stats(topic).expect("queue stats") {
        let mut offset = s.min_offset;
        while offset < s.end_offset {
            let f = consumer
                .fetch(topic, s.queue, offset, Duration::ZERO)
                .expect("fetch");
            for m in f.messages.iter().filter(|m| m.offset < s.end_offset) {
                out.push(Stored {
                    queue: s.queue,
                    offset: m.offset,
                    origin: format!(
                        "{}/{}/{}",
                        prop(m, "%ORIGIN_TOPIC"),
                        prop(m, "%ORIGIN_QUEUE"),
                        prop(m, "%ORIGIN_OFFSET")
                    ),
                    reconsume: prop(m, "%RECONSUME"),
                    payload: m.payload.to_vec(),
                });
            }
            assert!(
                f.next_offset > offset,
                "{topic}/{} read made no progress",
                s.queue
            );
            offset = f.next_offset;
        }
    }
    out
}

/// Polls `consumer` until `done(messages so far)` or `within` passes (then panics with `what`).
fn poll_until(
    consumer: &GroupConsumer,
    within: Duration,
    what: &str,
    mut on: impl FnMut(&GroupMessage),
    done: impl Fn() -> bool,
) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        for m in consumer.poll(Duration::from_millis(200)).expect("poll") {
            on(&m);
        }
    }
}

/// What the drill set up before the broker went away, to check after it came back.
struct Before {
    /// Origin (queue, offset) of every produced message.
    produced: BTreeSet<(u32, u64)>,
    /// End offset of every queue of the topic.
    ends: BTreeMap<u32, u64>,
    half: BTreeMap<(String, u32), Option<u64>>,
    retrier: BTreeMap<(String, u32), Option<u64>>,
    /// Origin (queue, offset) of every message scheduled at level 3, and the wall time just
    /// before its nack: it is due 10 s later, not before.
    scheduled: BTreeMap<(u32, u64), u64>,
    dlq: Vec<Stored>,
    retry_topic: Vec<Stored>,
}

/// Produces [`N`] messages; group [`HALF`] commits the first half of each queue; group
/// [`RETRY`] (max_reconsume_times 1) consumes everything, schedules every tenth message at
/// level 3 (10 s) and sends another tenth through a level-1 retry into its dead-letter queue,
/// then commits all. Returns what a broker must still have after a crash or a failover.
fn set_up_groups(addr: &str) -> Before {
    let admin = Admin::connect(addr).expect("admin");
    admin.create_topic(TOPIC, QUEUES).expect("create topic");
    admin.create_group(HALF, 16, 0).expect("create group");
    admin.create_group(RETRY, 1, 0).expect("create group");
    let producer = Producer::connect(addr).expect("producer");
    let mut produced = BTreeSet::new();
    for i in 0..N {
        let r = producer
            .send(
                TOPIC,
                QueueSelector::RoundRobin,
                &Message::new(format!("m-{i}").into_bytes()),
            )
            .expect("send");
        produced.insert((r.queue, r.offset));
    }
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for (q, o) in &produced {
        let e = ends.entry(*q).or_default();
        *e = (*e).max(o + 1);
    }
    assert_eq!(ends.len() as u32, QUEUES, "round robin reached every queue");

    // HALF: ack the first half of each queue, leave the rest in flight, commit.
    let half = GroupConsumer::join(addr, GroupConfig::new(HALF, &[TOPIC])).expect("join");
    let seen = std::cell::RefCell::new(BTreeSet::new());
    poll_until(
        &half,
        Duration::from_secs(20),
        "group half reads every message",
        |m| {
            assert!(seen.borrow_mut().insert((m.queue, m.offset)), "{m:?} twice");
            if m.offset < ends[&m.queue] / 2 {
                half.ack(m);
            }
        },
        || seen.borrow().len() as u64 == N,
    );
    half.commit().expect("commit");
    drop(half); // no close: close would commit its in-flight window too

    // RETRY: offsets ending in 1 are scheduled (level 3), ending in 2 go dead after one retry.
    let retrier = GroupConsumer::join(addr, GroupConfig::new(RETRY, &[TOPIC])).expect("join");
    let mut scheduled = BTreeMap::new();
    let mut dead = BTreeSet::new();
    let mut dead_letters = 0;
    let firsts = std::cell::Cell::new(0u64);
    let retried = std::cell::Cell::new(0usize);
    poll_until(
        &retrier,
        Duration::from_secs(30),
        "group retrier reads every message and sends its dead ones to the DLQ",
        |m| {
            if m.source.0 != TOPIC {
                // Back from the level-1 retry: its second failure makes it dead.
                assert_eq!(m.reconsume_times, 1, "{m:?}");
                assert!(
                    dead.contains(&(m.queue, m.offset)),
                    "unexpected retry {m:?}"
                );
                let sent = retrier.nack(m, 1, "second failure").expect("nack");
                assert!(sent.topic.starts_with("%DLQ%"), "{sent:?}");
                retried.set(retried.get() + 1);
                dead_letters += 1;
                return;
            }
            firsts.set(firsts.get() + 1);
            match m.offset % 10 {
                1 => {
                    scheduled.insert((m.queue, m.offset), now_ms());
                    let sent = retrier.nack(m, 3, "later").expect("nack");
                    assert!(sent.topic.starts_with("%RETRY%"), "{sent:?}");
                }
                2 => {
                    dead.insert((m.queue, m.offset));
                    retrier.nack(m, 1, "first failure").expect("nack");
                }
                _ => retrier.ack(m),
            }
        },
        || {
            firsts.get() == N
                && retried.get() == produced.iter().filter(|(_, o)| o % 10 == 2).count()
        },
    );
    assert!(dead_letters > 0);
    retrier.commit().expect("commit");
    drop(retrier);

    let before = Before {
        produced,
        ends,
        half: committed(&admin, HALF),
        retrier: committed(&admin, RETRY),
        scheduled,
        dlq: read_topic(addr, &format!("%DLQ%{RETRY}")),
        retry_topic: read_topic(addr, &format!("%RETRY%{RETRY}")),
    };
    // The set-up did what the checks assume.
    for q in 0..QUEUES {
        let key = (TOPIC.to_string(), q);
        assert_eq!(
            before.half[&key],
            Some(before.ends[&q] / 2),
            "{:?}",
            before.half
        );
        assert_eq!(
            before.retrier[&key],
            Some(before.ends[&q]),
            "{:?}",
            before.retrier
        );
    }
    assert_eq!(before.dlq.len(), dead.len(), "{:?}", before.dlq);
    assert_eq!(
        before.retry_topic.len(),
        dead.len(),
        "only the level-1 retries are delivered yet"
    );
    let due = before.scheduled.values().min().copied().unwrap_or(0) + LEVEL3_MS;
    assert!(
        now_ms() < due,
        "the set-up took so long that the level-3 retries are due"
    );
    eprintln!(
        "set up: {N} messages, {} scheduled at level 3, {} dead letters, {} ms before the first is due",
        before.scheduled.len(),
        before.dlq.len(),
        due - now_ms()
    );
    before
}

/// Checks the broker at `addr` (restarted or promoted) against `before`.
fn check_after(addr: &str, before: &Before) {
    let admin = Admin::connect(addr).expect("admin");
    assert_eq!(
        committed(&admin, HALF),
        before.half,
        "group half's committed offsets"
    );
    assert_eq!(
        committed(&admin, RETRY),
        before.retrier,
        "group retrier's committed offsets"
    );
    assert_eq!(
        read_topic(addr, &format!("%DLQ%{RETRY}")),
        before.dlq,
        "the dead-letter queue"
    );

    // The scheduled retries arrive, each once and not before it is due, and nothing else does.
    let retrier = GroupConsumer::join(addr, GroupConfig::new(RETRY, &[TOPIC])).expect("join");
    let got: std::cell::RefCell<BTreeMap<(u32, u64), usize>> = Default::default();
    let last_due = before.scheduled.values().max().copied().unwrap_or(0) + LEVEL3_MS;
    let quiet_until = Instant::now()
        + Duration::from_millis(last_due.saturating_sub(now_ms()))
        + Duration::from_secs(2);
    poll_until(
        &retrier,
        Duration::from_secs(30),
        "the scheduled retries arrive",
        |m| {
            let key = (m.queue, m.offset);
            let Some(nacked_at) = before.scheduled.get(&key) else {
                panic!("group retrier got {m:?}, which it had committed or sent to the DLQ");
            };
            assert!(
                now_ms() >= nacked_at + LEVEL3_MS,
                "{key:?} arrived {} ms early",
                nacked_at + LEVEL3_MS - now_ms()
            );
            assert_eq!(m.reconsume_times, 1, "{m:?}");
            assert!(m.source.0.starts_with("%RETRY%"), "{m:?}");
            *got.borrow_mut().entry(key).or_default() += 1;
            retrier.ack(m);
        },
        // Past the last due time and a little more, so a doubled delivery would show.
        || got.borrow().len() == before.scheduled.len() && Instant::now() >= quiet_until,
    );
    let got = got.into_inner();
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "retries delivered twice: {twice:?}");
    retrier.close().expect("close");
    let retry_topic = read_topic(addr, &format!("%RETRY%{RETRY}"));
    assert_eq!(
        retry_topic.len(),
        before.retry_topic.len() + before.scheduled.len(),
        "%RETRY% holds the level-1 retries of before and each level-3 one once"
    );
    for old in &before.retry_topic {
        assert!(retry_topic.contains(old), "{old:?} lost from %RETRY%");
    }

    // Group half, joining again, reads exactly what it had not committed.
    let half = GroupConsumer::join(addr, GroupConfig::new(HALF, &[TOPIC])).expect("join");
    let expect: BTreeSet<(u32, u64)> = before
        .produced
        .iter()
        .filter(|(q, o)| *o >= before.ends[q] / 2)
        .copied()
        .collect();
    let seen: std::cell::RefCell<BTreeMap<(u32, u64), usize>> = Default::default();
    let settle = std::cell::Cell::new(None::<Instant>);
    poll_until(
        &half,
        Duration::from_secs(20),
        "group half reads its uncommitted half",
        |m| {
            *seen.borrow_mut().entry((m.queue, m.offset)).or_default() += 1;
            half.ack(m);
        },
        || {
            if seen.borrow().len() < expect.len() {
                return false;
            }
            // Everything expected came: a little longer, so an extra message would show.
            let at = *settle
                .get()
                .get_or_insert_with(|| Instant::now() + Duration::from_millis(700));
            settle.set(Some(at));
            Instant::now() >= at
        },
    );
    let seen = seen.into_inner();
    let keys: BTreeSet<(u32, u64)> = seen.keys().copied().collect();
    assert_eq!(
        keys, expect,
        "group half after the restart reads only what it had not committed"
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "a message delivered twice: {seen:?}"
    );
    half.close().expect("close");
    eprintln!(
        "checked: offsets of 2 groups, {} dead letters, {} scheduled retries each once and on time, {} uncommitted re-read",
        before.dlq.len(),
        got.len(),
        expect.len()
    );
}

/// How many `groups-snapshot` files (one per shard that compacted `%SYS%GROUPS`) are under
/// `dir`: whether a restart loads from a snapshot or from the oldest record.
fn snapshot_files(dir: &Path) -> usize {
    fn walk(dir: &Path, n: &mut usize) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, n);
            } else if p.file_name().is_some_and(|f| f == "groups-snapshot") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

#[test]
fn kill_9_of_the_broker_keeps_offsets_retry_schedule_and_dlq_exactly() {
    let _watchdog = watchdog(Duration::from_secs(90));
    let tmp = common::data_dir();
    let cores = shards().to_string();
    let flags = ["--flush-mode", "sync_flush"];
    let broker = BrokerProcess::start(tmp.path(), &cores, &flags);
    let before = set_up_groups(broker.addr());
    broker.kill9();
    eprintln!(
        "killed; {} shard(s) had written a groups snapshot",
        snapshot_files(tmp.path())
    );
    let broker = BrokerProcess::start(tmp.path(), &cores, &flags);
    check_after(broker.addr(), &before);
}

#[test]
fn sync_master_failover_keeps_offsets_retries_and_dlq() {
    let _watchdog = watchdog(Duration::from_secs(90));
    let (mdir, sdir) = (common::data_dir(), common::data_dir());
    // One shard each, on cores of their own. The peer answers nothing (the slave dials the
    // master, not the other way), so the master is forced to start as master.
    let master = BrokerProcess::start(
        mdir.path(),
        "0,",
        &[
            "--replication",
            "sync_master",
            "--replica-ack",
            "durable",
            "--peer",
            "127.0.0.1:1",
            "--force-master",
        ],
    );
    let slave = BrokerProcess::start(
        sdir.path(),
        if common::available_cores() > 1 {
            "1,"
        } else {
            "0,"
        },
        &["--role", "slave", "--master", master.addr()],
    );
    common::wait_caught_up(
        &Admin::connect(master.addr()).unwrap(),
        Duration::from_secs(20),
    );
    let before = set_up_groups(master.addr());
    // No wait for the slave here: SYNC_MASTER acked every commit and send-back only once the
    // slave had it durable.
    master.kill9();
    let epoch = Admin::connect(slave.addr())
        .unwrap()
        .promote()
        .expect("promote");
    eprintln!("slave promoted, epoch {epoch}");
    check_after(slave.addr(), &before);
}

/// A line `ringmq consume --group --print-offsets` printed, as (queue, offset, body).
fn parse_line(line: &str) -> (u32, u64, String) {
    let (head, body) = line
        .split_once('\t')
        .unwrap_or_else(|| panic!("line {line:?}"));
    let (q, o) = head
        .split_once(' ')
        .unwrap_or_else(|| panic!("line {line:?}"));
    (q.parse().unwrap(), o.parse().unwrap(), body.to_string())
}

/// The next line ended by a newline, without it; `None` at the end (a line cut by the kill,
/// without its newline, was not printed whole).
fn whole_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(_) if line.ends_with('\n') => {
            line.pop();
            Some(line)
        }
        _ => None,
    }
}

/// Spawns `ringmq consume --group cli --print-offsets` on `addr` with its stdout piped.
fn spawn_group_cli(addr: &str, extra: &[&str]) -> Child {
    let child = Command::new(BIN)
        .args([
            "consume", "--broker", addr, "--topic", "stream", "--group", "cli",
        ])
        .args(["--print-offsets", "--session-timeout-ms", "1500"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringmq consume");
    LIVE.lock().unwrap().push(child.id());
    child
}

#[test]
fn a_consumer_killed_mid_stream_gets_only_its_uncommitted_messages_again() {
    /// Messages printed and committed before the kill.
    const EARLY: u64 = 400;
    /// All messages; those after EARLY, in batches of 100 per queue with bodies of about 100
    /// bytes, so one queue's fetch prints far more than a pipe holds.
    const M: u64 = 8400;
    const KILL_AFTER: usize = 500;
    let _watchdog = watchdog(Duration::from_secs(90));
    let tmp = common::data_dir();
    let broker = BrokerProcess::start(
        tmp.path(),
        &shards().to_string(),
        &["--flush-mode", "sync_flush"],
    );
    let addr = broker.addr().to_string();
    let admin = Admin::connect(&addr).unwrap();
    admin.create_topic("stream", QUEUES).unwrap();
    admin.create_group("cli", 16, 0).unwrap();
    let producer = Producer::connect(&addr).expect("producer");
    let mut stored: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut produce = |from: u64, to: u64, pad: &str| {
        for b in (from..to).step_by(100) {
            let bodies: Vec<String> = (b..(b + 100).min(to))
                .map(|i| format!("s-{i}{pad}"))
                .collect();
            let batch: Vec<Message> = bodies
                .iter()
                .map(|s| Message::new(s.clone().into_bytes()))
                .collect();
            let r = producer
                .send_batch("stream", QueueSelector::RoundRobin, &batch)
                .expect("send");
            for (k, body) in bodies.into_iter().enumerate() {
                stored.insert((r.queue, r.offset + k as u64), body);
            }
        }
    };

    // First a part that the consumer prints and commits.
    produce(0, EARLY, "");
    let mut first = spawn_group_cli(&addr, &[]);
    let mut out = BufReader::new(first.stdout.take().unwrap());
    let mut printed_first = Vec::new();
    while printed_first.len() < EARLY as usize {
        let line = whole_line(&mut out).expect("the consumer prints");
        printed_first.push(parse_line(&line));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = committed(&admin, "cli");
        let done: u64 = (0..QUEUES)
            .filter_map(|q| c.get(&("stream".to_string(), q)).copied().flatten())
            .sum();
        if done == EARLY {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer never committed what it printed: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then a backlog with long bodies: the test reads KILL_AFTER more lines and stops reading,
    // so the consumer blocks on the full pipe in the middle of printing a batch it has neither
    // acked nor committed, and dies there.
    produce(EARLY, M, &"x".repeat(96));
    while printed_first.len() < EARLY as usize + KILL_AFTER {
        let line = whole_line(&mut out).expect("the consumer prints");
        printed_first.push(parse_line(&line));
    }
    std::thread::sleep(Duration::from_millis(300));
    sigkill(&mut first);
    // What it printed before it died is still in the pipe.
    while let Some(line) = whole_line(&mut out) {
        printed_first.push(parse_line(&line));
    }

    // The dead member's session ends; then nobody holds a queue and the offsets stand.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !admin.describe_group("cli").unwrap().members.is_empty() {
        assert!(Instant::now() < deadline, "the killed member never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    let committed = committed(&admin, "cli");
    let cli_committed = |q: u32| committed.get(&("stream".to_string(), q)).copied().flatten();
    let window = printed_first
        .iter()
        .filter(|(q, o, _)| cli_committed(*q).map_or(true, |c| *o >= c))
        .count();

    let mut second = spawn_group_cli(&addr, &["--exit-at-end"]);
    let stdout = second.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut printed_second = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => printed_second.push(parse_line(&line)),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                sigkill(&mut second);
                panic!("the restarted consumer did not finish within 30 s");
            }
        }
    }
    let status = second.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err);
    assert!(
        status.success(),
        "the restarted consumer exited with {status}: {err}"
    );

    let mut times: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for (q, o, body) in printed_first.iter().chain(&printed_second) {
        assert_eq!(
            stored.get(&(*q, *o)),
            Some(body),
            "{q}/{o} printed with another body"
        );
        *times.entry((*q, *o)).or_default() += 1;
    }
    let missing: Vec<_> = stored.keys().filter(|k| !times.contains_key(k)).collect();
    let twice = times.values().filter(|n| **n == 2).count();
    let more = times.values().filter(|n| **n > 2).count();
    eprintln!(
        "killed after {} lines; committed {committed:?}; uncommitted window {window}; \
         {twice} printed twice, {} missing; second run printed {}",
        printed_first.len(),
        missing.len(),
        printed_second.len()
    );
    assert!(missing.is_empty(), "never printed (a gap): {missing:?}");
    assert_eq!(more, 0, "a message printed more than twice");
    assert!(
        window > 0,
        "the kill came when everything printed was committed"
    );
    assert_eq!(
        twice, window,
        "printed twice = printed before the kill and not committed"
    );
    // The second run starts exactly at each queue's committed offset.
    for q in 0..QUEUES {
        let resumed = printed_second.iter().find(|l| l.0 == q).map(|l| l.1);
        let c = cli_committed(q);
        assert!(
            resumed.is_none() || resumed == c.or(Some(0)),
            "queue {q}: resumed at {resumed:?}, committed {c:?}"
        );
    }
    drop(broker);
}
