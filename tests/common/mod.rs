//! Helpers shared by the integration tests: an embedded broker on a temp dir on the real disk.
#![allow(dead_code)]

pub mod netns;

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use ringmq::client::{Admin, Consumer};
use ringmq::config::{Config, CoreSelection};
use ringmq::server::Broker;

/// A temp dir under cargo's target dir: on the project's disk, never tmpfs.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ringmq-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir")
}

/// A config for tests: free ports, two shards, small segments, short timeouts.
pub fn test_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        port: 0,
        cores: CoreSelection::Count(available_cores().min(2)),
        segment_bytes: 32 << 20,
        partial_frame_timeout_ms: 300,
        ..Config::default()
    }
}

pub fn available_cores() -> usize {
    core_affinity::get_core_ids()
        .map(|c| c.len())
        .unwrap_or(1)
        .max(1)
}

pub struct TestBroker {
    pub broker: Option<Broker>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestBroker {
    pub fn start() -> TestBroker {
        let tmp = data_dir();
        let dir = tmp.path().to_path_buf();
        let broker = Broker::start(test_config(&dir)).expect("broker starts");
        TestBroker {
            broker: Some(broker),
            dir,
            _tmp: Some(tmp),
        }
    }

    pub fn start_with(cfg: Config, tmp: tempfile::TempDir) -> TestBroker {
        let dir = cfg.data_dir.clone();
        let broker = Broker::start(cfg).expect("broker starts");
        TestBroker {
            broker: Some(broker),
            dir,
            _tmp: Some(tmp),
        }
    }

    pub fn addr(&self) -> String {
        self.broker.as_ref().unwrap().address().to_string()
    }

    pub fn shard_addrs(&self) -> Vec<String> {
        self.broker
            .as_ref()
            .unwrap()
            .addresses()
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Stops the broker, keeping the data dir, and starts a new one on it.
    pub fn restart(&mut self) {
        self.broker.take().unwrap().stop().expect("clean stop");
        let broker = Broker::start(test_config(&self.dir)).expect("broker restarts");
        self.broker = Some(broker);
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(b) = self.broker.take() {
            let _ = b.stop();
        }
    }
}

/// Every visible message of `topic` (all `queues`) as (queue, offset, payload), queue by queue.
pub fn read_all(consumer: &Consumer, topic: &str, queues: u32) -> Vec<(u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for q in 0..queues {
        let mut offset = 0;
        loop {
            let f = consumer
                .fetch(topic, q, offset, Duration::ZERO)
                .expect("fetch");
            if f.messages.is_empty() {
                break;
            }
            for m in f.messages {
                out.push((q, m.offset, m.payload.to_vec()));
            }
            offset = f.next_offset;
        }
    }
    out
}

/// Waits until every shard of the master behind `master` streams to a slave that has its
/// whole log.
pub fn wait_caught_up(master: &Admin, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let stats = master.broker_stats().expect("broker stats");
        if stats
            .iter()
            .all(|s| s.replication.link == 2 && s.replication.lag_bytes == 0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the slave never caught up: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Aborts the whole test binary (after killing the brokers it started) if the returned guard
/// is still alive after `limit`: a hung drill must fail, not stall CI until its time limit.
#[must_use = "the watchdog stops when the guard is dropped"]
pub fn watchdog(limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let test = std::thread::current().name().unwrap_or("?").to_string();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!(
                "watchdog: {test} still running after {limit:?}; killing its brokers, aborting"
            );
            netns::kill_all_brokers();
            std::process::abort();
        }
    });
    tx
}
