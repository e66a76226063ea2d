//! A full disk, for real: an ext4 file system of 300 MiB on a loop device (`common::loopfs`)
//! holds the data dir, and a filler file next to it takes the space away and gives it back.
//!
//! - SYNC producers fill it: DISK_FULL (retriable), every acked message readable, reads keep
//!   working, and once the filler is deleted writes resume by themselves, without a restart;
//!   the broker then stops cleanly.
//! - The same under ASYNC_FLUSH with a pipelined producer: every failed message reports
//!   DISK_FULL, a clean stop and a restart (on the still full disk) keep every acked message.
//! - A start on a full disk fails in one line and leaves nothing behind.
//! - `disk_reject_ratio` set low: DISK_FULL naming the usage and the threshold, until usage
//!   drops.
//! - A write refused with ENOSPC (which ext4 never does into a prepared segment, so this one
//!   runs on the simulated disk): its bytes are kept, retried and flushed once space is back.
//!
//! Where a loop device cannot be made the tests print SKIP (a failure under `CI=true`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmq::client::{ClientError, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::config::{Config, CoreSelection};
use ringmq::format::batch::Message;
use ringmq::protocol::ErrorCode;
use ringmq::server::Broker;
use ringmq::storage::sim::SimBackend;
use ringmq::storage::{AppendRequest, FlushMode, ShardStore, StorageConfig, StorageError};

use common::loopfs::{skip, LoopFs};
use common::{on_executor, read_all};

const TOPIC: &str = "fill";
const QUEUES: u32 = 2;
const SEGMENT_BYTES: u64 = 16 << 20;
const PAYLOAD_BYTES: usize = 64 << 10;

/// A payload that says which message it is, every byte of it.
fn payload(id: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD_BYTES];
    p[..8].copy_from_slice(&id.to_le_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = (id as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    p
}

fn id_of(p: &[u8]) -> u64 {
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

fn config(data_dir: &Path, mode: FlushMode) -> Config {
    let mut cfg = Config::default();
    cfg.server.data_dir = data_dir.to_path_buf();
    cfg.server.port = 0;
    cfg.server.cores = CoreSelection::Count(1);
    cfg.storage.segment_bytes = SEGMENT_BYTES;
    cfg.storage.flush_mode = mode;
    cfg.storage.flush_interval_ms = 20;
    // Only the device's ENOSPC here; the watermark has its own test.
    cfg.storage.disk_reject_ratio = 1.0;
    cfg
}

fn producer(addr: &str, retries: u32) -> Producer {
    let mut pc = ProducerConfig::new(addr);
    pc.retries = retries;
    pc.retry_backoff = Duration::from_millis(10);
    pc.retry_backoff_max = Duration::from_millis(50);
    Producer::with_config(pc).expect("producer")
}

/// Segment files and `.tmp` files under `dir`.
fn files_under(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

/// Waits until the shard has its active segment and a prepared spare (nothing being written),
/// so that the filler takes exactly the space the test means it to.
fn wait_for_spare(data_dir: &Path) {
    let log = data_dir.join("shard-0").join("commitlog");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let segments = std::fs::read_dir(&log)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().len() == 20)
            .count();
        if segments >= 2 && files_under(&log, ".tmp").is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "no spare segment in {log:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every acked id is stored once, intact, at the offset its ack named.
fn check_acked(addr: &str, acked: &BTreeMap<u64, (u32, u64)>) {
    let consumer = Consumer::connect(addr).expect("consumer");
    let stored = read_all(&consumer, TOPIC, QUEUES);
    let mut seen: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
    for (q, off, p) in &stored {
        let id = id_of(p);
        assert_eq!(*p, payload(id), "message {id} at {q}/{off} is damaged");
        assert!(seen.insert(id, (*q, *off)).is_none(), "message {id} twice");
    }
    for (id, at) in acked {
        assert_eq!(
            seen.get(id),
            Some(at),
            "acked message {id} ({at:?}) is missing"
        );
    }
}

/// SYNC sends of new ids until one fails; returns that error. Acked ids go into `acked`.
fn send_until_refused(
    p: &Producer,
    next_id: &mut u64,
    acked: &mut BTreeMap<u64, (u32, u64)>,
    max: u64,
) -> Option<ClientError> {
    for _ in 0..max {
        let id = *next_id;
        *next_id += 1;
        match p.send(TOPIC, QueueSelector::RoundRobin, &Message::new(payload(id))) {
            Ok(r) => {
                acked.insert(id, (r.queue, r.offset));
            }
            Err(e) => return Some(e),
        }
    }
    None
}

fn assert_disk_full(e: &ClientError) {
    assert_eq!(e.code(), Some(ErrorCode::DiskFull), "{e}");
    assert!(e.is_retriable(), "DISK_FULL must be retriable: {e}");
}

/// Sends until one is acked, for up to `within`; the error of the last try otherwise.
fn wait_writable(addr: &str, within: Duration) -> Result<Duration, ClientError> {
    let p = producer(addr, 0);
    let started = Instant::now();
    loop {
        match p.send(
            TOPIC,
            QueueSelector::Queue(0),
            &Message::new(payload(u64::MAX)),
        ) {
            Ok(_) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() > within => return Err(e),
            Err(e) => assert_disk_full(&e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sync_producers_get_disk_full_and_writes_resume_by_themselves_once_space_is_freed() {
    let fs = match LoopFs::new(300) {
        Ok(fs) => fs,
        Err(why) => return skip("sync_disk_full", &why),
    };
    let data = fs.mount.join("data");
    let broker = Broker::start(config(&data, FlushMode::SyncFlush)).expect("broker starts");
    let addr = broker.address().to_string();
    ringmq::client::Admin::connect(&addr)
        .unwrap()
        .create_topic(TOPIC, QUEUES)
        .unwrap();
    wait_for_spare(&data);
    // Room for one more segment, not two.
    let filler = fs.mount.join("filler");
    fs.fill(&filler, SEGMENT_BYTES + (4 << 20));

    let p = producer(&addr, 0);
    let (mut next_id, mut acked) = (0u64, BTreeMap::new());
    let e =
        send_until_refused(&p, &mut next_id, &mut acked, 10_000).expect("the disk never filled up");
    assert_disk_full(&e);
    assert!(e.to_string().contains("disk full"), "{e}");
    assert!(
        acked.len() > 400,
        "only {} acked before DISK_FULL",
        acked.len()
    );
    // Still refused, not poisoned into STORAGE_ERROR; reads keep working meanwhile.
    let again = send_until_refused(&p, &mut next_id, &mut acked, 1).expect("still full");
    assert_disk_full(&again);
    check_acked(&addr, &acked);

    std::fs::remove_file(&filler).unwrap();
    let took = wait_writable(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("writes did not resume after space was freed: {e}"));
    eprintln!("writes resumed {took:?} after the filler was deleted");
    assert!(
        send_until_refused(&p, &mut next_id, &mut acked, 100).is_none(),
        "writes after the space came back"
    );
    check_acked(&addr, &acked);
    broker.stop().expect("a clean stop after the disk was full");
}

/// A `ringmq broker` process, SIGKILLed on drop if the test did not stop it (so the loop file
/// system can be unmounted on a failure).
struct BrokerProcess(Option<std::process::Child>);

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_broker_process_that_hit_enospc_exits_0_on_sigterm() {
    use std::io::BufRead;
    let fs = match LoopFs::new(300) {
        Ok(fs) => fs,
        Err(why) => return skip("sigterm_after_enospc", &why),
    };
    let data = fs.mount.join("data");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args([
            "broker",
            "--port",
            "0",
            "--cores",
            "1",
            "--metrics-listen",
            "off",
        ])
        .args(["--segment-bytes", &SEGMENT_BYTES.to_string()])
        .args(["--disk-reject-ratio", "1.0"])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ringmq broker");
    let stderr = child.stderr.take().unwrap();
    let mut proc = BrokerProcess(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("shard 0 listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
            eprintln!("broker: {line}");
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the broker did not print its address");
    ringmq::client::Admin::connect(&addr)
        .unwrap()
        .create_topic(TOPIC, QUEUES)
        .unwrap();
    wait_for_spare(&data);
    fs.fill(&fs.mount.join("filler"), SEGMENT_BYTES + (4 << 20));
    let p = producer(&addr, 0);
    let (mut next_id, mut acked) = (0u64, BTreeMap::new());
    let e = send_until_refused(&p, &mut next_id, &mut acked, 10_000).expect("never full");
    assert_disk_full(&e);
    drop(p);
    let mut child = proc.0.take().unwrap();
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM after ENOSPC: {status}");
}

#[test]
fn async_flush_keeps_every_acked_message_across_a_full_disk_and_a_restart() {
    let fs = match LoopFs::new(300) {
        Ok(fs) => fs,
        Err(why) => return skip("async_disk_full", &why),
    };
    let data = fs.mount.join("data");
    let cfg = config(&data, FlushMode::AsyncFlush);
    let broker = Broker::start(cfg.clone()).expect("broker starts");
    let addr = broker.address().to_string();
    ringmq::client::Admin::connect(&addr)
        .unwrap()
        .create_topic(TOPIC, QUEUES)
        .unwrap();
    wait_for_spare(&data);
    let filler = fs.mount.join("filler");
    fs.fill(&filler, SEGMENT_BYTES + (4 << 20));

    // Pipelined: many batches in flight, one retry round.
    type Outcomes = Arc<Mutex<Vec<(u64, Result<(u32, u64), ClientError>)>>>;
    let outcomes: Outcomes = Arc::new(Mutex::new(Vec::new()));
    let p = producer(&addr, 1);
    for id in 0..1500u64 {
        let out = outcomes.clone();
        p.send_async(
            TOPIC,
            QueueSelector::RoundRobin,
            &Message::new(payload(id)),
            move |r| {
                out.lock()
                    .unwrap()
                    .push((id, r.map(|r| (r.queue, r.offset))))
            },
        )
        .unwrap();
    }
    p.flush();
    let mut acked = BTreeMap::new();
    let mut failures = Vec::new();
    for (id, r) in outcomes.lock().unwrap().drain(..) {
        match r {
            Ok(at) => {
                acked.insert(id, at);
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(!failures.is_empty(), "the disk never filled up");
    assert!(acked.len() > 400, "only {} acked", acked.len());
    // Nothing acked from memory is lost: readable now, after a clean stop, and after a
    // restart on the still full disk (it starts: its segments exist).
    check_acked(&addr, &acked);
    broker
        .stop()
        .expect("a clean stop: everything acked was written");
    let broker = Broker::start(cfg.clone()).expect("restart on a full disk");
    let addr = broker.address().to_string();
    check_acked(&addr, &acked);
    // Every failed message names the cause, not a sequence error behind it.
    for e in &failures {
        assert_disk_full(e);
    }
    let mut next_id = 10_000;
    let e = send_until_refused(&producer(&addr, 0), &mut next_id, &mut acked, 1)
        .expect("still full after the restart");
    assert_disk_full(&e);

    std::fs::remove_file(&filler).unwrap();
    wait_writable(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("writes did not resume after space was freed: {e}"));
    let p = producer(&addr, 0);
    assert!(send_until_refused(&p, &mut next_id, &mut acked, 100).is_none());
    drop(p);
    broker.stop().expect("clean stop");
    let broker = Broker::start(cfg).expect("restart");
    check_acked(&broker.address().to_string(), &acked);
    broker.stop().unwrap();
}

#[test]
fn a_start_on_a_full_disk_fails_in_one_line_and_leaves_nothing_behind() {
    let fs = match LoopFs::new(300) {
        Ok(fs) => fs,
        Err(why) => return skip("start_on_full_disk", &why),
    };
    let data = fs.mount.join("data");
    let filler = fs.mount.join("filler");
    fs.fill(&filler, 40 << 20);
    let before = fs.available_bytes();

    // 40 MiB free, 64 MiB segments: the first segment cannot be prepared; never "ready".
    let mut cfg = config(&data, FlushMode::SyncFlush);
    cfg.storage.segment_bytes = 64 << 20;
    let e = Broker::start(cfg.clone())
        .err()
        .expect("a broker started without room for its first segment")
        .to_string();
    eprintln!("start with 40 MiB free: {e}");
    assert!(
        files_under(&data, ".tmp").is_empty(),
        "a .tmp was left behind"
    );
    assert!(
        fs.available_bytes() + (1 << 20) >= before,
        "the failed start kept space: {} free before, {} after",
        before,
        fs.available_bytes()
    );
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(e.contains("disk full") && e.contains("free"), "{e}");
    assert!(e.contains("segment_bytes"), "says what to change: {e}");

    // The default 1 GiB segment on a 300 MiB file system: the same, at once.
    cfg.storage.segment_bytes = 1 << 30;
    let e = Broker::start(cfg.clone())
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("disk full") && !e.contains('\n'), "{e}");
    assert!(files_under(&data, ".tmp").is_empty());

    // Nothing free at all: the start-up O_DIRECT probe meets ENOSPC and says the file system
    // is full, not "tmpfs or no O_DIRECT" (the dir exists, so the probe is what fails).
    let data2 = fs.mount.join("data2");
    std::fs::create_dir(&data2).unwrap();
    fs.fill(&filler, 0);
    let e = Broker::start(config(&data2, FlushMode::SyncFlush))
        .err()
        .expect("refused")
        .to_string();
    eprintln!("start with nothing free: {e}");
    assert!(
        e.contains("the data dir's file system is full (") && e.contains("bytes free)"),
        "{e}"
    );
    assert!(!e.contains("tmpfs") && !e.contains('\n'), "{e}");
}

#[test]
fn above_disk_reject_ratio_produces_get_disk_full_naming_usage_and_threshold() {
    let fs = match LoopFs::new(300) {
        Ok(fs) => fs,
        Err(why) => return skip("disk_reject_ratio", &why),
    };
    let data = fs.mount.join("data");
    let mut cfg = config(&data, FlushMode::SyncFlush);
    cfg.storage.disk_reject_ratio = 0.5;
    let broker = Broker::start(cfg).expect("broker starts");
    let addr = broker.address().to_string();
    ringmq::client::Admin::connect(&addr)
        .unwrap()
        .create_topic(TOPIC, QUEUES)
        .unwrap();
    wait_for_spare(&data);
    assert!(fs.used_ratio() < 0.5, "{}", fs.used_ratio());
    wait_writable(&addr, Duration::from_secs(5)).expect("writable below the ratio");

    // Up to 60 %: above the threshold, with plenty of bytes still free.
    let filler = fs.mount.join("filler");
    let s = ringmq::storage::space::fs_space(&fs.mount).unwrap();
    let total = s.used_bytes + s.available_bytes;
    fs.fill(&filler, total * 4 / 10);
    assert!(fs.used_ratio() > 0.55, "{}", fs.used_ratio());
    let p = producer(&addr, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let e = loop {
        match p.send(TOPIC, QueueSelector::Queue(1), &Message::new(payload(1))) {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "never refused above the ratio"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_disk_full(&e);
    let msg = e.to_string();
    eprintln!("above the ratio: {msg}");
    assert!(
        msg.contains("disk usage") && msg.contains("disk_reject_ratio 50.0 %"),
        "{msg}"
    );

    std::fs::remove_file(&filler).unwrap();
    let took = wait_writable(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("still refused below the ratio: {e}"));
    eprintln!("writes resumed {took:?} after usage dropped");
    broker.stop().unwrap();
}

fn sim_cfg(mode: FlushMode) -> StorageConfig {
    StorageConfig {
        segment_bytes: 1 << 20,
        flush_mode: mode,
        flush_interval_ms: 10,
        flush_timeout_ms: 300,
        write_buffer_bytes: 64 * 1024,
        ..StorageConfig::default()
    }
}

fn req(body: &[u8]) -> AppendRequest<'_> {
    AppendRequest {
        topic: "t",
        queue_id: 0,
        message_count: 1,
        producer: None,
        body,
    }
}

/// Bodies the store holds in queue t/0, in order.
async fn bodies(s: &ShardStore<SimBackend>) -> Vec<Vec<u8>> {
    let b = s
        .read("t", 0, ringmq::storage::QueueOffset(0), 1 << 20)
        .await
        .unwrap();
    ringmq::format::record::RecordIter::new(&b.records)
        .map(|r| r.unwrap().body.to_vec())
        .collect()
}

#[test]
fn async_bytes_whose_write_hit_enospc_are_kept_retried_and_flushed_once_space_is_back() {
    on_executor(|| async {
        let sim = SimBackend::new();
        let dir = Path::new("/sim/shard-0");
        let (s, _) = ShardStore::open_with(sim.clone(), dir, sim_cfg(FlushMode::AsyncFlush))
            .await
            .unwrap();
        s.wait_spare_segment().await;
        sim.set_full(true);
        // Acked from memory (ASYNC_FLUSH): the append returned.
        let mut ends = Vec::new();
        for i in 0..20u8 {
            ends.push(s.append(req(&[i; 3000])).await.unwrap().end);
        }
        glommio::timer::sleep(Duration::from_millis(200)).await;
        assert!(!s.metrics().poisoned, "ENOSPC on a write poisoned the log");
        assert!(s.metrics().unflushed_bytes > 0);
        // The unflushed window cannot drain: new writes are refused.
        let e = s.append(req(b"more")).await.unwrap_err();
        assert!(matches!(e, StorageError::DiskFull { .. }), "{e}");
        assert!(s.disk_full().is_some());

        sim.set_full(false);
        glommio::timer::timeout(Duration::from_secs(5), async {
            Ok(s.wait_durable(*ends.last().unwrap()).await)
        })
        .await
        .expect("held-back bytes not flushed within 5 s of space coming back")
        .expect("flushed");
        assert!(s.disk_full().is_none());
        s.append(req(b"after")).await.expect("writable again");
        s.close().await.expect("clean close");

        // Power loss after the close: everything acked is on the durable image.
        sim.crash(7);
        let (s, _) = ShardStore::open_with(sim.clone(), dir, sim_cfg(FlushMode::AsyncFlush))
            .await
            .unwrap();
        let got = bodies(&s).await;
        let want: Vec<Vec<u8>> = (0..20u8)
            .map(|i| vec![i; 3000])
            .chain([b"after".to_vec()])
            .collect();
        assert_eq!(got, want);

        // A close while the disk stays full: under ASYNC_FLUSH it says acked bytes are lost.
        sim.set_full(true);
        s.append(req(b"lost")).await.unwrap();
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let e = s.close().await.unwrap_err();
        assert!(
            matches!(e, StorageError::DiskFull { ref reason } if reason.contains("ASYNC_FLUSH")),
            "{e}"
        );
    });
}

#[test]
fn under_sync_flush_a_close_with_writes_held_back_by_a_full_disk_is_clean() {
    on_executor(|| async {
        let sim = SimBackend::new();
        let dir = Path::new("/sim/shard-0");
        let (s, _) = ShardStore::open_with(sim.clone(), dir, sim_cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        let a = s.append(req(b"acked")).await.unwrap();
        s.wait_durable(a.end).await.unwrap();
        sim.set_full(true);
        let b = s.append(req(b"never acked")).await.unwrap();
        let w = glommio::timer::timeout(Duration::from_millis(300), async {
            Ok(s.wait_durable(b.end).await)
        })
        .await;
        assert!(w.is_err(), "acked a write the disk refused");
        // Nothing acked is missing: the close is clean.
        s.close().await.expect("clean close");
        sim.crash(3);
        let (s, _) = ShardStore::open_with(sim.clone(), dir, sim_cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        assert_eq!(bodies(&s).await[0], b"acked".to_vec());
    });
}
