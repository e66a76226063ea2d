//! `ringmq-bench storage`: the storage engine alone against the raw disk floor, in one run on
//! the same file system, all inside one glommio executor pinned to CPU 0 (load generator and
//! storage share that core).
//!
//! Cases: (a) raw floor — 4 KiB O_DIRECT pwrite + fdatasync into an already written file, and
//! 1 MiB O_DIRECT sequential writes with several in flight; (b) SYNC_FLUSH appends of 256 B and
//! 1 KiB records with 1/8/64/256 concurrent appenders (append + wait_durable, closed loop);
//! (c) ASYNC_FLUSH 1 KiB appends, with segments prepared as the broker does by default
//! (fallocated), with written zeros (the SYNC_FLUSH default), and recycled (retention dropping
//! every sealed segment as soon as it is durable, so new segments are the dropped ones: the
//! steady state of a log at its retention bound), so the cost of the zeros and of the extent
//! conversion to the bandwidth shows in one run. Latencies in µs with HdrHistogram.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Args;
use glommio::io::{DmaFile, OpenOptions};
use hdrhistogram::Histogram;
use ringmq::format::batch::{BatchBuilder, Message, MIN_MESSAGE_BYTES};
use ringmq::format::record::HEADER_BYTES;
use ringmq::storage::{AppendRequest, FlushMode, SegmentPrepare, ShardStore, StorageConfig};

#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// Directory for the bench files (default: a new directory under the current one; it must
    /// not be tmpfs). Removed afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds per case.
    #[arg(long, default_value_t = 3)]
    pub duration_secs: u64,
    /// Short run: 1 s per case, fewer cases.
    #[arg(long)]
    pub quick: bool,
    /// Only the bandwidth cases: raw sequential writes and the ASYNC_FLUSH ones, each round
    /// in that order (the disk's speed drifts: compare within a round).
    #[arg(long)]
    pub bandwidth_only: bool,
    /// Rounds of the bandwidth cases (each row's ratio is to its own round's raw case).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Record size of the ASYNC_FLUSH cases, in bytes: 1 KiB records keep the one appender's
    /// core busy (about 1 µs each) before the disk is; larger ones (a producer's batch)
    /// measure the disk.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..=4_194_304))]
    pub async_record_bytes: u64,
}

const TOPIC: &str = "bench";
const FLOOR_FILE_BYTES: u64 = 64 << 20;
const SEQ_FILE_BYTES: u64 = 1 << 30;
const SEQ_WRITE_BYTES: usize = 1 << 20;
const SEQ_IN_FLIGHT: usize = 16;
/// The raw rows' names (the table's ratios find them by these).
const FLOOR_CASE: &str = "raw 4 KiB pwrite+fdatasync";
const SEQ_CASE: &str = "raw O_DIRECT 1 MiB seq write";

struct Row {
    case: String,
    appends_per_s: f64,
    mb_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    fsyncs_per_s: f64,
    appends_per_fsync: f64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

pub fn run(args: StorageArgs) -> Result<(), String> {
    let secs = if args.quick {
        1
    } else {
        args.duration_secs.max(1)
    };
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()
            .map_err(|e| e.to_string())?
            .join(format!("ringmq-bench-storage-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (quick, bandwidth_only, rounds) = (args.quick, args.bandwidth_only, args.rounds);
    let async_bytes = args.async_record_bytes as usize;
    let d2 = dir.clone();
    let result = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(0))
        .name("bench-storage")
        .spawn(move || async move {
            run_cases(
                &d2,
                Duration::from_secs(secs),
                quick,
                bandwidth_only,
                rounds,
                async_bytes,
            )
            .await
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    print_table(&rows, secs);
    Ok(())
}

async fn run_cases(
    dir: &Path,
    dur: Duration,
    quick: bool,
    bandwidth_only: bool,
    rounds: u32,
    async_bytes: usize,
) -> Result<Vec<Row>, String> {
    ringmq::storage::prime_dma_probe(dir)
        .await
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    if bandwidth_only {
        for round in 1..=rounds {
            eprintln!("round {round} of {rounds}: raw sequential 1 MiB x {SEQ_IN_FLIGHT} ...");
            rows.push(raw_seq(dir, dur).await?);
            async_cases(dir, dur, async_bytes, &mut rows).await?;
        }
        return Ok(rows);
    }
    eprintln!("raw floor: 4 KiB write + fdatasync ...");
    rows.push(raw_floor(dir, dur).await?);
    eprintln!("raw sequential 1 MiB x {SEQ_IN_FLIGHT} in flight ...");
    rows.push(raw_seq(dir, dur).await?);
    let sizes: &[usize] = if quick { &[1024] } else { &[256, 1024] };
    let concs: &[u32] = if quick { &[1, 64] } else { &[1, 8, 64, 256] };
    for &size in sizes {
        for &c in concs {
            eprintln!("SYNC_FLUSH {size} B x {c} appenders ...");
            rows.push(
                appends(
                    dir,
                    FlushMode::SyncFlush,
                    SegmentPrepare::Auto,
                    false,
                    size,
                    c,
                    dur,
                )
                .await?,
            );
        }
    }
    async_cases(dir, dur, async_bytes, &mut rows).await?;
    Ok(rows)
}

/// The ASYNC_FLUSH bandwidth cases: fallocated, zeroed and recycled segments.
async fn async_cases(
    dir: &Path,
    dur: Duration,
    record_bytes: usize,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    for (prepare, recycle) in [
        (SegmentPrepare::Auto, false),
        (SegmentPrepare::Zero, false),
        (SegmentPrepare::Auto, true),
    ] {
        let how = if recycle { ", recycled" } else { "" };
        eprintln!("ASYNC_FLUSH {record_bytes} B, segment_prepare {prepare}{how} ...");
        rows.push(
            appends(
                dir,
                FlushMode::AsyncFlush,
                prepare,
                recycle,
                record_bytes,
                1,
                dur,
            )
            .await?,
        );
    }
    Ok(())
}

async fn prepared_file(path: &Path, bytes: u64) -> Result<Rc<DmaFile>, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(path)
        .await
        .map_err(|e| e.to_string())?;
    let f = Rc::new(f);
    let mut pos = 0;
    while pos < bytes {
        let mut batch = Vec::new();
        for _ in 0..SEQ_IN_FLIGHT {
            if pos >= bytes {
                break;
            }
            let mut b = f.alloc_dma_buffer(SEQ_WRITE_BYTES);
            b.as_bytes_mut().fill(0);
            let f = f.clone();
            let at = pos;
            batch.push(async move { f.write_at(b, at).await });
            pos += SEQ_WRITE_BYTES as u64;
        }
        for r in futures::future::join_all(batch).await {
            r.map_err(|e| e.to_string())?;
        }
    }
    f.fdatasync().await.map_err(|e| e.to_string())?;
    Ok(f)
}

async fn raw_floor(dir: &Path, dur: Duration) -> Result<Row, String> {
    let path = dir.join("floor");
    let f = prepared_file(&path, FLOOR_FILE_BYTES).await?;
    let mut h = hist();
    let start = Instant::now();
    let mut pos = 0u64;
    let mut n = 0u64;
    while start.elapsed() < dur {
        let t = Instant::now();
        let mut b = f.alloc_dma_buffer(4096);
        b.as_bytes_mut().fill(n as u8);
        f.write_at(b, pos).await.map_err(|e| e.to_string())?;
        f.fdatasync().await.map_err(|e| e.to_string())?;
        h.record(t.elapsed().as_micros().max(1) as u64).ok();
        pos = (pos + 4096) % FLOOR_FILE_BYTES;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(Row {
        case: format!("{FLOOR_CASE} (floor)"),
        appends_per_s: n as f64 / secs,
        mb_per_s: n as f64 * 4096.0 / secs / 1e6,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        fsyncs_per_s: n as f64 / secs,
        appends_per_fsync: 1.0,
    })
}

async fn raw_seq(dir: &Path, dur: Duration) -> Result<Row, String> {
    let path = dir.join("seq");
    let f = Rc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&path)
            .await
            .map_err(|e| e.to_string())?,
    );
    let written = Rc::new(RefCell::new(0u64));
    let next = Rc::new(RefCell::new(0u64));
    let h = Rc::new(RefCell::new(hist()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..SEQ_IN_FLIGHT {
        let (f, written, next, h) = (f.clone(), written.clone(), next.clone(), h.clone());
        tasks.push(glommio::spawn_local(async move {
            while start.elapsed() < dur {
                let pos = {
                    let mut n = next.borrow_mut();
                    let p = *n;
                    *n = (p + SEQ_WRITE_BYTES as u64) % SEQ_FILE_BYTES;
                    p
                };
                let mut b = f.alloc_dma_buffer(SEQ_WRITE_BYTES);
                b.as_bytes_mut().fill(1);
                let t = Instant::now();
                f.write_at(b, pos).await.map_err(|e| e.to_string())?;
                h.borrow_mut()
                    .record(t.elapsed().as_micros().max(1) as u64)
                    .ok();
                *written.borrow_mut() += SEQ_WRITE_BYTES as u64;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await?;
    }
    f.fdatasync().await.map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let bytes = *written.borrow() as f64;
    let h = h.borrow();
    let _ = std::fs::remove_file(&path);
    Ok(Row {
        case: format!("{SEQ_CASE} x{SEQ_IN_FLIGHT} (bandwidth floor)"),
        appends_per_s: bytes / SEQ_WRITE_BYTES as f64 / secs,
        mb_per_s: bytes / secs / 1e6,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        fsyncs_per_s: 1.0 / secs,
        appends_per_fsync: 0.0,
    })
}

/// A batch body of one message sized so that the whole record is `record_bytes`.
fn body_for(record_bytes: usize) -> Vec<u8> {
    let overhead = HEADER_BYTES + TOPIC.len() + MIN_MESSAGE_BYTES;
    let mut b = BytesMut::with_capacity(record_bytes);
    let payload = vec![0xAB; record_bytes.saturating_sub(overhead)];
    BatchBuilder::new(&mut b)
        .push(&Message::new(payload))
        .expect("a bench payload fits the batch format");
    b.to_vec()
}

/// Recycled segments kept by the recycling case (`recycle_segments`), and made before it
/// measures: dropped as soon as they are durable, they come back while it runs.
const RECYCLED_POOL: u32 = 3;

#[allow(clippy::too_many_arguments)]
async fn appends(
    dir: &Path,
    mode: FlushMode,
    prepare: SegmentPrepare,
    recycle: bool,
    record_bytes: usize,
    appenders: u32,
    dur: Duration,
) -> Result<Row, String> {
    let case_dir = dir.join(format!(
        "{mode}-{prepare}-{record_bytes}-{appenders}{}",
        if recycle { "-recycled" } else { "" }
    ));
    let cfg = StorageConfig {
        flush_mode: mode,
        segment_prepare: prepare,
        recycle_segments: if recycle { RECYCLED_POOL } else { 0 },
        ..StorageConfig::default()
    };
    let segment_bytes = cfg.segment_bytes;
    let (store, _) = ShardStore::open(&case_dir, cfg)
        .await
        .map_err(|e| e.to_string())?;
    let body = Rc::new(body_for(record_bytes));
    let mut retention = None;
    if recycle {
        // Fill the pool: write the pool's worth of segments and more, drop them.
        eprintln!("  writing {RECYCLED_POOL} segments to recycle ...");
        let target = (u64::from(RECYCLED_POOL) + 1) * segment_bytes;
        while store.watermarks().appended.0 < target {
            store
                .append(AppendRequest {
                    topic: TOPIC,
                    queue_id: 0,
                    message_count: 1,
                    producer: None,
                    body: &body,
                })
                .await
                .map_err(|e| e.to_string())?;
            glommio::yield_if_needed().await;
        }
        let upto = store.watermarks().appended;
        store.wait_durable(upto).await.map_err(|e| e.to_string())?;
        store
            .drop_segments_before(ringmq::storage::LogPosition(u64::MAX))
            .map_err(|e| e.to_string())?;
        glommio::timer::sleep(Duration::from_millis(200)).await;
        // Retention at its bound: every sealed segment goes once it is durable.
        let s = store.clone();
        retention = Some(glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(5)).await;
                if s.drop_segments_before(ringmq::storage::LogPosition(u64::MAX))
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    // Steady state: the next segment was prepared long ago; do not measure its preparation.
    store.wait_spare_segment().await;
    let recycled_before = store.metrics().segments_recycled;
    let h = Rc::new(RefCell::new(hist()));
    let count = Rc::new(RefCell::new(0u64));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for q in 0..appenders {
        let (s, body, h, count) = (store.clone(), body.clone(), h.clone(), count.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut i = 0u64;
            while start.elapsed() < dur {
                let t = Instant::now();
                let a = s
                    .append(AppendRequest {
                        topic: TOPIC,
                        queue_id: q % 8,
                        message_count: 1,
                        producer: None,
                        body: &body,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                if mode == FlushMode::SyncFlush {
                    s.wait_durable(a.end).await.map_err(|e| e.to_string())?;
                } else if i % 256 == 0 {
                    glommio::yield_if_needed().await;
                }
                h.borrow_mut()
                    .record(t.elapsed().as_micros().max(1) as u64)
                    .ok();
                *count.borrow_mut() += 1;
                i += 1;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await?;
    }
    if let Some(r) = retention {
        r.cancel().await;
    }
    // ASYNC: the bytes count once they are durable, so the final flush is inside the timing.
    store.close().await.map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let m = store.metrics();
    let recycled = m.segments_recycled - recycled_before;
    drop(store);
    let _ = std::fs::remove_dir_all(&case_dir);
    let n = *count.borrow() as f64;
    let h = h.borrow();
    let label = match mode {
        FlushMode::SyncFlush => format!("SYNC_FLUSH {record_bytes} B x {appenders} appenders"),
        FlushMode::AsyncFlush => {
            let how = if recycle {
                format!("recycled segments ({recycled} while measured)")
            } else if prepare.allocates(mode) {
                "fallocated segments".to_string()
            } else {
                "zeroed segments".to_string()
            };
            format!("ASYNC_FLUSH {record_bytes} B x {appenders} appender, {how}")
        }
    };
    Ok(Row {
        case: label,
        appends_per_s: n / secs,
        mb_per_s: n * record_bytes as f64 / secs / 1e6,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        fsyncs_per_s: m.fsyncs as f64 / secs,
        appends_per_fsync: m.appends_per_fsync(),
    })
}

fn print_table(rows: &[Row], secs: u64) {
    println!(
        "\nstorage bench: {secs} s per case, one glommio executor pinned to CPU 0 (appenders and storage share it)\n"
    );
    println!("| case | appends/s | MB/s | p50 µs | p99 µs | p99.9 µs | fsyncs/s | appends/fsync | p50 / floor p50 | MB/s / raw seq |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // Each ratio is to the latest raw row above it (with --rounds: its own round's).
    let (mut floor, mut seq): (Option<&Row>, Option<&Row>) = (None, None);
    let ratio =
        |x: f64, base: Option<f64>| base.map_or("-".to_string(), |b| format!("{:.2}", x / b));
    for r in rows {
        if r.case.starts_with(FLOOR_CASE) {
            floor = Some(r);
        } else if r.case.starts_with(SEQ_CASE) {
            seq = Some(r);
        }
        println!(
            "| {} | {:.0} | {:.1} | {} | {} | {} | {:.0} | {:.1} | {} | {} |",
            r.case,
            r.appends_per_s,
            r.mb_per_s,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.fsyncs_per_s,
            r.appends_per_fsync,
            ratio(r.p50_us as f64, floor.map(|f| f.p50_us.max(1) as f64)),
            ratio(r.mb_per_s, seq.map(|s| s.mb_per_s.max(1e-9))),
        );
    }
}
