//! Latency recording: HdrHistograms in microseconds, per-thread statistics, and the pacer that
//! drives an open-loop schedule.
//!
//! Every producer and consumer thread owns a [`ThreadStats`] (behind a mutex only the thread
//! itself, its client callbacks and the once-a-second progress reader touch). At the end the
//! per-thread histograms are merged with [`merge`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest recordable latency: 60 s in microseconds (larger values saturate to it).
pub const MAX_US: u64 = 60_000_000;
/// Significant digits: 3, i.e. values within 0.1 %.
pub const SIGFIG: u8 = 3;

pub type Hist = Histogram<u64>;

/// An empty histogram covering 1 µs ..= 60 s at 3 significant digits.
pub fn new_hist() -> Hist {
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).expect("valid histogram bounds")
}

/// Adds `from` into `into` (both made by [`new_hist`], so this cannot fail on range).
pub fn merge(into: &mut Hist, from: &Hist) {
    into.add(from).expect("histograms share bounds");
}

/// Merges many histograms into a fresh one.
pub fn merge_all<'a>(hists: impl IntoIterator<Item = &'a Hist>) -> Hist {
    let mut out = new_hist();
    for h in hists {
        merge(&mut out, h);
    }
    out
}

/// Microseconds in a duration, saturating at [`MAX_US`].
pub fn as_us(d: Duration) -> u64 {
    (d.as_micros().min(u128::from(MAX_US))) as u64
}

/// The figures a report shows for one latency distribution, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub p9999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn from_hist(h: &Hist) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean_us: h.mean(),
            min_us: h.min(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            p9999_us: h.value_at_quantile(0.9999),
            max_us: h.max(),
        }
    }
}

/// What one producer or consumer thread has recorded.
pub struct ThreadStats {
    /// Latencies of the measured window (warm-up excluded).
    pub total: Hist,
    /// Latencies since the progress reader last looked (warm-up included).
    pub interval: Hist,
    /// Messages completed since the progress reader last looked.
    pub interval_msgs: u64,
    /// Messages completed successfully, warm-up included.
    pub ok_msgs: u64,
    /// Messages completed in the measured window and their payload bytes.
    pub measured_msgs: u64,
    pub measured_bytes: u64,
    /// Failed messages by error kind (warm-up included: an error is never hidden).
    pub errors: BTreeMap<String, u64>,
    /// When the last measured message completed.
    pub last_completion: Option<Instant>,
}

pub type SharedStats = Arc<Mutex<ThreadStats>>;

impl Default for ThreadStats {
    fn default() -> Self {
        ThreadStats {
            total: new_hist(),
            interval: new_hist(),
            interval_msgs: 0,
            ok_msgs: 0,
            measured_msgs: 0,
            measured_bytes: 0,
            errors: BTreeMap::new(),
            last_completion: None,
        }
    }
}

impl ThreadStats {
    pub fn shared() -> SharedStats {
        Arc::new(Mutex::new(ThreadStats::default()))
    }

    /// `msgs` messages (of `bytes` payload bytes in all) completed with `latency_us` each.
    pub fn record(&mut self, latency_us: u64, msgs: u64, bytes: u64, measured: bool) {
        let v = latency_us.min(MAX_US);
        self.interval.saturating_record_n(v, msgs);
        self.interval_msgs += msgs;
        self.ok_msgs += msgs;
        if measured {
            self.total.saturating_record_n(v, msgs);
            self.measured_msgs += msgs;
            self.measured_bytes += bytes;
            self.last_completion = Some(Instant::now());
        }
    }

    pub fn error(&mut self, kind: String, msgs: u64) {
        *self.errors.entry(kind).or_insert(0) += msgs;
    }

    /// Takes the interval figures (for the progress line) and starts a new interval.
    pub fn take_interval(&mut self) -> (Hist, u64) {
        let h = std::mem::replace(&mut self.interval, new_hist());
        let n = std::mem::take(&mut self.interval_msgs);
        (h, n)
    }
}

/// Time as the load loop sees it: elapsed since the run's start.
pub trait Clock {
    fn now(&self) -> Duration;
    fn sleep_until(&self, t: Duration);
}

/// The real clock.
pub struct RealClock {
    pub base: Instant,
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.base.elapsed()
    }

    fn sleep_until(&self, t: Duration) {
        loop {
            let now = self.now();
            if now >= t {
                return;
            }
            let left = t - now;
            if left > Duration::from_micros(200) {
                // Wake a little early; the kernel's timer slack makes sleeps overshoot.
                std::thread::sleep(left - Duration::from_micros(100));
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Says when each send is meant to happen.
///
/// Closed loop (`interval == None`): a send is meant to happen now, so latency is service time.
/// Open loop: send `i` is meant to happen at `phase + i * interval`, whatever happened before;
/// latency is measured from that intended time, so a stalled ack delays every later send and
/// all of them count the stall (no coordinated omission).
pub struct Pacer {
    interval: Option<Duration>,
    phase: Duration,
    next: u64,
}

impl Pacer {
    pub fn closed() -> Pacer {
        Pacer {
            interval: None,
            phase: Duration::ZERO,
            next: 0,
        }
    }

    pub fn open(interval: Duration, phase: Duration) -> Pacer {
        Pacer {
            interval: Some(interval),
            phase,
            next: 0,
        }
    }

    /// The intended time of the next send (closed loop: now). Does not wait.
    pub fn intended<C: Clock>(&self, clock: &C) -> Duration {
        match self.interval {
            None => clock.now(),
            Some(iv) => self.phase + iv.mul_f64(self.next as f64),
        }
    }

    /// Moves on to the next send without waiting (for a caller that waits on its own).
    pub fn advance(&mut self) {
        self.next += 1;
    }

    /// Waits until `intended` (a no-op when already late or closed loop) and moves on.
    pub fn wait<C: Clock>(&mut self, clock: &C, intended: Duration) {
        if self.interval.is_some() {
            clock.sleep_until(intended);
        }
        self.next += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..=1000 {
            a.record(v).unwrap();
        }
        b.record_n(50_000, 10).unwrap();
        b.record(MAX_US).unwrap();
        let mut c = new_hist();
        c.record(7).unwrap();
        let m = merge_all([&a, &b, &c]);
        assert_eq!(m.len(), 1000 + 10 + 1 + 1);
        assert_eq!(m.min(), 1);
        assert!(m.equivalent(m.max(), MAX_US));
        let s = LatencySummary::from_hist(&m);
        assert_eq!(s.count, 1012);
        assert!(s.p50_us >= 490 && s.p50_us <= 520, "{s:?}");
        assert!(s.p99_us >= 49_900, "{s:?}");
        assert!(s.p50_us <= s.p90_us && s.p90_us <= s.p99_us && s.p99_us <= s.p999_us);
        assert!(s.p999_us <= s.p9999_us && s.p9999_us <= s.max_us);
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(
            LatencySummary::from_hist(&new_hist()),
            LatencySummary::default()
        );
    }

    #[test]
    fn thread_stats_separate_warmup_from_measured() {
        let mut t = ThreadStats::default();
        t.record(100, 5, 500, false);
        t.record(200, 3, 300, true);
        t.record(MAX_US * 2, 1, 100, true); // saturates, does not panic
        t.error("Timeout".into(), 2);
        assert_eq!(t.ok_msgs, 9);
        assert_eq!(t.measured_msgs, 4);
        assert_eq!(t.measured_bytes, 400);
        assert_eq!(t.total.len(), 4);
        let (h, n) = t.take_interval();
        assert_eq!((h.len(), n), (9, 9));
        assert_eq!(t.take_interval().1, 0);
        assert_eq!(t.errors["Timeout"], 2);
    }

    /// A clock that only moves when the simulated work says so.
    struct FakeClock {
        t: Cell<Duration>,
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            self.t.get()
        }
        fn sleep_until(&self, t: Duration) {
            if t > self.t.get() {
                self.t.set(t);
            }
        }
    }

    /// 1000 sends/s for 2 s; send 500 stalls for 100 ms, every other takes 10 µs.
    fn simulate(pacer: &mut Pacer, clock: &FakeClock) -> Hist {
        let mut h = new_hist();
        for i in 0..2000u64 {
            let intended = pacer.intended(clock);
            pacer.wait(clock, intended);
            let service = if i == 500 {
                Duration::from_millis(100)
            } else {
                Duration::from_micros(10)
            };
            clock.t.set(clock.t.get() + service);
            h.record(as_us(clock.now() - intended).max(1)).unwrap();
        }
        h
    }

    #[test]
    fn open_loop_counts_a_stall_against_every_delayed_send() {
        let clock = FakeClock {
            t: Cell::new(Duration::ZERO),
        };
        let mut pacer = Pacer::open(Duration::from_millis(1), Duration::ZERO);
        let h = simulate(&mut pacer, &clock);
        assert_eq!(h.len(), 2000);
        // The stalled send plus the ~100 sends scheduled during the stall are all late ...
        let late = h.count_between(1_000, MAX_US);
        assert!((95..=105).contains(&late), "late sends: {late}");
        // ... by 100 ms, 99 ms, ... 1 ms: about half of them by at least 50 ms.
        let very_late = h.count_between(50_000, MAX_US);
        assert!(
            (45..=55).contains(&very_late),
            "sends >= 50 ms: {very_late}"
        );
        assert!(h.max() >= 99_000, "max {}", h.max());
        // 100 of 2000 samples are late, so p99 (sample 1980) shows the stall; p90 does not.
        assert!(h.value_at_quantile(0.99) >= 10_000);
        assert!(h.value_at_quantile(0.90) < 1_000);
        // The schedule caught up: the run ends near 2 s, not 2.1 s.
        assert!(
            clock.now() < Duration::from_millis(2010),
            "{:?}",
            clock.now()
        );
    }

    #[test]
    fn closed_loop_sees_the_stall_once() {
        // The same stall measured from the actual send time: coordinated omission hides it.
        let clock = FakeClock {
            t: Cell::new(Duration::ZERO),
        };
        let mut pacer = Pacer::closed();
        let h = simulate(&mut pacer, &clock);
        assert_eq!(h.count_between(1_000, MAX_US), 1);
    }

    #[test]
    fn open_loop_phase_offsets_the_schedule() {
        let clock = FakeClock {
            t: Cell::new(Duration::ZERO),
        };
        let mut p = Pacer::open(Duration::from_millis(4), Duration::from_millis(1));
        let a = p.intended(&clock);
        p.wait(&clock, a);
        let b = p.intended(&clock);
        assert_eq!((a, b), (Duration::from_millis(1), Duration::from_millis(5)));
        assert_eq!(clock.now(), Duration::from_millis(1));
    }
}
