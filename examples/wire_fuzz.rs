//! Memory-bound drills against a running broker, watching its RSS from `/proc/<pid>/status`.
//!
//! ```text
//! cargo run --release --example wire_fuzz -- fuzz    --addr 127.0.0.1:10911 --pid PID [--frames 500000] [--connections 256]
//! cargo run --release --example wire_fuzz -- no-read --addr 127.0.0.1:10911 --pid PID [--seconds 9]
//! cargo run --release --example wire_fuzz -- trickle --addr 127.0.0.1:10911 --pid PID [--connections 8] [--seconds 30]
//! cargo run --release --example wire_fuzz -- idle    --addr 127.0.0.1:10911 --pid PID [--connections 2000] [--seconds 5]
//! ```
//!
//! - `fuzz`: many connections send a mix of valid requests (some asking for huge fetches),
//!   valid frames with bytes flipped, truncated frames, frames announcing large bodies and
//!   plain garbage, and never read a response. A connection the broker closes is replaced.
//! - `no-read`: fills a topic, then one connection sends fetch requests asking for 1 GiB each
//!   and never reads the responses.
//! - `trickle`: connections each send all but the last bytes of a 16 MiB produce frame, then
//!   one byte every `--trickle-ms` (5000): a broker with a per-read idle timeout keeps them.
//! - `idle`: a pipelined producer's throughput (1 KiB messages) alone, then with
//!   `--connections` idle connections open, in the same run.
//!
//! Every mode prints the broker's peak RSS (VmHWM) and its RSS at the end (VmRSS), both
//! before and after the drill, so runs against two builds compare directly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringmq::client::{Admin, Producer, QueueSelector};
use ringmq::format::batch::{BatchBuilder, Message};
use ringmq::protocol::{FetchRequest, Frame, ProduceRequest, Request, MAX_BODY_BYTES};

const TOPIC: &str = "fuzz";

struct Args {
    mode: String,
    addr: String,
    pid: u32,
    frames: u64,
    connections: usize,
    seconds: u64,
    trickle_ms: u64,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: wire_fuzz fuzz|no-read|trickle --addr A --pid P")?;
    let mut a = Args {
        mode,
        addr: "127.0.0.1:10911".into(),
        pid: 0,
        frames: 500_000,
        connections: 0,
        seconds: 0,
        trickle_ms: 5000,
        seed: 1,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {value:?}"))
        };
        match flag.as_str() {
            "--addr" => a.addr = value.clone(),
            "--pid" => a.pid = num()? as u32,
            "--frames" => a.frames = num()?,
            "--connections" => a.connections = num()? as usize,
            "--seconds" => a.seconds = num()?,
            "--trickle-ms" => a.trickle_ms = num()?,
            "--seed" => a.seed = num()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.pid == 0 {
        return Err("--pid of the broker process is required (its RSS is the result)".into());
    }
    Ok(a)
}

/// (VmHWM, VmRSS) of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wire_fuzz: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = prepare(&args.addr) {
        eprintln!("wire_fuzz: cannot prepare the broker: {e}");
        std::process::exit(1);
    }
    let (hwm0, rss0) = rss_kib(args.pid);
    println!("before: VmHWM {} VmRSS {}", mib(hwm0), mib(rss0));
    let peak_sampled = Arc::new(AtomicU64::new(rss0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak_sampled.clone(), done.clone(), args.pid);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid).1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = Instant::now();
    let summary = match args.mode.as_str() {
        "fuzz" => fuzz(&args),
        "no-read" => no_read(&args),
        "trickle" => trickle(&args),
        "idle" => idle(&args),
        other => {
            eprintln!("wire_fuzz: unknown mode {other:?}");
            std::process::exit(2);
        }
    };
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (hwm1, rss1) = rss_kib(args.pid);
    println!("{summary} in {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "after:  VmHWM {} VmRSS {} (sampled RSS peak {})",
        mib(hwm1),
        mib(rss1),
        mib(peak_sampled.load(Ordering::Relaxed))
    );
}

/// A topic with data, so fetches return bytes.
fn prepare(addr: &str) -> Result<(), String> {
    let admin = Admin::connect(addr).map_err(|e| e.to_string())?;
    admin.create_topic(TOPIC, 1).map_err(|e| e.to_string())?;
    let stats = admin.queue_stats(TOPIC).map_err(|e| e.to_string())?;
    if stats.iter().map(|s| s.bytes).sum::<u64>() >= 32 << 20 {
        return Ok(());
    }
    let producer = Producer::connect(addr).map_err(|e| e.to_string())?;
    let payload = Bytes::from(vec![b'x'; 256 << 10]);
    for _ in 0..128 {
        producer
            .send(
                TOPIC,
                QueueSelector::Queue(0),
                &Message::new(payload.clone()),
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    out.to_vec()
}

fn produce_frame(rng: &mut StdRng, id: u64) -> Vec<u8> {
    let mut body = BytesMut::new();
    let count = rng.gen_range(1..=8);
    {
        let mut b = BatchBuilder::new(&mut body);
        for _ in 0..count {
            let len = rng.gen_range(0..16 << 10);
            b.push(&Message::new(vec![b'p'; len])).expect("small batch");
        }
    }
    let req = Request::Produce(ProduceRequest {
        topic: TOPIC.into(),
        queue: Some(0),
        producer_id: 0,
        producer_epoch: 0,
        base_sequence: 0,
        message_count: count,
        timeout_ms: 1000,
        known_epoch: 0,
        delay: None,
        transaction: None,
    });
    encode(&req.to_frame(id, body.freeze()))
}

fn valid_frame(rng: &mut StdRng, id: u64) -> Vec<u8> {
    let req = match rng.gen_range(0..8) {
        0 => Request::Ping,
        1 => Request::ListTopics,
        2 => Request::BrokerInfo,
        3 => Request::BrokerStats,
        4 => Request::QueueStats {
            topic: TOPIC.into(),
        },
        5 => return produce_frame(rng, id),
        _ => Request::Fetch(FetchRequest {
            topic: TOPIC.into(),
            queue: 0,
            offset: rng.gen_range(0..64),
            max_bytes: if rng.gen_bool(0.5) {
                u32::MAX
            } else {
                rng.gen()
            },
            max_wait_ms: rng.gen_range(0..50),
            group: None,
        }),
    };
    encode(&req.to_frame(id, Bytes::new()))
}

/// One fuzz frame: valid, mutated, truncated, announcing a large body, or garbage.
fn fuzz_frame(rng: &mut StdRng, id: u64) -> Vec<u8> {
    let mut f = valid_frame(rng, id);
    match rng.gen_range(0..10) {
        0..=4 => {}
        5 | 6 => {
            for _ in 0..rng.gen_range(1..=8) {
                let at = rng.gen_range(0..f.len());
                f[at] ^= 1 << rng.gen_range(0..8);
            }
        }
        7 => f.truncate(rng.gen_range(1..f.len())),
        8 => {
            let len: u32 = rng.gen_range(0..=MAX_BODY_BYTES);
            f[20..24].copy_from_slice(&len.to_le_bytes());
        }
        _ => {
            let len = rng.gen_range(1..4096);
            f = (0..len).map(|_| rng.gen()).collect();
        }
    }
    f
}

fn connect(addr: &str) -> Option<TcpStream> {
    let s = TcpStream::connect(addr).ok()?;
    // A broker that stops reading a connection is doing its job: give up on it and open
    // another one instead of waiting.
    s.set_write_timeout(Some(Duration::from_millis(200))).ok()?;
    Some(s)
}

fn fuzz(args: &Args) -> String {
    let connections = if args.connections == 0 {
        256
    } else {
        args.connections
    };
    let threads = 8.min(connections);
    let sent = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..threads {
        let (sent, reconnects, addr) = (sent.clone(), reconnects.clone(), args.addr.clone());
        let (frames, seed) = (args.frames, args.seed);
        let mine = connections / threads + usize::from(t < connections % threads);
        handles.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(t as u64));
            let mut conns: Vec<Option<TcpStream>> = (0..mine).map(|_| connect(&addr)).collect();
            let mut id = 0u64;
            while sent.load(Ordering::Relaxed) < frames {
                for c in conns.iter_mut() {
                    if c.is_none() {
                        reconnects.fetch_add(1, Ordering::Relaxed);
                        *c = connect(&addr);
                    }
                    let Some(s) = c else { continue };
                    id += 1;
                    let frame = fuzz_frame(&mut rng, id);
                    if s.write_all(&frame).is_err() {
                        *c = None;
                        continue;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    format!(
        "fuzz: {} frames over {connections} connections ({} replaced)",
        sent.load(Ordering::Relaxed),
        reconnects.load(Ordering::Relaxed)
    )
}

fn no_read(args: &Args) -> String {
    let seconds = if args.seconds == 0 { 9 } else { args.seconds };
    let Some(mut s) = connect(&args.addr) else {
        return "no-read: cannot connect".into();
    };
    let mut sent = 0u64;
    let mut blocked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        sent += 1;
        let req = Request::Fetch(FetchRequest {
            topic: TOPIC.into(),
            queue: 0,
            offset: 0,
            max_bytes: 1 << 30,
            max_wait_ms: 0,
            group: None,
        });
        match s.write_all(&encode(&req.to_frame(sent, Bytes::new()))) {
            Ok(()) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                // The broker stopped reading us: keep the connection and keep trying.
                blocked += 1;
            }
            Err(e) => return format!("no-read: the broker closed the connection: {e}"),
        }
    }
    format!("no-read: {sent} fetches of 1 GiB sent, never read ({blocked} writes blocked)")
}

fn trickle(args: &Args) -> String {
    let connections = if args.connections == 0 {
        8
    } else {
        args.connections
    };
    let seconds = if args.seconds == 0 { 30 } else { args.seconds };
    let mut body = BytesMut::new();
    BatchBuilder::new(&mut body)
        .push(&Message::new(vec![b't'; (MAX_BODY_BYTES - 4096) as usize]))
        .expect("one large message");
    let req = Request::Produce(ProduceRequest {
        topic: TOPIC.into(),
        queue: Some(0),
        producer_id: 0,
        producer_epoch: 0,
        base_sequence: 0,
        message_count: 1,
        timeout_ms: 1000,
        known_epoch: 0,
        delay: None,
        transaction: None,
    });
    let frame = encode(&req.to_frame(1, body.freeze()));
    let hold = frame.len() - 64;
    let mut conns: Vec<TcpStream> = Vec::new();
    for _ in 0..connections {
        let Ok(mut s) = TcpStream::connect(&args.addr) else {
            continue;
        };
        if s.write_all(&frame[..hold]).is_ok() {
            s.set_nonblocking(true).expect("nonblocking");
            conns.push(s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut at = hold;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && at < frame.len() - 1 {
        std::thread::sleep(Duration::from_millis(args.trickle_ms));
        conns.retain_mut(|s| {
            // A close (read 0 or an error) means the broker dropped the half-sent frame.
            match s.read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            s.write_all(&frame[at..at + 1]).is_ok()
        });
        at += 1;
    }
    format!(
        "trickle: {connections} half-sent 16 MiB frames, one byte per {} ms: {} still open \
         after {seconds} s",
        args.trickle_ms,
        conns.len()
    )
}

/// Messages a pipelined producer gets acked in `seconds`.
fn produce_for(addr: &str, seconds: u64) -> u64 {
    let producer = Producer::connect(addr).expect("producer");
    let acked = Arc::new(AtomicU64::new(0));
    let message = Message::new(vec![b'i'; 1024]);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let acked = acked.clone();
        producer
            .send_async(TOPIC, QueueSelector::Queue(0), &message, move |r| {
                if r.is_ok() {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
            .expect("send_async");
    }
    producer.flush();
    acked.load(Ordering::Relaxed)
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

fn idle(args: &Args) -> String {
    let connections = if args.connections == 0 {
        2000
    } else {
        args.connections
    };
    let seconds = if args.seconds == 0 { 5 } else { args.seconds };
    let idle_cpu = |label: &str| {
        let t0 = cpu_ticks(args.pid);
        std::thread::sleep(Duration::from_secs(seconds));
        let ticks = cpu_ticks(args.pid) - t0;
        format!(
            "{label}: broker CPU {:.1} % of a core",
            ticks as f64 / seconds as f64
        )
    };
    let cpu_alone = idle_cpu("no connections");
    let (_, rss_before) = rss_kib(args.pid);
    let idle: Vec<TcpStream> = (0..connections)
        .filter_map(|_| TcpStream::connect(&args.addr).ok())
        .collect();
    let open = idle.len();
    std::thread::sleep(Duration::from_secs(1));
    let (_, rss_open) = rss_kib(args.pid);
    let cpu_open = idle_cpu(&format!("{open} idle connections"));
    // Throughput alternately without and with the idle connections, to average out a noisy
    // machine; the idle connections are parked in a thread that just holds them.
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let holder = std::thread::spawn(move || {
        let mut held = Some(idle);
        while let Ok(keep) = rx.recv() {
            if !keep {
                held = None;
            } else if held.is_none() {
                break;
            }
        }
        drop(held);
    });
    let mut crowded = 0;
    for _ in 0..3 {
        crowded += produce_for(&args.addr, seconds);
    }
    tx.send(false).expect("holder");
    drop(tx);
    let _ = holder.join();
    let mut alone = 0;
    for _ in 0..3 {
        alone += produce_for(&args.addr, seconds);
    }
    let per = |n: u64| n / (3 * seconds);
    format!(
        "idle: {cpu_alone}; {cpu_open}; RSS {} -> {} with them open ({:.1} KiB each); producer \
         {} msg/s with them open, {} msg/s after closing them ({:.2}x)",
        mib(rss_before),
        mib(rss_open),
        (rss_open.saturating_sub(rss_before)) as f64 / open.max(1) as f64,
        per(crowded),
        per(alone),
        crowded as f64 / alone.max(1) as f64
    )
}
