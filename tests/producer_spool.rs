//! The producer's local spool against real broker processes and real files: nothing acked
//! or spooled is lost, nothing is stored twice, and each queue keeps its order, across a
//! broker that is down, a producer SIGKILLed while spooling and while draining, a torn or
//! corrupt spool tail, and a full spool.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::BrokerProcess;
use ringmq::client::{
    Admin, ClientError, Consumer, Producer, ProducerConfig, QueueSelector, SendOutcome, SpoolConfig,
};
use ringmq::format::batch::Message;

const TOPIC: &str = "spooled";
const QUEUES: u32 = 4;

/// Two consecutive free ports on 127.0.0.1 (a broker of two shards listens on both).
fn free_ports() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two free consecutive ports");
}

fn shards() -> String {
    common::available_cores().min(2).to_string()
}

fn start_broker(dir: &Path, port: u16) -> BrokerProcess {
    BrokerProcess::start_on_port(dir, &shards(), port, &[], &[])
}

/// `ringmq produce --spool` over `lines`; returns its output.
fn produce(
    port: u16,
    spool: &Path,
    lines: &[String],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args([
            "produce",
            "--topic",
            TOPIC,
            "--print-acks",
            "--retries",
            "1",
        ])
        .args(["--broker", &format!("127.0.0.1:{port}")])
        .arg("--spool")
        .arg(spool)
        .args(extra)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn produce");
    let mut stdin = child.stdin.take().unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().expect("wait produce");
    writer.join().unwrap();
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `acked=N spooled=M spool_pending=P` summary.
fn summary(o: &Output) -> (u64, u64, u64) {
    let err = stderr(o);
    let line = err
        .lines()
        .find(|l| l.starts_with("produce: acked="))
        .unwrap_or_else(|| panic!("no summary in:\n{err}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .parse()
            .unwrap()
    };
    (field("acked="), field("spooled="), field("spool_pending="))
}

fn lines(run: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{run}-{i:05}")).collect()
}

fn create_topic(addr: &str) {
    Admin::connect(addr)
        .unwrap()
        .create_topic(TOPIC, QUEUES)
        .unwrap();
}

/// Every message of the topic, per queue in offset order.
fn stored(addr: &str) -> BTreeMap<u32, Vec<String>> {
    let consumer = Consumer::connect(addr).unwrap();
    let mut out = BTreeMap::new();
    for (q, _, payload) in common::read_all(&consumer, TOPIC, QUEUES) {
        out.entry(q)
            .or_insert_with(Vec::new)
            .push(String::from_utf8(payload).unwrap());
    }
    out
}

/// Checks the safety properties and returns how often each message is stored: nothing
/// twice, nothing outside `expected` (no garbage), every `required` one present, and each
/// queue in the order the messages were given (`expected` order).
fn check_exactly_once(
    stored: &BTreeMap<u32, Vec<String>>,
    expected: &[String],
    required: &[String],
) {
    let rank: HashMap<&str, usize> = expected
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (q, msgs) in stored {
        let mut last = None;
        for m in msgs {
            let r = *rank
                .get(m.as_str())
                .unwrap_or_else(|| panic!("queue {q} holds {m:?}, which was never sent"));
            *seen.entry(m.as_str()).or_default() += 1;
            assert!(
                last.map_or(true, |l| l < r),
                "queue {q} is out of order: {m} after {}",
                expected[last.unwrap()]
            );
            last = Some(r);
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "stored more than once: {dups:?}");
    let missing: Vec<_> = required
        .iter()
        .filter(|l| !seen.contains_key(l.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "lost: {} line(s), first {:?}",
        missing.len(),
        missing.first()
    );
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn spool_dir(tmp: &Path) -> PathBuf {
    tmp.join("spool")
}

#[test]
fn broker_down_everything_spools_then_every_message_arrives_once_in_order() {
    let tmp = common::data_dir();
    let port = free_ports();
    let spool = spool_dir(tmp.path());
    let first = lines("a", 300);
    let out = produce(port, &spool, &first, &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&out), (0, 300, 300), "{}", stderr(&out));

    let broker = start_broker(&tmp.path().join("broker"), port);
    create_topic(broker.addr());
    // The next run drains first, then sends its own lines live.
    let second = lines("b", 50);
    let out = produce(port, &spool, &second, &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("re-sent 300"), "{}", stderr(&out));
    assert_eq!(summary(&out), (50, 0, 0), "{}", stderr(&out));
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let s = stored(broker.addr());
    check_exactly_once(&s, &all, &all);
    assert_eq!(s.values().map(Vec::len).sum::<usize>(), 350);
    assert!(
        s.len() > 1,
        "round robin spread the spooled lines over queues: {s:?}"
    );
}

#[test]
fn the_library_spools_without_a_broker_and_drains_in_the_background() {
    let tmp = common::data_dir();
    let port = free_ports();
    let mut config = ProducerConfig::new(format!("127.0.0.1:{port}"));
    config.retries = 1;
    config.spool = Some(SpoolConfig::new(spool_dir(tmp.path())));
    let producer = Producer::with_config(config).expect("starts with no broker");
    let sent = lines("lib", 100);
    for (i, l) in sent.iter().enumerate() {
        let m = Message::new(l.clone().into_bytes());
        match producer.send_or_spool(TOPIC, QueueSelector::Queue(i as u32 % QUEUES), &m) {
            Ok(SendOutcome::Spooled(_)) => {}
            other => panic!("line {i}: {other:?}"),
        }
    }
    assert_eq!(producer.spool_pending(), 100);
    assert!(matches!(
        producer.send(TOPIC, QueueSelector::RoundRobin, &Message::new("x")),
        Err(ClientError::InvalidArgument(_))
    ));
    let broker = start_broker(&tmp.path().join("broker"), port);
    create_topic(broker.addr());
    assert!(
        wait_until(Duration::from_secs(30), || producer.spool_pending() == 0),
        "the background drain did not empty the spool: {} left",
        producer.spool_pending()
    );
    // Live again: acked, after the spooled ones.
    let m = Message::new("live".as_bytes().to_vec());
    assert!(matches!(
        producer.send_or_spool(TOPIC, QueueSelector::Queue(0), &m),
        Ok(SendOutcome::Acked(_))
    ));
    let mut all = sent.clone();
    all.push("live".into());
    check_exactly_once(&stored(broker.addr()), &all, &all);
}

#[test]
fn sigkill_while_spooling_and_while_draining_loses_nothing_and_duplicates_nothing() {
    let tmp = common::data_dir();
    let port = free_ports();
    let spool = spool_dir(tmp.path());

    // 1. Spooling (no broker), SIGKILLed part-way: what it reported spooled must survive.
    let first = lines("k", 2000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args([
            "produce",
            "--topic",
            TOPIC,
            "--print-acks",
            "--retries",
            "1",
        ])
        .args(["--broker", &format!("127.0.0.1:{port}")])
        .arg("--spool")
        .arg(&spool)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text: String = first.iter().map(|l| format!("{l}\n")).collect();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let mut reported = Vec::new();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("spooled line=") {
            let n: usize = rest.split_whitespace().next().unwrap().parse().unwrap();
            reported.push(first[n - 1].clone());
            if reported.len() == 300 {
                // SAFETY: kill with the pid of our own unreaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                break;
            }
        }
    }
    let _ = child.wait();
    let _ = writer.join();
    assert_eq!(
        reported.len(),
        300,
        "the producer reported too few spooled lines"
    );

    // 2. Draining, crashed after the broker stored some entries and before the spool
    // recorded them acked: the restarted drain re-sends those with the same ids.
    let broker = start_broker(&tmp.path().join("broker"), port);
    create_topic(broker.addr());
    let second = lines("l", 20);
    let out = produce(
        port,
        &spool,
        &second,
        &[],
        &[("RINGMQ_SPOOL_FAILPOINT", "drain-abort-after-acks=100")],
    );
    assert!(
        !out.status.success(),
        "the failpoint did not fire: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("failpoint"), "{}", stderr(&out));
    let partial = stored(broker.addr()).values().map(Vec::len).sum::<usize>();
    assert!(partial >= 100, "the crashed drain had stored {partial}");

    // 3. A drain SIGKILLed at a random point.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["produce", "--topic", TOPIC, "--retries", "1"])
        .args(["--broker", &format!("127.0.0.1:{port}")])
        .arg("--spool")
        .arg(&spool)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();

    // 4. A clean run finishes the job.
    let third = lines("m", 20);
    let out = produce(port, &spool, &third, &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&out), (20, 0, 0), "{}", stderr(&out));
    let expected: Vec<String> = first.iter().chain(&second).chain(&third).cloned().collect();
    let required: Vec<String> = reported.iter().chain(&third).cloned().collect();
    let s = stored(broker.addr());
    eprintln!(
        "stored {} message(s) for {} reported spooled",
        s.values().map(Vec::len).sum::<usize>(),
        reported.len()
    );
    check_exactly_once(&s, &expected, &required);
}

/// The newest spool segment file.
fn newest_segment(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect();
    v.sort();
    v.pop().expect("a spool segment")
}

#[test]
fn a_corrupt_spool_tail_is_detected_by_crc_truncated_and_never_resent() {
    let tmp = common::data_dir();
    let port = free_ports();
    let spool = spool_dir(tmp.path());
    let sent = lines("c", 10);
    let out = produce(port, &spool, &sent, &["--queue", "0"], &[]);
    assert_eq!(summary(&out), (0, 10, 10), "{}", stderr(&out));
    let seg = newest_segment(&spool);
    let len = std::fs::metadata(&seg).unwrap().len();
    // A flipped byte inside the last entry's message, then a torn append after it.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"X", len - 3).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9]).unwrap();
    drop(f);

    let broker = start_broker(&tmp.path().join("broker"), port);
    create_topic(broker.addr());
    let out = produce(port, &spool, &[], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("CRC mismatch") && err.contains("truncating"),
        "{err}"
    );
    assert!(err.contains("re-sent 9"), "{err}");
    let s = stored(broker.addr());
    check_exactly_once(&s, &sent, &sent[..9]);
    assert_eq!(s.values().map(Vec::len).sum::<usize>(), 9, "{s:?}");
}

#[test]
fn a_full_spool_fails_with_spool_full_naming_size_and_dir() {
    let tmp = common::data_dir();
    let port = free_ports();
    let spool = spool_dir(tmp.path());
    let sent = lines("f", 100);
    let out = produce(port, &spool, &sent, &["--spool-max-bytes", "2000"], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is full") && err.contains("2000") && err.contains(&*spool.to_string_lossy()),
        "{err}"
    );
    let spooled = err
        .lines()
        .find_map(|l| l.strip_prefix("produce: acked=0 spooled="))
        .and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(spooled > 0 && spooled < 100, "{err}");
    // What fitted is delivered, once.
    let broker = start_broker(&tmp.path().join("broker"), port);
    create_topic(broker.addr());
    let out = produce(port, &spool, &[], &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stored(broker.addr());
    check_exactly_once(&s, &sent, &sent[..spooled]);
    assert_eq!(s.values().map(Vec::len).sum::<usize>(), spooled);
}

/// Spool append rate (1 and 64 messages per entry) and drain rate, release build:
/// `cargo test --release --test producer_spool -- --ignored --nocapture spool_rates`
#[test]
#[ignore]
fn spool_rates() {
    let tmp = common::data_dir();
    let port = free_ports();
    for per_entry in [1usize, 64] {
        let dir = tmp.path().join(format!("spool-{per_entry}"));
        let entries = if per_entry == 1 { 3000 } else { 1000 };
        let mut config = ProducerConfig::new(format!("127.0.0.1:{port}"));
        config.retries = 0;
        config.spool = Some(SpoolConfig::new(&dir));
        let producer = Producer::with_config(config).unwrap();
        let batch: Vec<Message> = (0..per_entry)
            .map(|i| Message::new(vec![b'x'; 100]).with_key(format!("k{i}")))
            .collect();
        let t = Instant::now();
        for _ in 0..entries {
            match producer.send_batch_or_spool(TOPIC, QueueSelector::RoundRobin, &batch) {
                Ok(SendOutcome::Spooled(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "append, {per_entry} msg(s) of 100 B per entry: {:.0} entries/s, {:.0} msgs/s ({entries} entries in {el:.2} s)",
            entries as f64 / el,
            (entries * per_entry) as f64 / el
        );
        drop(producer);
    }
    let broker = start_broker(&tmp.path().join("broker"), port);
    create_topic(broker.addr());
    for per_entry in [1usize, 64] {
        let dir = tmp.path().join(format!("spool-{per_entry}"));
        let entries = if per_entry == 1 { 3000 } else { 1000 };
        let mut config = ProducerConfig::new(broker.addr());
        config.spool = Some(SpoolConfig::new(&dir));
        let t = Instant::now();
        let producer = Producer::with_config(config).unwrap();
        // The background drain and this loop share the work (one drain at a time).
        while producer.spool_pending() > 0 {
            let _ = producer.drain_spool();
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "drain, {per_entry} msg(s) per entry: {entries} entries in {el:.2} s: {:.0} entries/s, {:.0} msgs/s",
            entries as f64 / el,
            (entries * per_entry) as f64 / el
        );
    }
}
