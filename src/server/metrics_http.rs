//! The Prometheus endpoint, served off the shards.
//!
//! ```text
//!  shard i (its executor)                         metrics thread (plain std thread)
//!  every PUBLISH_INTERVAL_MS:                     GET /metrics:
//!    broker::metrics::shard_families  ──Arc──▶    slot i (Mutex<Option<Arc<..>>>)  ─┐
//!    (copies of counters, on its thread)                                            ├─ render
//!                                                 statvfs, segment files, oldest  ─┘
//!                                                 record header (std I/O, this thread)
//! ```
//!
//! A shard never waits for a scrape and a scrape never waits for a shard: each shard copies
//! its counters into a snapshot on its own thread and swaps an `Arc` into its slot (the one
//! lock, held for a pointer swap, every [`PUBLISH_INTERVAL_MS`], never on the data path); the
//! HTTP thread clones the `Arc`s and renders. So a scrape shows each shard as of at most
//! [`PUBLISH_INTERVAL_MS`] ago (`ringmq_metrics_snapshot_age_seconds` says how long). What
//! needs file-system calls (disk usage, the segment files, the oldest record's timestamp) is
//! read by the HTTP thread itself, so no shard blocks on it.
//!
//! The responder is a minimal HTTP/1.1 server: one connection at a time, `Connection: close`,
//! a request head of at most [`MAX_REQUEST_HEAD_BYTES`] that must arrive within
//! [`IO_TIMEOUT_MS`]; `GET /metrics` answers the text format, `GET /` a pointer to it, other
//! paths 404, other methods 405. Scrapes are rare (seconds apart), so one thread is enough.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::future;

use crate::broker::Services;
use crate::format::record::{RecordHeader, HEADER_BYTES};
use crate::metrics::{render, Family};
use crate::server::bounds;

/// How often a shard publishes its snapshot: fresh enough for a 1 s scrape interval, and the
/// copy (a few dozen values per topic) costs a shard microseconds twice a second.
pub const PUBLISH_INTERVAL_MS: u64 = 500;
/// Longest request head the responder reads (a scrape's is ~200 bytes).
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// Read and write deadline per connection, so a stalled client cannot hold the thread.
pub const IO_TIMEOUT_MS: u64 = 2_000;
/// How often the accept loop looks at the stop flag.
const STOP_POLL_MS: i32 = 100;

/// One snapshot per shard, published by the shard, read by the HTTP thread.
pub struct MetricsSlots {
    shards: Vec<Mutex<Option<Published>>>,
}

#[derive(Clone)]
struct Published {
    at: Instant,
    families: Arc<Vec<Family>>,
}

impl MetricsSlots {
    pub fn new(shards: usize) -> Arc<MetricsSlots> {
        Arc::new(MetricsSlots {
            shards: (0..shards).map(|_| Mutex::new(None)).collect(),
        })
    }

    fn put(&self, shard: usize, families: Vec<Family>) {
        let published = Published {
            at: Instant::now(),
            families: Arc::new(families),
        };
        if let Some(slot) = self.shards.get(shard) {
            // Poisoning would need a panic while holding a pointer swap; take the value anyway.
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(published);
        }
    }

    fn get(&self, shard: usize) -> Option<Published> {
        self.shards
            .get(shard)
            .and_then(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The shard's side: publishes a snapshot now and every [`PUBLISH_INTERVAL_MS`] until
/// shutdown. `listener` is the shard's client listener, whose connection stats hold the
/// refusals counted there.
pub async fn publish(services: Rc<Services>, slots: Arc<MetricsSlots>, listener: SocketAddr) {
    let ctx = services.shard.clone();
    loop {
        let conn = bounds::stats_of(listener).unwrap_or_default();
        let refusals = [
            ("shard_budget", conn.shard_busy_refusals),
            ("partial_frame_timeout", conn.partial_frame_timeouts),
        ];
        let mut families = crate::broker::metrics::shard_families(&services, &refusals);
        families.push(crate::broker::metrics::group_lag_family(&services).await);
        slots.put(ctx.shard, families);
        let tick = async {
            glommio::timer::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
            false
        };
        let stop = async {
            ctx.shutdown_requested().await;
            true
        };
        if future::or(tick, stop).await {
            return;
        }
    }
}

/// The running endpoint: its thread and its address.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds the endpoint's listener (in the caller's thread, so a busy port fails the start).
    pub fn bind(addr: &str) -> std::io::Result<TcpListener> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Starts the HTTP thread on a listener from [`MetricsServer::bind`].
    pub fn start(
        listener: TcpListener,
        slots: Arc<MetricsSlots>,
        data_dir: PathBuf,
    ) -> std::io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let node = NodeReader {
            data_dir,
            shards: slots.shards.len(),
            oldest: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn({
                let stop = stop.clone();
                move || serve(listener, slots, node, stop)
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread and waits for it (at most one poll interval plus one answer).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve(
    listener: TcpListener,
    slots: Arc<MetricsSlots>,
    mut node: NodeReader,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        let mut fds = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fds, 1, STOP_POLL_MS) };
        if ready <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = answer(stream, &slots, &mut node) {
                    log::debug!("metrics: request from {peer}: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn answer(
    mut stream: TcpStream,
    slots: &MetricsSlots,
    node: &mut NodeReader,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))?;
    stream.set_write_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let text = scrape(slots, node);
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &text,
            )
        }
        ("GET", "/") => respond(
            &mut stream,
            "200 OK",
            "text/plain; charset=utf-8",
            "RingMQ broker: metrics at /metrics\n",
        ),
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n"),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// The whole exposition: every shard's last snapshot, then what the node reads itself.
pub fn scrape(slots: &MetricsSlots, node: &mut NodeReader) -> String {
    let mut shard_families: Vec<Arc<Vec<Family>>> = Vec::new();
    let mut age = Family::gauge(
        "ringmq_metrics_snapshot_age_seconds",
        "How old the shard's published metrics are (shards publish every 0.5 s).",
    );
    for shard in 0..slots.shards.len() {
        if let Some(p) = slots.get(shard) {
            age.push(
                &[("shard", &shard.to_string())],
                p.at.elapsed().as_secs_f64(),
            );
            shard_families.push(p.families);
        }
    }
    let node_families = node.families();
    let info = Family::gauge(
        "ringmq_build_info",
        "Always 1; the broker's version as a label.",
    )
    .with(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    let all = shard_families
        .iter()
        .flat_map(|f| f.iter())
        .chain(node_families.iter())
        .chain([&age, &info]);
    render(all)
}

/// What the HTTP thread reads from the file system itself.
pub struct NodeReader {
    data_dir: PathBuf,
    shards: usize,
    /// The oldest segment's base and its first record's store timestamp, per shard: the first
    /// record of a segment never changes, so it is read once per oldest segment.
    oldest: HashMap<usize, (u64, u64)>,
}

impl NodeReader {
    fn families(&mut self) -> Vec<Family> {
        let mut out = Vec::new();
        if let Some(d) = disk_usage(&self.data_dir) {
            out.push(
                Family::gauge(
                    "ringmq_disk_used_ratio",
                    "Used share of the data dir's file system, as df computes it: used / (used + \
                     available to unprivileged users).",
                )
                .with(&[], d.used_ratio()),
            );
            out.push(
                Family::gauge(
                    "ringmq_disk_used_bytes",
                    "Bytes used on the data dir's file system.",
                )
                .with(&[], d.used as f64),
            );
            out.push(
                Family::gauge(
                    "ringmq_disk_available_bytes",
                    "Bytes available to unprivileged users on the data dir's file system.",
                )
                .with(&[], d.available as f64),
            );
            out.push(
                Family::gauge(
                    "ringmq_disk_size_bytes",
                    "Size of the data dir's file system.",
                )
                .with(&[], d.size as f64),
            );
        }
        let mut segments = Family::gauge(
            "ringmq_commitlog_segments",
            "CommitLog segment files of the shard (the prepared next segment included).",
        );
        let mut oldest = Family::gauge(
            "ringmq_oldest_message_age_seconds",
            "Age of the oldest retained record (store time of the oldest segment's first record).",
        );
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for shard in 0..self.shards {
            let dir = self
                .data_dir
                .join(format!("shard-{shard}"))
                .join("commitlog");
            let bases = segment_bases(&dir);
            let label = shard.to_string();
            segments.push(&[("shard", &label)], bases.len() as f64);
            let Some(first) = bases.into_iter().min() else {
                continue;
            };
            let stamp = match self.oldest.get(&shard) {
                Some((base, ts)) if *base == first => Some(*ts),
                _ => first_record_time_ms(&dir, first),
            };
            if let Some(ts) = stamp {
                self.oldest.insert(shard, (first, ts));
                let age_s = now_ms.saturating_sub(ts) as f64 / 1000.0;
                oldest.push(&[("shard", &label)], age_s);
            }
        }
        out.push(segments);
        out.push(oldest);
        out
    }
}

/// Base positions of the segment files in `dir` (names of 20 digits; `.tmp` files of a
/// segment being prepared are not segments yet).
fn segment_bases(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            if name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()) {
                name.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// The store timestamp of the record at the start of segment `base`, when one is there (a
/// valid header that claims that very position; a zero-filled, not yet written segment has
/// none).
fn first_record_time_ms(dir: &Path, base: u64) -> Option<u64> {
    let path = dir.join(format!("{base:020}"));
    let mut head = [0u8; HEADER_BYTES];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    let h = RecordHeader::decode(&head).ok()?;
    (h.log_position == base && h.store_timestamp_ms > 0).then_some(h.store_timestamp_ms)
}

struct DiskUsage {
    size: u64,
    used: u64,
    available: u64,
}

impl DiskUsage {
    fn used_ratio(&self) -> f64 {
        let denominator = self.used + self.available;
        if denominator == 0 {
            0.0
        } else {
            self.used as f64 / denominator as f64
        }
    }
}

fn disk_usage(path: &Path) -> Option<DiskUsage> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    let size = st.f_blocks as u64 * unit;
    let free = st.f_bfree as u64 * unit;
    Some(DiskUsage {
        size,
        used: size.saturating_sub(free),
        available: st.f_bavail as u64 * unit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_name_is_twenty_digits() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "00000000000000000000",
            "00000000000001048576",
            "00000000000002097152.tmp",
            ".dma-probe",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let mut bases = segment_bases(dir.path());
        bases.sort_unstable();
        assert_eq!(bases, vec![0, 1048576]);
    }

    #[test]
    fn the_oldest_record_time_needs_a_header_at_the_segments_own_position() {
        let dir = tempfile::tempdir().unwrap();
        let h = RecordHeader {
            total_len: 64 + 1,
            topic_len: 1,
            store_timestamp_ms: 1234,
            log_position: 4096,
            ..Default::default()
        };
        std::fs::write(dir.path().join(format!("{:020}", 4096)), h.encode()).unwrap();
        std::fs::write(dir.path().join(format!("{:020}", 0)), h.encode()).unwrap();
        std::fs::write(dir.path().join(format!("{:020}", 8192)), [0u8; 4096]).unwrap();
        assert_eq!(first_record_time_ms(dir.path(), 4096), Some(1234));
        assert_eq!(
            first_record_time_ms(dir.path(), 0),
            None,
            "a record of another place"
        );
        assert_eq!(first_record_time_ms(dir.path(), 8192), None, "zeros");
    }
}
