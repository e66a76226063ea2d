//! `ringmq-bench stalls`: do start-up and segment rolls stall acks? The performance issue's
//! target: SYNC p99 during start-up and across a segment roll at most 2 × the steady-state p99.
//!
//! Two phases, each on a fresh embedded broker, both open loop (latency from each send's
//! intended time, so a stall counts against every send it delays, not only the one it hit):
//! - `startup`: an empty data dir and the broker's default segment size (1 GiB), load from the
//!   moment the broker says it is ready, as a new user's first `ringmq produce` would see it.
//!   Sends intended in the first `--startup-secs` are "start-up", those from
//!   `--steady-after-secs` on "steady" (the ones between count in neither). The broker
//!   prepares its next segment in the background from the start (`--prepare-bytes-per-sec`
//!   paces it, 32 MiB/s by default, so a 1 GiB spare takes about 32 s; 0 = full speed, what
//!   made the first second slow before the pacing): the steady part starts after that.
//! - `roll`: smaller segments (`--segment-mib`) and more bytes per second, so the log rolls
//!   several times. A watch polls each shard's log end every [`ROLL_POLL`] and notes when it
//!   enters a new segment; a send in flight between the poll before a roll and
//!   `--roll-window-ms` after the poll that saw it is "at a roll", every other one "steady".
//!
//! A table on stdout (and the ratio to the target); with `--out`, stalls.json with every
//! window's latency, the rolls seen and a per-second p99 timeline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use ringmq::client::{Admin, Producer, ProducerConfig, QueueSelector};
use ringmq::config::StorageConfig;
use ringmq::format::batch::Message;
use serde::Serialize;

use crate::embedded::{BrokerArgs, EmbeddedBroker};
use crate::hist::{as_us, new_hist, Clock, LatencySummary, Pacer, RealClock};
use crate::machine::{self, MachineFacts};
use crate::report::fmt_us;
use crate::runner::{self, error_kind, lock};

/// How often the roll watch reads the shards' log ends (one small request on the shard's core).
pub const ROLL_POLL: Duration = Duration::from_millis(5);
/// The target: p99 at start-up or at a roll over the steady p99.
const TARGET_RATIO: f64 = 2.0;
/// A producer gives up after this many failed sends in a row.
const MAX_CONSECUTIVE_ERRORS: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The first seconds of a fresh broker against the seconds after.
    Startup,
    /// Sends around segment rolls against the others.
    Roll,
}

#[derive(Debug, Args)]
pub struct StallsArgs {
    /// Phases to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "startup,roll"
    )]
    pub phases: Vec<Phase>,
    /// The embedded broker (`--segment-mib` is the roll phase's segment size).
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Pace of preparing (zeroing) the next segment while the log is far from its end, bytes/s
    /// (the broker's `prepare_bytes_per_sec`; 0 = full speed).
    #[arg(long, default_value_t = ringmq::storage::PREPARE_BYTES_PER_SEC_DEFAULT)]
    pub prepare_bytes_per_sec: u64,
    /// Start-up phase: segment size in MiB (default: the broker's own).
    #[arg(long, default_value_t = StorageConfig::default().segment_bytes >> 20)]
    pub startup_segment_mib: u64,
    /// Start-up phase: sends intended this many seconds after ready are "start-up".
    #[arg(long, default_value_t = 10)]
    pub startup_secs: u64,
    /// Start-up phase: sends intended from this second on are "steady" (by then the paced
    /// preparation of the next 1 GiB segment is over).
    #[arg(long, default_value_t = 40)]
    pub steady_after_secs: u64,
    /// Start-up phase: whole length in seconds.
    #[arg(long, default_value_t = 60)]
    pub startup_duration_secs: u64,
    /// Start-up phase: producers (SYNC sends of one message each).
    #[arg(long, default_value_t = 1)]
    pub startup_producers: usize,
    /// Start-up phase: offered messages per second (all producers together).
    #[arg(long, default_value_t = 1000)]
    pub startup_rate: u64,
    /// Start-up phase: payload bytes per message.
    #[arg(long, default_value_t = 256)]
    pub startup_message_bytes: usize,
    /// Roll phase: producers (SYNC sends of one message each).
    #[arg(long, default_value_t = 8)]
    pub roll_producers: usize,
    /// Roll phase: offered messages per second (all producers together).
    #[arg(long, default_value_t = 4000)]
    pub roll_rate: u64,
    /// Roll phase: payload bytes per message.
    #[arg(long, default_value_t = 4096)]
    pub roll_message_bytes: usize,
    /// Roll phase: measured seconds (after --roll-warmup-secs).
    #[arg(long, default_value_t = 20)]
    pub roll_duration_secs: u64,
    /// Roll phase: seconds of load before measuring (rolls in it are not counted).
    #[arg(long, default_value_t = 2)]
    pub roll_warmup_secs: u64,
    /// Roll phase: how long after a roll is seen a send still counts as "at a roll".
    #[arg(long, default_value_t = 250)]
    pub roll_window_ms: u64,
    /// Write stalls.json into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

impl StallsArgs {
    fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        self.broker.problems(&mut problems);
        if self.phases.is_empty() {
            problems.push("--phases needs startup, roll or both".into());
        }
        for (flag, v) in [
            ("--startup-producers", self.startup_producers as u64),
            ("--startup-rate", self.startup_rate),
            ("--startup-message-bytes", self.startup_message_bytes as u64),
            ("--startup-secs", self.startup_secs),
            ("--roll-producers", self.roll_producers as u64),
            ("--roll-rate", self.roll_rate),
            ("--roll-message-bytes", self.roll_message_bytes as u64),
            ("--roll-duration-secs", self.roll_duration_secs),
        ] {
            if v == 0 {
                problems.push(format!("{flag} must be at least 1"));
            }
        }
        if self.steady_after_secs < self.startup_secs
            || self.startup_duration_secs <= self.steady_after_secs
        {
            problems.push(format!(
                "need --startup-secs ({}) <= --steady-after-secs ({}) < --startup-duration-secs \
                 ({}): the steady part lies after the start-up one",
                self.startup_secs, self.steady_after_secs, self.startup_duration_secs
            ));
        }
        if self.startup_segment_mib == 0 {
            problems.push("--startup-segment-mib must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

/// One send: its intended time and when its ack came, µs since the phase's base.
#[derive(Debug, Clone, Copy)]
struct Send {
    start_us: u64,
    end_us: u64,
}

impl Send {
    fn latency_us(&self) -> u64 {
        self.end_us.saturating_sub(self.start_us)
    }
}

/// A segment roll the watch saw: between the poll at `before_us` and the one at `seen_us`.
#[derive(Debug, Clone, Copy, Serialize)]
struct Roll {
    shard: u32,
    /// The segment the shard's log end entered (its index from the log's start).
    segment: u64,
    before_us: u64,
    seen_us: u64,
}

/// The latency of one class of sends.
#[derive(Debug, Serialize)]
struct Window {
    name: String,
    latency: LatencySummary,
}

#[derive(Debug, Serialize)]
struct TimelinePoint {
    second: u64,
    sends: u64,
    p99_us: Option<u64>,
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: Phase,
    segment_bytes: u64,
    producers: usize,
    rate: u64,
    message_bytes: usize,
    /// Empty data dir to "broker ready", in ms.
    ready_ms: u64,
    /// The window under test ("start-up" or "at a roll") and the steady one.
    stalled: Window,
    steady: Window,
    /// stalled p99 / steady p99; None when a window is empty.
    p99_ratio: Option<f64>,
    rolls: Vec<Roll>,
    errors: BTreeMap<String, u64>,
    timeline: Vec<TimelinePoint>,
}

#[derive(Serialize)]
struct StallsReport {
    command: &'static str,
    git_commit: Option<String>,
    machine: MachineFacts,
    flush_mode: String,
    prepare_bytes_per_sec: u64,
    target_ratio: f64,
    phases: Vec<PhaseReport>,
}

pub fn run(a: StallsArgs) -> Result<(), String> {
    a.validate()?;
    runner::install_interrupt_handler();
    let mut reports = Vec::new();
    for &phase in &a.phases {
        if runner::interrupted() {
            eprintln!("note: interrupted: later phases were not run");
            break;
        }
        reports.push(run_phase(&a, phase)?);
    }
    println!(
        "\n{} broker, next segment prepared at {} (0 = full speed); open loop, SYNC sends of one \
         message; latency from each send's intended time\n",
        a.broker.mode,
        match a.prepare_bytes_per_sec {
            0 => "full speed".to_string(),
            b => format!("{} MiB/s", b >> 20),
        }
    );
    println!(
        "| phase | segment | load | ready | window | sends | p50 | p99 | p99.9 | max | p99 / steady p99 |"
    );
    println!("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        let load = format!(
            "{} × {} B at {} msgs/s",
            r.producers, r.message_bytes, r.rate
        );
        for (w, ratio) in [(&r.stalled, r.p99_ratio), (&r.steady, None)] {
            let l = &w.latency;
            println!(
                "| {} | {} MiB | {load} | {} ms | {} | {} | {} | {} | {} | {} | {} |",
                format!("{:?}", r.phase).to_lowercase(),
                r.segment_bytes >> 20,
                r.ready_ms,
                w.name,
                l.count,
                fmt_us(l.p50_us),
                fmt_us(l.p99_us),
                fmt_us(l.p999_us),
                fmt_us(l.max_us),
                ratio.map_or("-".into(), |x| format!("{x:.2}")),
            );
        }
    }
    println!();
    for r in &reports {
        let name = format!("{:?}", r.phase).to_lowercase();
        match r.p99_ratio {
            Some(x) => println!(
                "{name}: p99 {:.2}× the steady p99 (target ≤ {TARGET_RATIO}×): {}",
                x,
                if x <= TARGET_RATIO { "met" } else { "MISSED" }
            ),
            None if r.phase == Phase::Roll && r.rolls.is_empty() => println!(
                "{name}: no segment roll inside the measured run: raise --roll-rate or \
                 --roll-message-bytes, or lower --segment-mib"
            ),
            None => println!("{name}: a window is empty, no ratio"),
        }
        let errors: u64 = r.errors.values().sum();
        if errors > 0 {
            println!("{name}: {errors} sends failed: {:?}", r.errors);
        }
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let report = StallsReport {
            command: "stalls",
            git_commit: machine::git_commit(),
            machine: MachineFacts::collect(Some(a.broker.data_root.as_path())),
            flush_mode: a.broker.mode.to_string(),
            prepare_bytes_per_sec: a.prepare_bytes_per_sec,
            target_ratio: TARGET_RATIO,
            phases: reports,
        };
        let json = dir.join("stalls.json");
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&json, text).map_err(|e| format!("{}: {e}", json.display()))?;
        eprintln!("wrote {}", json.display());
    }
    Ok(())
}

/// The shape of one phase's load.
struct Load {
    producers: usize,
    rate: u64,
    message_bytes: usize,
    /// Sends are intended from 0 up to this.
    length: Duration,
}

fn run_phase(a: &StallsArgs, phase: Phase) -> Result<PhaseReport, String> {
    let (segment_mib, load, warmup) = match phase {
        Phase::Startup => (
            a.startup_segment_mib,
            Load {
                producers: a.startup_producers,
                rate: a.startup_rate,
                message_bytes: a.startup_message_bytes,
                length: Duration::from_secs(a.startup_duration_secs),
            },
            Duration::ZERO,
        ),
        Phase::Roll => (
            a.broker.segment_mib,
            Load {
                producers: a.roll_producers,
                rate: a.roll_rate,
                message_bytes: a.roll_message_bytes,
                length: Duration::from_secs(a.roll_warmup_secs + a.roll_duration_secs),
            },
            Duration::from_secs(a.roll_warmup_secs),
        ),
    };
    let segment_bytes = segment_mib << 20;
    let name = format!("{:?}", phase).to_lowercase();
    let args = BrokerArgs {
        segment_mib,
        ..a.broker.clone()
    };
    eprintln!(
        "[{name}] starting an embedded {} broker with {segment_mib} MiB segments on an empty \
         data dir ...",
        a.broker.mode
    );
    let started = Instant::now();
    let broker = EmbeddedBroker::start_with(&args, &format!("stalls-{name}"), |c| {
        c.storage.prepare_bytes_per_sec = a.prepare_bytes_per_sec;
    })?;
    let ready_ms = started.elapsed().as_millis() as u64;
    eprintln!(
        "[{name}] ready in {ready_ms} ms at {}; {}",
        broker.addr,
        broker.split.describe()
    );
    let outcome = drive(&name, &broker, &load, segment_bytes, phase == Phase::Roll);
    broker.stop();
    let Driven {
        sends,
        rolls,
        errors,
    } = outcome?;

    let warmup_us = as_us(warmup);
    let measured: Vec<Send> = sends
        .into_iter()
        .filter(|s| s.start_us >= warmup_us)
        .collect();
    let rolls: Vec<Roll> = rolls
        .into_iter()
        .filter(|r| r.seen_us >= warmup_us)
        .collect();
    // Which window a send is in: Some(true) under test, Some(false) steady, None neither.
    type Classify = Box<dyn Fn(&Send) -> Option<bool>>;
    let (stalled_name, steady_name, classify): (String, String, Classify) = match phase {
        Phase::Startup => {
            let (until, from) = (a.startup_secs * 1_000_000, a.steady_after_secs * 1_000_000);
            (
                format!("start-up (first {} s)", a.startup_secs),
                format!(
                    "steady ({}–{} s)",
                    a.steady_after_secs, a.startup_duration_secs
                ),
                Box::new(move |s: &Send| {
                    if s.start_us < until {
                        Some(true)
                    } else {
                        (s.start_us >= from).then_some(false)
                    }
                }),
            )
        }
        Phase::Roll => {
            let window = a.roll_window_ms * 1000;
            let spans: Vec<(u64, u64)> = rolls
                .iter()
                .map(|r| (r.before_us, r.seen_us + window))
                .collect();
            (
                format!(
                    "at a roll ({} rolls, {} ms after)",
                    rolls.len(),
                    a.roll_window_ms
                ),
                "steady (the rest)".into(),
                Box::new(move |s: &Send| {
                    Some(
                        spans
                            .iter()
                            .any(|&(from, to)| s.start_us <= to && s.end_us >= from),
                    )
                }),
            )
        }
    };
    let mut stalled = new_hist();
    let mut steady = new_hist();
    for s in &measured {
        let h = match classify(s) {
            Some(true) => &mut stalled,
            Some(false) => &mut steady,
            None => continue,
        };
        h.saturating_record(s.latency_us().max(1));
    }
    let stalled = LatencySummary::from_hist(&stalled);
    let steady = LatencySummary::from_hist(&steady);
    let p99_ratio = (stalled.count > 0 && steady.count > 0)
        .then(|| stalled.p99_us as f64 / steady.p99_us.max(1) as f64);
    Ok(PhaseReport {
        phase,
        segment_bytes,
        producers: load.producers,
        rate: load.rate,
        message_bytes: load.message_bytes,
        ready_ms,
        stalled: Window {
            name: stalled_name,
            latency: stalled,
        },
        steady: Window {
            name: steady_name,
            latency: steady,
        },
        p99_ratio,
        rolls,
        errors,
        timeline: timeline(&measured),
    })
}

type Sends = Arc<Mutex<Vec<Send>>>;

/// What a phase's load gave: every acked send, the rolls seen, failed sends by kind.
struct Driven {
    sends: Vec<Send>,
    rolls: Vec<Roll>,
    errors: BTreeMap<String, u64>,
}

/// Runs `load` against the broker; with `watch_rolls`, a thread notes each shard's rolls.
fn drive(
    name: &str,
    broker: &EmbeddedBroker,
    load: &Load,
    segment_bytes: u64,
    watch_rolls: bool,
) -> Result<Driven, String> {
    let topic = format!("ringmq-bench-{}-stalls-{name}", std::process::id());
    let admin = Admin::connect(&broker.addr).map_err(|e| format!("{}: {e}", broker.addr))?;
    admin
        .create_topic(&topic, 4)
        .map_err(|e| format!("cannot create topic {topic}: {e}"))?;
    let sends: Sends = Arc::new(Mutex::new(Vec::new()));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let watch = watch_rolls.then(|| {
        let (addr, stop) = (broker.addr.clone(), stop.clone());
        let cores = broker.split.load_cores.clone();
        std::thread::Builder::new()
            .name("bench-roll-watch".into())
            .spawn(move || watch_rolls_thread(&addr, &cores, base, segment_bytes, &stop))
            .expect("spawn roll watch")
    });
    let producers: Vec<JoinHandle<Result<(), String>>> = (0..load.producers)
        .map(|i| {
            let (addr, topic) = (broker.addr.clone(), topic.clone());
            let (sends, errors) = (sends.clone(), errors.clone());
            let cores = broker.split.load_cores.clone();
            let interval = Duration::from_secs_f64(load.producers as f64 / load.rate as f64);
            // Spread the producers' schedules over one interval.
            let phase = interval.mul_f64(i as f64 / load.producers as f64);
            let (length, bytes) = (load.length, load.message_bytes);
            std::thread::Builder::new()
                .name(format!("bench-producer-{i}"))
                .spawn(move || {
                    machine::pin_current_thread(&cores)?;
                    let producer = Producer::with_config(ProducerConfig::new(addr))
                        .map_err(|e| format!("producer {i} cannot start: {e}"))?;
                    let message = Message::new(Bytes::from(vec![0xA5u8; bytes]));
                    let clock = RealClock { base };
                    let mut pacer = Pacer::open(interval, phase);
                    let mut consecutive = 0u32;
                    while !runner::interrupted() {
                        let intended = pacer.intended(&clock);
                        if intended >= length {
                            break;
                        }
                        pacer.wait(&clock, intended);
                        match producer.send(&topic, QueueSelector::RoundRobin, &message) {
                            Ok(_) => {
                                consecutive = 0;
                                lock(&sends).push(Send {
                                    start_us: as_us(intended),
                                    end_us: as_us(clock.now()),
                                });
                            }
                            Err(e) => {
                                *lock(&errors).entry(error_kind(&e)).or_insert(0) += 1;
                                consecutive += 1;
                                if consecutive >= MAX_CONSECUTIVE_ERRORS {
                                    return Err(format!(
                                        "producer {i}: {consecutive} sends in a row failed, \
                                         last: {e}"
                                    ));
                                }
                            }
                        }
                    }
                    Ok(())
                })
                .expect("spawn producer")
        })
        .collect();
    let progress = {
        let (sends, stop, name) = (sends.clone(), stop.clone(), name.to_string());
        std::thread::Builder::new()
            .name("bench-progress".into())
            .spawn(move || progress_thread(&name, &sends, base, &stop))
            .expect("spawn progress")
    };
    let failures: Vec<String> = producers
        .into_iter()
        .filter_map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("a producer panicked".into()))
                .err()
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let _ = progress.join();
    let rolls = watch.map_or_else(Vec::new, |w| w.join().unwrap_or_default());
    if !failures.is_empty() {
        return Err(format!("[{name}] {}", failures.join("; ")));
    }
    let sends = std::mem::take(&mut *lock(&sends));
    let errors = std::mem::take(&mut *lock(&errors));
    Ok(Driven {
        sends,
        rolls,
        errors,
    })
}

/// Polls every shard's log end each [`ROLL_POLL`] and returns the rolls it saw. A record never
/// spans two segments and segments are `segment_bytes` long, so the log end's segment index
/// changes exactly when the shard rolls.
fn watch_rolls_thread(
    addr: &str,
    cores: &[usize],
    base: Instant,
    segment_bytes: u64,
    stop: &AtomicBool,
) -> Vec<Roll> {
    let _ = machine::pin_current_thread(cores);
    let Ok(admin) = Admin::connect(addr) else {
        eprintln!("warning: the roll watch cannot reach {addr}: no rolls are attributed");
        return Vec::new();
    };
    let mut segments: BTreeMap<u32, u64> = BTreeMap::new();
    let mut rolls = Vec::new();
    let mut before_us = 0;
    while !stop.load(Ordering::Relaxed) {
        let asked_us = as_us(base.elapsed());
        if let Ok(shards) = admin.broker_stats() {
            let seen_us = as_us(base.elapsed());
            for s in &shards {
                let segment = s.written / segment_bytes;
                let last = segments.insert(s.shard, segment);
                if last.is_some_and(|l| l < segment) {
                    rolls.push(Roll {
                        shard: s.shard,
                        segment,
                        before_us,
                        seen_us,
                    });
                }
            }
            before_us = asked_us;
        }
        std::thread::sleep(ROLL_POLL);
    }
    rolls
}

/// One line per second on stderr: sends acked in the last second and their p99.
fn progress_thread(name: &str, sends: &Sends, base: Instant, stop: &AtomicBool) {
    let mut seen = 0;
    let mut second = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let tick = base + Duration::from_secs(second);
        let now = Instant::now();
        if now < tick {
            std::thread::sleep((tick - now).min(Duration::from_millis(50)));
            continue;
        }
        let mut latencies: Vec<u64> = lock(sends)[seen..].iter().map(Send::latency_us).collect();
        seen += latencies.len();
        latencies.sort_unstable();
        let p99 = percentile(&latencies, 0.99);
        eprintln!(
            "[{name}] {second:>4}s {:>7} sends  p99 {:>9}",
            latencies.len(),
            p99.map_or("-".into(), fmt_us)
        );
        second += 1;
    }
}

fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// Sends by the second they were intended in, with that second's p99.
fn timeline(sends: &[Send]) -> Vec<TimelinePoint> {
    let mut by_second: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in sends {
        by_second
            .entry(s.start_us / 1_000_000)
            .or_default()
            .push(s.latency_us());
    }
    by_second
        .into_iter()
        .map(|(second, mut l)| {
            l.sort_unstable();
            TimelinePoint {
                second,
                sends: l.len() as u64,
                p99_us: percentile(&l, 0.99),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_takes_the_value_at_or_above_the_share() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.99), None);
    }

    #[test]
    fn the_timeline_groups_sends_by_their_intended_second() {
        let s = |start_us, lat| Send {
            start_us,
            end_us: start_us + lat,
        };
        let t = timeline(&[s(10, 5), s(999_999, 7), s(1_000_000, 100)]);
        let got: Vec<(u64, u64, Option<u64>)> =
            t.iter().map(|p| (p.second, p.sends, p.p99_us)).collect();
        assert_eq!(got, [(0, 2, Some(7)), (1, 1, Some(100))]);
    }
}
