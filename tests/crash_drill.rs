//! Crash drills with real processes: a broker killed with SIGKILL mid-stream, restarted, and
//! checked for every message a producer saw acknowledged.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringmq::client::{Admin, Consumer};

const BIN: &str = env!("CARGO_BIN_EXE_ringmq");

/// A broker process; its shard addresses come from its stderr.
struct BrokerProcess {
    child: Child,
    addrs: Vec<String>,
}

impl BrokerProcess {
    fn start(dir: &Path, flush_mode: &str) -> BrokerProcess {
        Self::start_on(dir, flush_mode, 0)
    }

    /// `port` 0: any free ports; otherwise shard i listens on `port + i` (a restarted broker
    /// must come back where its producer's routes point).
    fn start_on(dir: &Path, flush_mode: &str, port: u16) -> BrokerProcess {
        let mut child = Command::new(BIN)
            .args([
                "broker",
                "--metrics-listen",
                "off",
                "--port",
                &port.to_string(),
                "--segment-bytes",
                "33554432",
            ])
            .args(["--cores", &common::available_cores().min(2).to_string()])
            .args(["--flush-mode", flush_mode, "--flush-interval-ms", "50"])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn broker");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let shards = common::available_cores().min(2);
        let mut addrs = Vec::new();
        while addrs.len() < shards {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(a) => addrs.push(a),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let ss = Command::new("ss").arg("-tanp").output().ok();
                    let ss = ss
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    let ss: Vec<&str> = ss
                        .lines()
                        .filter(|l| {
                            port != 0
                                && (l.contains(&format!(":{port} "))
                                    || l.contains(&format!(":{} ", port + 1)))
                        })
                        .collect();
                    panic!(
                        "the broker did not print its addresses ({e}); its stderr:\n{}\nsockets:\n{}",
                        log.lock().unwrap().join("\n"),
                        ss.join("\n")
                    );
                }
            }
        }
        BrokerProcess { child, addrs }
    }

    fn kill9(mut self) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGKILL, then wait until its ports can be bound again (as the broker binds them, with
    /// SO_REUSEADDR): the killed process's connections can linger in FIN-WAIT for a moment,
    /// holding the port.
    fn kill9_and_free_ports(self, port: u16, shards: u16) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(60);
        let bindable = |p: u16| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_reuse_address(true).expect("SO_REUSEADDR");
            let addr: std::net::SocketAddr = ([127, 0, 0, 1], p).into();
            s.bind(&addr.into()).is_ok()
        };
        while !(0..shards).all(|i| bindable(port + i)) {
            assert!(
                Instant::now() < deadline,
                "port {port} still taken 60 s after the kill"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    /// A drill that panics must not leave its broker running. After `kill9`/`stop` the child
    /// is reaped and this does nothing.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ringmq produce --print-acks` fed line by line; kills the broker after `kill_after`
/// acks; returns (line, queue, offset) for every ack the producer printed.
fn produce_until_killed(
    broker: BrokerProcess,
    mode: &str,
    kill_after: usize,
) -> Vec<(u64, u32, u64)> {
    let mut producer = Command::new(BIN)
        .args(["produce", "--topic", "t", "--print-acks", "--mode", mode])
        // The broker is not coming back: give up after a few short rounds.
        .args(["--retries", "3"])
        .args(["--broker", &broker.addrs[0]])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn producer");
    let mut stdin = producer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 1..=200_000u64 {
            if writeln!(stdin, "message-{i}").is_err() {
                return;
            }
        }
    });
    let stdout = producer.stdout.take().unwrap();
    let mut acks = Vec::new();
    let mut broker = Some(broker);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let mut it = line
            .split(' ')
            .skip(1)
            .map(|kv| kv.split('=').nth(1).unwrap().parse::<u64>().unwrap());
        let (l, q, o) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        acks.push((l, q as u32, o));
        if acks.len() == kill_after {
            broker.take().unwrap().kill9();
        }
    }
    let status = producer.wait().unwrap();
    if let Some(b) = broker {
        b.stop();
        panic!("the producer finished before {kill_after} acks");
    }
    assert!(
        !status.success(),
        "the producer must report the lost broker"
    );
    let _ = feeder.join();
    acks
}

fn check_every_ack_is_stored_once(dir: &Path, acks: &[(u64, u32, u64)]) {
    let (stored, payload_count) = stored_messages(dir);
    for (line, q, o) in acks {
        let expected = format!("message-{line}");
        assert_eq!(
            stored.get(&(*q, *o)),
            Some(&expected),
            "acked line {line} at {q}/{o}"
        );
        assert_eq!(
            payload_count[&expected], 1,
            "line {line} stored more than once"
        );
    }
}

fn drill(flush_mode: &str, produce_mode: &str) {
    let tmp = common::data_dir();
    let broker = BrokerProcess::start(tmp.path(), flush_mode);
    Admin::connect(&broker.addrs[0])
        .unwrap()
        .create_topic("t", 4)
        .unwrap();
    let acks = produce_until_killed(broker, produce_mode, 2000);
    assert!(acks.len() >= 2000);
    check_every_ack_is_stored_once(tmp.path(), &acks);
}

#[test]
fn sync_flush_loses_no_acked_message_on_sigkill() {
    drill("sync_flush", "sync");
}

#[test]
fn sync_flush_loses_no_acked_message_on_sigkill_with_pipelined_acks() {
    drill("sync_flush", "async");
}

/// A base port with `n` consecutive free ports on 127.0.0.1, below the ephemeral range: a
/// producer redialling a port of that range while no broker listens can be given that very
/// port as its own source port (a TCP self-connect), and the restarted broker then finds it
/// taken. The ports are free now; the broker binds them a moment later.
fn free_ports(n: u16) -> u16 {
    let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let lo = 20_000u16.min(ephemeral_start / 2);
    let span = ephemeral_start.saturating_sub(lo + n).max(1);
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for i in 0..200u64 {
        let base =
            lo + ((seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % u64::from(span)) as u16;
        let all_free = (0..n).all(|k| std::net::TcpListener::bind(("127.0.0.1", base + k)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no {n} consecutive free ports below {ephemeral_start}");
}

/// `message-<line>` at a paced rate, so the producer is mid-stream at every kill.
fn feed_paced(mut stdin: std::process::ChildStdin, lines: u64, per_sec: u64) {
    let start = Instant::now();
    for i in 1..=lines {
        if writeln!(stdin, "message-{i}").is_err() {
            return;
        }
        if i % 1000 == 0 {
            let due = start + Duration::from_secs_f64(i as f64 / per_sec as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Issue 11 item 7: `ringmq produce --mode async` under SYNC_FLUSH while the broker is killed
/// with SIGKILL and restarted, several times. The producer must finish on its own with every
/// line acked exactly once, and every line must be stored once, intact, at its acked offset.
#[test]
fn a_pipelined_producer_rides_through_repeated_sigkills_and_acks_every_line_once() {
    const LINES: u64 = 120_000;
    const ROUNDS: usize = 5;
    let tmp = common::data_dir();
    let shards = common::available_cores().min(2) as u16;
    let port = free_ports(shards);
    let broker = BrokerProcess::start_on(tmp.path(), "sync_flush", port);
    Admin::connect(&broker.addrs[0])
        .unwrap()
        .create_topic("t", 4)
        .unwrap();
    let mut producer = Command::new(BIN)
        .args(["produce", "--topic", "t", "--print-acks", "--mode", "async"])
        .args(["--broker", &broker.addrs[0]])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn producer");
    let stdin = producer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || feed_paced(stdin, LINES, 8_000));
    let (ack_tx, ack_rx) = mpsc::channel::<(u64, u32, u64)>();
    let stdout = producer.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut it = line
                .split(' ')
                .skip(1)
                .map(|kv| kv.split('=').nth(1).unwrap().parse::<u64>().unwrap());
            let (l, q, o) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            if ack_tx.send((l, q as u32, o)).is_err() {
                return;
            }
        }
    });
    let mut acks: Vec<(u64, u32, u64)> = Vec::new();
    let mut broker = Some(broker);
    let mut kills = 0;
    let mut next_kill = LINES as usize / (ROUNDS + 1);
    loop {
        match ack_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => acks.push(a),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = producer.kill();
                let _ = producer.wait();
                panic!(
                    "no ack for 60 s after {} acks and {kills} kills: the producer is stuck",
                    acks.len()
                )
            }
        }
        if kills < ROUNDS && acks.len() >= next_kill {
            broker.take().unwrap().kill9_and_free_ports(port, shards);
            kills += 1;
            next_kill += LINES as usize / (ROUNDS + 1);
            broker = Some(BrokerProcess::start_on(tmp.path(), "sync_flush", port));
        }
    }
    let status = producer.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut producer.stderr.take().unwrap(), &mut err);
    let _ = feeder.join();
    let _ = reader.join();
    broker.take().unwrap().stop();
    assert_eq!(kills, ROUNDS, "the producer finished before every kill");
    assert!(status.success(), "the producer must finish: {err}");
    let mut acked_lines: BTreeMap<u64, usize> = BTreeMap::new();
    for (l, _, _) in &acks {
        *acked_lines.entry(*l).or_default() += 1;
    }
    let twice = acked_lines.values().filter(|n| **n > 1).count();
    eprintln!(
        "drill: {kills} SIGKILL rounds, {} acks for {} distinct lines of {LINES}, {twice} acked twice",
        acks.len(),
        acked_lines.len()
    );
    assert_eq!(twice, 0, "a line acked twice");
    assert_eq!(acked_lines.len() as u64, LINES, "every line acked");
    let (stored, copies) = stored_messages(tmp.path());
    let duplicates = copies.values().filter(|n| **n > 1).count();
    let lost = acks
        .iter()
        .filter(|(l, q, o)| stored.get(&(*q, *o)) != Some(&format!("message-{l}")))
        .count();
    eprintln!(
        "drill: stored {} messages; {lost} acked lines missing or not at their offset, {duplicates} stored twice",
        stored.len()
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicates, 0);
    assert_eq!(stored.len() as u64, LINES);
}

/// Every stored message of topic `t` by (queue, offset), and how often each payload occurs.
fn stored_messages(dir: &Path) -> (BTreeMap<(u32, u64), String>, BTreeMap<String, usize>) {
    let broker = BrokerProcess::start(dir, "sync_flush");
    let consumer = Consumer::connect(&broker.addrs[0]).unwrap();
    let queues = Admin::connect(&broker.addrs[0])
        .unwrap()
        .route("t")
        .unwrap()
        .queues
        .len() as u32;
    let mut stored = BTreeMap::new();
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for (q, offset, payload) in common::read_all(&consumer, "t", queues) {
        let p = String::from_utf8(payload).unwrap();
        *copies.entry(p.clone()).or_default() += 1;
        stored.insert((q, offset), p);
    }
    broker.stop();
    (stored, copies)
}
