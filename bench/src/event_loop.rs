//! The event-loop load generator (`--driver event-loop`): one thread drives many producers'
//! connections with non-blocking sockets and poll(2), as redis-benchmark and iggy-bench do,
//! instead of one OS thread per producer (and the client's reader, linger and retry threads
//! behind each). With 50 producers on one load core the threaded driver spends that core on
//! context switches before the broker is busy; this one shows what the broker can take.
//!
//! Each producer sends SYNC batches (`--batch` messages per request, one request in flight, like
//! `Producer::send_batch`) round-robin over the topic's queues, on one connection per shard it
//! sends to. It is idempotent like the client's producer (its own producer id, an epoch and a
//! sequence per queue), so the broker does the same work. It does not retry: a failed request
//! is counted under its error and the producer starts a new epoch, as the client does when a
//! window fails; a lost connection is opened again by the next send.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ringmq::format::batch::{BatchBuilder, Message};
use ringmq::protocol::{Frame, Opcode, ProduceRequest, RemoteError, Request, Response};

use crate::hist::{as_us, Clock, Pacer, RealClock, SharedStats};

/// How long one request may go unanswered before its connection is dropped and the request
/// counted as `Timeout` (the client's default request timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest poll(2) wait: the loop looks at the abort flag and the time at least this often.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Failed requests in a row (all producers of the loop) after which the loop gives up.
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

/// What one event-loop thread drives.
pub struct LoopLoad<'a> {
    pub topic: &'a str,
    /// Each queue of the topic with its shard's address, as GetRoute gave it.
    pub routes: Vec<(u32, String)>,
    /// Producers of this loop, each `(index, pacer, quota)`: the index over all loops (it
    /// spreads the open-loop phases), its schedule, and how many measured messages it sends
    /// (`None`: until `end`).
    pub producers: Vec<(usize, Pacer, Option<u64>)>,
    /// Messages per request.
    pub batch: usize,
    pub message_bytes: usize,
    pub base: Instant,
    pub warmup: Duration,
    /// No send is started (or, open loop, scheduled) at or after this.
    pub end: Option<Duration>,
    pub abort: &'a AtomicBool,
}

/// One producer of the loop.
struct LoopProducer {
    producer_id: u64,
    epoch: u16,
    /// Next sequence per queue (index into `routes`).
    sequences: Vec<u32>,
    next_route: usize,
    pacer: Pacer,
    quota: Option<u64>,
    measured_sent: u64,
    /// The request in flight: its connection, request id, messages, intended send time,
    /// whether it counts, and when it was written.
    in_flight: Option<InFlight>,
    /// Connection per address.
    connections: HashMap<String, usize>,
    done: bool,
}

struct InFlight {
    connection: usize,
    request_id: u64,
    messages: u64,
    intended: Duration,
    measured: bool,
    sent_at: Instant,
}

/// One socket and its buffers.
struct LoopConnection {
    stream: Option<TcpStream>,
    addr: String,
    producer: usize,
    out: BytesMut,
    inbound: BytesMut,
}

/// Runs the loop until every producer is done (or `abort`, or too many errors in a row).
/// `message(intended)` makes one message for a send meant at `intended`.
pub fn run(
    load: LoopLoad<'_>,
    stats: &SharedStats,
    message: impl Fn(Duration) -> Message,
    interrupted: impl Fn() -> bool,
) -> Result<(), String> {
    if load.routes.is_empty() {
        return Err(format!("topic {} has no queues", load.topic));
    }
    let clock = RealClock { base: load.base };
    let seed = std::process::id() as u64 ^ (load.base.elapsed().as_nanos() as u64) << 20;
    let mut producers: Vec<LoopProducer> = load
        .producers
        .into_iter()
        .map(|(index, pacer, quota)| LoopProducer {
            // A distinct id per producer and run (the broker de-duplicates per producer id).
            producer_id: splitmix(seed ^ (index as u64 + 1)),
            epoch: 0,
            sequences: vec![0; load.routes.len()],
            next_route: index % load.routes.len(),
            pacer,
            quota,
            measured_sent: 0,
            in_flight: None,
            connections: HashMap::new(),
            done: false,
        })
        .collect();
    let mut connections: Vec<LoopConnection> = Vec::new();
    let mut next_request_id = 1u64;
    let mut consecutive_errors = 0u32;
    let mut last_error = String::new();
    let timeout_ms = REQUEST_TIMEOUT.as_millis() as u32;
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    let mut polled: Vec<usize> = Vec::new();
    let mut read_buf = vec![0u8; 256 << 10];
    loop {
        if load.abort.load(Ordering::Relaxed) || interrupted() {
            break;
        }
        // Start every idle producer whose send is due; note when the next one is.
        let mut next_due: Option<Duration> = None;
        for (pi, p) in producers.iter_mut().enumerate() {
            if p.done || p.in_flight.is_some() {
                continue;
            }
            let intended = p.pacer.intended(&clock);
            if load.end.is_some_and(|end| intended >= end) {
                p.done = true;
                continue;
            }
            let measured = intended >= load.warmup;
            let mut n = load.batch as u64;
            if let (true, Some(q)) = (measured, p.quota) {
                if p.measured_sent >= q {
                    p.done = true;
                    continue;
                }
                n = n.min(q - p.measured_sent);
            }
            // (Closed loop: `intended` is now.)
            if intended > clock.now() {
                next_due = Some(next_due.map_or(intended, |d| d.min(intended)));
                continue;
            }
            p.pacer.advance();
            let route = p.next_route;
            p.next_route = (p.next_route + 1) % load.routes.len();
            let (queue, addr) = &load.routes[route];
            let ci = match connection_for(&mut connections, p, pi, addr) {
                Ok(ci) => ci,
                Err(e) => {
                    stats_error(stats, "Connect", n);
                    consecutive_errors += 1;
                    last_error = e;
                    continue;
                }
            };
            let mut body = BytesMut::new();
            let mut builder = BatchBuilder::new(&mut body);
            for _ in 0..n {
                builder
                    .push(&message(intended))
                    .map_err(|e| format!("cannot encode a message: {e}"))?;
            }
            let base_sequence = p.sequences[route];
            p.sequences[route] = base_sequence.wrapping_add(n as u32);
            let request = Request::Produce(ProduceRequest {
                topic: load.topic.to_string(),
                queue: Some(*queue),
                producer_id: p.producer_id,
                producer_epoch: p.epoch,
                base_sequence,
                message_count: n as u32,
                timeout_ms,
                known_epoch: 0,
                delay: None,
                transaction: None,
            });
            let request_id = next_request_id;
            next_request_id += 1;
            request
                .to_frame(request_id, body.freeze())
                .encode(&mut connections[ci].out);
            p.in_flight = Some(InFlight {
                connection: ci,
                request_id,
                messages: n,
                intended,
                measured,
                sent_at: Instant::now(),
            });
            if measured {
                p.measured_sent += n;
            }
            // Written at once where the socket takes it; the rest when poll says it can.
            if let Err(e) = flush(&mut connections[ci]) {
                connections[ci].close();
                p.fail_in_flight(ci, stats, "ConnectionClosed");
                consecutive_errors += 1;
                last_error = e;
            }
        }
        if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
            return Err(format!(
                "{MAX_CONSECUTIVE_ERRORS} requests in a row failed, last: {last_error}"
            ));
        }
        let busy = producers.iter().any(|p| p.in_flight.is_some());
        if !busy && producers.iter().all(|p| p.done) {
            break;
        }
        if !busy && next_due.is_none() {
            continue; // nothing in flight and a send became due while starting the others
        }

        // Wait for answers, room to write, or the next due send.
        pollfds.clear();
        polled.clear();
        for (ci, c) in connections.iter().enumerate() {
            if let Some(s) = &c.stream {
                let mut events = libc::POLLIN;
                if !c.out.is_empty() {
                    events |= libc::POLLOUT;
                }
                pollfds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events,
                    revents: 0,
                });
                polled.push(ci);
            }
        }
        let wait = next_due
            .map_or(MAX_WAIT, |d| d.saturating_sub(clock.now()))
            .min(MAX_WAIT);
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `pollfds` is a live, correctly sized array of pollfd.
        let ready = unsafe {
            libc::ppoll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for (k, pfd) in pollfds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let ci = polled[k];
            let frames = match service(&mut connections[ci], pfd.revents, &mut read_buf) {
                Ok(frames) => frames,
                Err(e) => {
                    drop_connection(
                        &mut connections,
                        &mut producers,
                        ci,
                        stats,
                        "ConnectionClosed",
                    );
                    consecutive_errors += 1;
                    last_error = e;
                    continue;
                }
            };
            let p = &mut producers[connections[ci].producer];
            for frame in frames {
                let Some(f) = p.in_flight.take_if(|f| f.request_id == frame.request_id) else {
                    continue; // not ours (a stale answer after a reconnect cannot be: ids grow)
                };
                let latency = as_us(clock.now().saturating_sub(f.intended));
                match outcome(&frame) {
                    Ok(()) => {
                        consecutive_errors = 0;
                        lock(stats).record(
                            latency,
                            f.messages,
                            f.messages * load.message_bytes as u64,
                            f.measured,
                        );
                    }
                    Err(kind) => {
                        p.fail(f.messages, stats, &kind);
                        consecutive_errors += 1;
                        last_error = kind;
                    }
                }
            }
        }
        // A request unanswered for too long: its connection is presumed dead.
        let stale: Vec<usize> = producers
            .iter()
            .filter_map(|p| p.in_flight.as_ref())
            .filter(|f| f.sent_at.elapsed() >= REQUEST_TIMEOUT)
            .map(|f| f.connection)
            .collect();
        for ci in stale {
            drop_connection(&mut connections, &mut producers, ci, stats, "Timeout");
            consecutive_errors += 1;
            last_error = format!("no answer within {REQUEST_TIMEOUT:?}");
        }
    }
    Ok(())
}

/// The producer's connection to `addr`, opened (again) if need be.
fn connection_for(
    connections: &mut Vec<LoopConnection>,
    p: &mut LoopProducer,
    producer: usize,
    addr: &str,
) -> Result<usize, String> {
    let ci = match p.connections.get(addr) {
        Some(&ci) => ci,
        None => {
            connections.push(LoopConnection {
                stream: None,
                addr: addr.to_string(),
                producer,
                out: BytesMut::new(),
                inbound: BytesMut::new(),
            });
            p.connections
                .insert(addr.to_string(), connections.len() - 1);
            connections.len() - 1
        }
    };
    let c = &mut connections[ci];
    if c.stream.is_none() {
        let s = TcpStream::connect(&c.addr).map_err(|e| format!("connect {}: {e}", c.addr))?;
        s.set_nodelay(true)
            .and_then(|()| s.set_nonblocking(true))
            .map_err(|e| format!("socket options for {}: {e}", c.addr))?;
        c.stream = Some(s);
        c.out.clear();
        c.inbound.clear();
    }
    Ok(ci)
}

/// What poll reported for a connection: writes what it can take, then reads what arrived.
fn service(c: &mut LoopConnection, revents: i16, buf: &mut [u8]) -> Result<Vec<Frame>, String> {
    if revents & libc::POLLOUT != 0 {
        flush(c)?;
    }
    if revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) == 0 {
        return Ok(Vec::new());
    }
    receive(c, buf)
}

/// Writes what the socket takes of the connection's output.
fn flush(c: &mut LoopConnection) -> Result<(), String> {
    let Some(s) = c.stream.as_mut() else {
        return Ok(());
    };
    while !c.out.is_empty() {
        match s.write(&c.out) {
            Ok(0) => return Err(format!("{} took no bytes", c.addr)),
            Ok(n) => {
                let _ = c.out.split_to(n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write to {}: {e}", c.addr)),
        }
    }
    Ok(())
}

/// Reads what arrived and splits it into frames.
fn receive(c: &mut LoopConnection, buf: &mut [u8]) -> Result<Vec<Frame>, String> {
    let Some(s) = c.stream.as_mut() else {
        return Ok(Vec::new());
    };
    loop {
        match s.read(buf) {
            Ok(0) => return Err(format!("{} closed the connection", c.addr)),
            Ok(n) => c.inbound.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read from {}: {e}", c.addr)),
        }
    }
    let mut frames = Vec::new();
    while let Some(f) =
        Frame::decode(&mut c.inbound).map_err(|e| format!("bad frame from {}: {e}", c.addr))?
    {
        frames.push(f);
    }
    Ok(frames)
}

/// What an answer to a produce says: stored, or the error's name.
fn outcome(frame: &Frame) -> Result<(), String> {
    if let Some(remote) = RemoteError::from_frame(frame) {
        return Err(remote.code.name().to_string());
    }
    match Response::from_frame(Opcode::Produce, frame) {
        Ok(Response::Produced(_)) => Ok(()),
        Ok(_) => Err("Unexpected".into()),
        Err(_) => Err("Wire".into()),
    }
}

impl LoopConnection {
    /// Drops the socket and what it had buffered; the next send opens a new one.
    fn close(&mut self) {
        self.stream = None;
        self.out.clear();
        self.inbound.clear();
    }
}

impl LoopProducer {
    /// A failed request: counted under `kind`, and a new epoch, so the hole it leaves in its
    /// queue's sequence does not refuse what follows.
    fn fail(&mut self, messages: u64, stats: &SharedStats, kind: &str) {
        stats_error(stats, kind, messages);
        self.epoch = self.epoch.wrapping_add(1);
        self.sequences.iter_mut().for_each(|s| *s = 0);
    }

    /// Fails the request in flight on connection `ci`, if there is one.
    fn fail_in_flight(&mut self, ci: usize, stats: &SharedStats, kind: &str) {
        if let Some(f) = self.in_flight.take_if(|f| f.connection == ci) {
            self.fail(f.messages, stats, kind);
        }
    }
}

/// Closes connection `ci`; its producer's request in flight fails under `kind`.
fn drop_connection(
    connections: &mut [LoopConnection],
    producers: &mut [LoopProducer],
    ci: usize,
    stats: &SharedStats,
    kind: &str,
) {
    connections[ci].close();
    producers[connections[ci].producer].fail_in_flight(ci, stats, kind);
}

fn stats_error(stats: &SharedStats, kind: &str, msgs: u64) {
    lock(stats).error(kind.to_string(), msgs);
}

/// The stats' guard, also after a panic poisoned them (they are still counts).
fn lock(stats: &SharedStats) -> std::sync::MutexGuard<'_, crate::hist::ThreadStats> {
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

/// A well-mixed 64-bit value of `x` (SplitMix64's finaliser).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
