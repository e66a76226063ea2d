//! Issue 11 item 8: a long pipelined `ringmq produce --mode async` must finish.
//!
//! 1.1 GB of 1000-byte lines through the CLI into a one-shard ASYNC_FLUSH broker with 64 MiB
//! segments (17 segment rolls) on a fresh data dir. Before the fix, appends waiting for room
//! in the log (writes in flight at their cap, the next segment still being prepared) could be
//! overtaken by a later batch of the same producer and queue; the broker answered that batch
//! with a sequence error, and the producer, with ~1000 batches in flight, went into a cascade
//! of out-of-order retries: acks stopped after 0.06–0.45 GB, and the CLI hung or failed with
//! OUT_OF_ORDER_SEQUENCE.
//!
//! Takes ~15–40 s in a debug build on the project's VM (release: ~9 s).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringmq::client::Admin;
use ringmq::config::{Config, CoreSelection};
use ringmq::storage::FlushMode;

const BIN: &str = env!("CARGO_BIN_EXE_ringmq");
const LINES: u64 = 1_100_000;
const LINE_BYTES: usize = 1000;
const SEGMENT_BYTES: u64 = 64 << 20;

#[test]
fn a_long_pipelined_cli_produce_over_many_segment_rolls_finishes_with_every_line_acked() {
    let tmp = common::data_dir();
    let mut cfg = Config::default();
    cfg.server.data_dir = tmp.path().to_path_buf();
    cfg.server.port = 0;
    cfg.server.metrics_listen = ringmq::config::MetricsListen::Off;
    // One shard: the producer's ~1000 batches in flight all meet at one log.
    cfg.server.cores = CoreSelection::Count(1);
    cfg.storage.flush_mode = FlushMode::AsyncFlush;
    cfg.storage.segment_bytes = SEGMENT_BYTES;
    let dir = cfg.server.data_dir.clone();
    let broker = common::TestBroker::start_with(cfg, tmp);
    broker.create_topic("t", 8);
    let started = Instant::now();
    let mut producer = Command::new(BIN)
        .args(["produce", "--topic", "t", "--mode", "async", "--print-acks"])
        .args(["--broker", &broker.addr()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn producer");
    let mut stdin = std::io::BufWriter::new(producer.stdin.take().unwrap());
    let feeder = std::thread::spawn(move || {
        let pad = vec![b'x'; LINE_BYTES];
        for i in 1..=LINES {
            let head = format!("line-{i}-");
            let ok = stdin
                .write_all(head.as_bytes())
                .and_then(|_| stdin.write_all(&pad[..LINE_BYTES - head.len()]))
                .and_then(|_| stdin.write_all(b"\n"));
            if ok.is_err() {
                return;
            }
        }
    });
    // Acks are counted on a thread, so a stall shows as "no ack for 30 s", not a hung test.
    let (tx, rx) = mpsc::channel::<u64>();
    let stdout = producer.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let n: u64 = line
                .split(' ')
                .nth(1)
                .and_then(|kv| kv.strip_prefix("line="))
                .and_then(|n| n.parse().ok())
                .expect("ack line=N ...");
            if tx.send(n).is_err() {
                return;
            }
        }
    });
    let mut seen = vec![false; LINES as usize + 1];
    let mut acks = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(n) => {
                assert!(!seen[n as usize], "line {n} acked twice");
                seen[n as usize] = true;
                acks += 1;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = producer.kill();
                let _ = producer.wait();
                panic!(
                    "no ack for 30 s after {acks} acks ({:.2} GB): the produce stalled",
                    (acks * LINE_BYTES as u64) as f64 / 1e9
                );
            }
        }
    }
    let status = producer.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut producer.stderr.take().unwrap(), &mut err);
    let _ = feeder.join();
    let elapsed = started.elapsed();
    assert!(status.success(), "the producer failed: {err}");
    assert_eq!(acks, LINES, "every line acked");
    // Under ASYNC_FLUSH the acked tail becomes visible once the flusher has synced it.
    let admin = Admin::connect(&broker.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored: u64 = admin
            .queue_stats("t")
            .unwrap()
            .iter()
            .map(|s| s.end_offset - s.min_offset)
            .sum();
        assert!(
            stored <= LINES,
            "{stored} messages stored for {LINES} lines"
        );
        if stored == LINES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {stored} of {LINES} lines visible 30 s after the last ack"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let segments = std::fs::read_dir(dir.join("shard-0").join("commitlog"))
        .unwrap()
        .count();
    assert!(segments >= 16, "only {segments} segment(s): too few rolls");
    eprintln!(
        "long produce: {LINES} lines of {LINE_BYTES} B ({:.2} GB) in {elapsed:?}, {segments} segment files",
        (LINES * LINE_BYTES as u64) as f64 / 1e9
    );
}
