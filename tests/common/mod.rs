//! Helpers shared by the integration tests: a temp dir on the real disk, an embedded broker
//! on it ([`TestBroker`]: start, create a topic, stop, restart or reopen on the same dir), the
//! one executor helper for async storage tests ([`on_executor`]), a small real file system on a
//! loop device for disk-full tests ([`loopfs`]), two hosts on one machine ([`netns`]),
//! broker processes on loopback for crash drills ([`process`]), and real etcd clusters for
//! the cluster tests ([`etcd`]).
#![allow(dead_code)]

pub mod etcd;
pub mod loopfs;
pub mod netns;
pub mod process;
pub mod tcp_proxy;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringmq::client::{Admin, Consumer};
use ringmq::config::{Config, CoreSelection, MetricsListen};
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
    let mut cfg = Config::default();
    cfg.server.data_dir = dir.to_path_buf();
    cfg.server.port = 0;
    // Off: tests run side by side and would all want the default metrics port.
    cfg.server.metrics_listen = MetricsListen::Off;
    cfg.server.cores = CoreSelection::Count(available_cores().min(2));
    cfg.server.partial_frame_timeout_ms = 300;
    cfg.storage.segment_bytes = 32 << 20;
    cfg
}

pub fn available_cores() -> usize {
    core_affinity::get_core_ids()
        .map(|c| c.len())
        .unwrap_or(1)
        .max(1)
}

/// Runs `f` to completion on a fresh glommio executor thread and re-raises its panic: the one
/// way a test runs async storage code. A fresh thread each call also means a fresh glommio
/// io-poll probe cache (NOTES.md), which some tests rely on.
pub fn on_executor<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .expect("start a glommio executor")
        .join()
        .expect("the test's executor panicked");
}

/// An embedded broker on 127.0.0.1 (free ports) over a data dir it owns; stopped on drop.
/// It keeps its config, so a restart comes back the same way on the same dir.
pub struct TestBroker {
    pub broker: Option<Broker>,
    /// The config it (re)starts with; `server.data_dir` is [`TestBroker::dir`].
    pub config: Config,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestBroker {
    /// A broker with [`test_config`] on a fresh temp dir.
    pub fn start() -> TestBroker {
        let tmp = data_dir();
        let cfg = test_config(tmp.path());
        Self::start_with(cfg, tmp)
    }

    /// A broker with `cfg`, whose data dir is (inside) `tmp`; `tmp` lives as long as it.
    pub fn start_with(cfg: Config, tmp: tempfile::TempDir) -> TestBroker {
        let dir = cfg.server.data_dir.clone();
        let broker = Broker::start(cfg.clone()).expect("broker starts");
        TestBroker {
            broker: Some(broker),
            config: cfg,
            dir,
            _tmp: Some(tmp),
        }
    }

    pub fn addr(&self) -> String {
        self.broker.as_ref().expect("running").address().to_string()
    }

    pub fn shard_addrs(&self) -> Vec<String> {
        self.broker
            .as_ref()
            .expect("running")
            .addresses()
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Creates `topic` with `queues` queues (through shard 0), panicking on refusal.
    pub fn create_topic(&self, topic: &str, queues: u32) {
        Admin::connect(&self.addr())
            .expect("connect")
            .create_topic(topic, queues)
            .expect("create topic");
    }

    /// Stops the broker cleanly (flush, close), keeping the data dir. Does nothing if it is
    /// not running.
    pub fn stop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.stop().expect("clean stop");
        }
    }

    /// Stops the broker (if running) and starts a new one with the same config on the same
    /// data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.broker = Some(Broker::start(self.config.clone()).expect("broker restarts"));
    }

    /// Stops the broker (if running) and starts one with `cfg` on the same data dir
    /// (`cfg.server.data_dir` is set to it); `cfg` is kept for later restarts.
    pub fn reopen_as(&mut self, mut cfg: Config) {
        cfg.server.data_dir = self.dir.clone();
        self.config = cfg;
        self.restart();
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

/// A free TCP port on 127.0.0.1 (for a broker that must listen on a known port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `done` every 50 ms; panics naming `what` if it is not true within `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One message to `queue` of `topic`, sent straight to `addr` as a raw Produce (no route
/// asked, no retry), saying the client has seen `known_epoch`.
pub fn produce_one(
    addr: &str,
    topic: &str,
    queue: u32,
    known_epoch: u64,
) -> Result<(), ringmq::client::ClientError> {
    use ringmq::format::batch::{BatchBuilder, Message};
    use ringmq::protocol::{ProduceRequest, Request};
    let mut body = bytes::BytesMut::new();
    BatchBuilder::new(&mut body)
        .push(&Message::new(&b"m"[..]))
        .unwrap();
    let request = Request::Produce(ProduceRequest {
        topic: topic.into(),
        queue: Some(queue),
        producer_id: 0,
        producer_epoch: 0,
        base_sequence: 0,
        message_count: 1,
        timeout_ms: 5000,
        known_epoch,
        delay: None,
        transaction: None,
    });
    let conn =
        ringmq::client::connection::Connection::connect_timeout(addr, Duration::from_secs(2))?;
    conn.call(&request, body.freeze(), Duration::from_secs(10))
        .map(|_| ())
}
