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
        let mut child = Command::new(BIN)
            .args(["broker", "--port", "0", "--segment-bytes", "33554432"])
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
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let shards = common::available_cores().min(2);
        let mut addrs = Vec::new();
        while addrs.len() < shards {
            addrs.push(
                rx.recv_timeout(Duration::from_secs(30))
                    .expect("broker prints its addresses"),
            );
        }
        BrokerProcess { child, addrs }
    }

    fn kill9(mut self) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
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
    let broker = BrokerProcess::start(dir, "sync_flush");
    let consumer = Consumer::connect(&broker.addrs[0]).unwrap();
    let queues = Admin::connect(&broker.addrs[0])
        .unwrap()
        .route("t")
        .unwrap()
        .queues
        .len() as u32;
    let mut stored: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut payload_count: BTreeMap<String, usize> = BTreeMap::new();
    for q in 0..queues {
        let mut offset = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let f = consumer.fetch("t", q, offset, Duration::ZERO).unwrap();
            for m in f.messages {
                let p = String::from_utf8(m.payload.to_vec()).unwrap();
                *payload_count.entry(p.clone()).or_default() += 1;
                stored.insert((q, m.offset), p);
            }
            offset = f.next_offset;
            if offset >= f.end_offset || Instant::now() > deadline {
                break;
            }
        }
    }
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
    broker.stop();
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
