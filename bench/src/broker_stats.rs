//! Broker-side figures: fsyncs/s, appends (produce requests) per fsync, the largest unflushed
//! byte count of the measured window, and in the replication modes the slave's lag as the
//! master sees it.
//!
//! [`snapshot`] reads the broker's counters with the BrokerStats request (summed over shards);
//! a broker that cannot answer gives "n/a" figures rather than failing the run.
//! [`ReplicationWatch`] polls the broker's BrokerStats every [`LAG_POLL_INTERVAL`] during the
//! load: lag and unflushed bytes are gauges, so their maxima in the measured window can only
//! be seen by sampling them (the broker's own unflushed maximum counts from its start, warm-up
//! included).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringmq::client::Admin;
use ringmq::protocol::{ReplicaStats, ShardStats};
use serde::{Deserialize, Serialize};

use crate::machine;

/// How often the replication watch asks the master for its stats: often enough to catch a
/// lag spike of a few hundred milliseconds, rarely enough (one small request on the master's
/// core) not to move the figures.
pub const LAG_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Cumulative counters as the broker would report them (summed over shards).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerCounters {
    /// fdatasync calls completed since start.
    pub fsyncs: u64,
    /// Records appended since start: one per produce request (batch).
    pub appends: u64,
    /// Time spent in flush cycles (hand-off, write, fdatasync) since start, µs.
    pub flush_us: u64,
}

/// Reads the broker's counters, summed over its shards.
pub fn snapshot(admin: &Admin) -> Option<BrokerCounters> {
    let shards = admin.broker_stats().ok()?;
    Some(
        shards
            .iter()
            .fold(BrokerCounters::default(), |acc, s| BrokerCounters {
                fsyncs: acc.fsyncs + s.fsyncs,
                appends: acc.appends + s.appends,
                flush_us: acc.flush_us + s.flush_latency_us_total,
            }),
    )
}

/// The figures of the measured window. `None` = "n/a".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerStats {
    pub fsyncs_per_sec: Option<f64>,
    /// Records (produce requests) appended per fdatasync: how many requests one group commit
    /// covered. Not acks: an ack may cover a batch of many messages.
    pub appends_per_fsync: Option<f64>,
    /// The largest unflushed byte count (summed over shards) the polls saw in the measured
    /// window; sampled every [`LAG_POLL_INTERVAL`], so a shorter peak may be missed.
    pub unflushed_max_bytes: Option<f64>,
    /// Mean flush cycle in the measured window, µs: from handing the log's tail to a write to
    /// the end of its fdatasync (per fsync: a cycle syncs one segment unless it crossed a
    /// roll). Against a request's latency it says how much of it the disk took.
    #[serde(default)]
    pub flush_cycle_mean_us: Option<f64>,
}

impl BrokerStats {
    /// Figures between two snapshots `secs` apart; `unflushed_max` from the polls.
    pub fn between(
        before: Option<BrokerCounters>,
        after: Option<BrokerCounters>,
        secs: f64,
        unflushed_max: Option<u64>,
    ) -> BrokerStats {
        let (Some(b), Some(a)) = (before, after) else {
            return BrokerStats::default();
        };
        let fsyncs = a.fsyncs.saturating_sub(b.fsyncs);
        let appends = a.appends.saturating_sub(b.appends);
        BrokerStats {
            fsyncs_per_sec: (secs > 0.0).then(|| fsyncs as f64 / secs),
            appends_per_fsync: (fsyncs > 0).then(|| appends as f64 / fsyncs as f64),
            unflushed_max_bytes: unflushed_max.map(|b| b as f64),
            flush_cycle_mean_us: (fsyncs > 0)
                .then(|| a.flush_us.saturating_sub(b.flush_us) as f64 / fsyncs as f64),
        }
    }
}

/// The slave's lag and link as the master reported them during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationFigures {
    /// Largest `lag_bytes` (master's log end minus what the slave acknowledged as received)
    /// seen by any poll in the measured window, over all shards. None: no poll answered.
    pub max_lag_bytes: Option<u64>,
    /// Largest `lag_ms` (age of the oldest byte the slave does not have) in the same polls.
    pub max_lag_ms: Option<u64>,
    /// Lag at the last poll, taken after the load stopped and before the slave was stopped.
    pub end_lag_bytes: Option<u64>,
    /// Every answered poll from the start of the load to its end saw every shard's link
    /// streaming, and the link never reconnected.
    pub link_stayed_up: bool,
    /// Polls answered, and among them those where some shard was not streaming.
    pub polls: u64,
    pub polls_not_streaming: u64,
    /// Polls the master did not answer (not counted as a link failure).
    pub polls_failed: u64,
    /// Times the link reconnected during the run (growth of the master's `connects`).
    pub reconnects: u64,
}

/// Accumulates polls into [`ReplicationFigures`]; pure, so it is tested without a broker.
#[derive(Debug, Default)]
pub struct LagTracker {
    figures: ReplicationFigures,
    first_connects: Option<u64>,
    /// Largest unflushed bytes (summed over shards) in the measured window's polls.
    unflushed_max: Option<u64>,
}

impl LagTracker {
    /// One answered poll; `measured` = inside the measured window (lag maxima count).
    pub fn on_poll(&mut self, shards: &[ShardStats], measured: bool) {
        let f = &mut self.figures;
        f.polls += 1;
        let r: Vec<&ReplicaStats> = shards.iter().map(|s| &s.replication).collect();
        if r.is_empty() || r.iter().any(|r| r.link != ReplicaStats::LINK_STREAMING) {
            f.polls_not_streaming += 1;
        }
        let connects: u64 = r.iter().map(|r| r.connects).sum();
        let first = *self.first_connects.get_or_insert(connects);
        f.reconnects = f.reconnects.max(connects.saturating_sub(first));
        let lag_bytes = r.iter().map(|r| r.lag_bytes).max().unwrap_or(0);
        let lag_ms = r.iter().map(|r| r.lag_ms).max().unwrap_or(0);
        if measured {
            let unflushed = shards.iter().map(|s| s.unflushed_bytes).sum::<u64>();
            self.unflushed_max = Some(self.unflushed_max.unwrap_or(0).max(unflushed));
            f.max_lag_bytes = Some(f.max_lag_bytes.unwrap_or(0).max(lag_bytes));
            f.max_lag_ms = Some(f.max_lag_ms.unwrap_or(0).max(lag_ms));
        }
        f.end_lag_bytes = Some(lag_bytes);
    }

    pub fn on_failed_poll(&mut self) {
        self.figures.polls_failed += 1;
    }

    /// The largest unflushed byte count the measured window's polls saw.
    pub fn unflushed_max(&self) -> Option<u64> {
        self.unflushed_max
    }

    pub fn figures(&self) -> ReplicationFigures {
        let mut f = self.figures.clone();
        f.link_stayed_up = f.polls > 0 && f.polls_not_streaming == 0 && f.reconnects == 0;
        f
    }
}

/// A thread polling the master's BrokerStats until [`ReplicationWatch::finish`].
pub struct ReplicationWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<LagTracker>,
}

impl ReplicationWatch {
    /// Starts polling the master at `addr`; lag maxima count from `measure_from` on. The
    /// thread runs on `cores` (the load's), never on the master's.
    pub fn start(addr: &str, measure_from: Instant, cores: &[usize]) -> Result<Self, String> {
        let admin = Admin::connect(addr)
            .map_err(|e| format!("replication watch: cannot reach {addr}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, cores) = (stop.clone(), cores.to_vec());
        let thread = std::thread::Builder::new()
            .name("bench-lag-watch".into())
            .spawn(move || {
                let _ = machine::pin_current_thread(&cores);
                let mut t = LagTracker::default();
                let poll = |t: &mut LagTracker| match admin.broker_stats() {
                    Ok(s) => t.on_poll(&s, Instant::now() >= measure_from),
                    Err(_) => t.on_failed_poll(),
                };
                while !flag.load(Ordering::Relaxed) {
                    poll(&mut t);
                    let next = Instant::now() + LAG_POLL_INTERVAL;
                    while !flag.load(Ordering::Relaxed) && Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                // The state when the load stopped, before anything is torn down.
                poll(&mut t);
                t
            })
            .map_err(|e| format!("cannot spawn the replication watch: {e}"))?;
        Ok(ReplicationWatch { stop, thread })
    }

    /// The slave's figures and the largest unflushed byte count of the measured window.
    pub fn finish(self) -> (ReplicationFigures, Option<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map(|t| (t.figures(), t.unflushed_max()))
            .unwrap_or_default()
    }
}

/// "n/a" for a missing figure, else the value with `decimals` decimals.
pub fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "n/a".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_over_the_window() {
        let b = BrokerCounters {
            fsyncs: 100,
            appends: 1000,
            flush_us: 50_000,
        };
        let a = BrokerCounters {
            fsyncs: 300,
            appends: 3000,
            flush_us: 130_000,
        };
        let s = BrokerStats::between(Some(b), Some(a), 2.0, Some(4096));
        assert_eq!(s.fsyncs_per_sec, Some(100.0));
        assert_eq!(s.appends_per_fsync, Some(10.0));
        assert_eq!(s.unflushed_max_bytes, Some(4096.0));
        assert_eq!(s.flush_cycle_mean_us, Some(400.0));
        assert_eq!(
            BrokerStats::between(None, Some(a), 2.0, None),
            BrokerStats::default()
        );
        assert_eq!(fmt_opt(None, 1), "n/a");
        assert_eq!(fmt_opt(Some(2.26), 1), "2.3");
    }

    fn shard(link: u8, lag_bytes: u64, lag_ms: u64, connects: u64) -> ShardStats {
        ShardStats {
            replication: ReplicaStats {
                link,
                lag_bytes,
                lag_ms,
                connects,
                ..ReplicaStats::default()
            },
            ..ShardStats::default()
        }
    }

    #[test]
    fn lag_maxima_count_only_in_the_measured_window() {
        let mut t = LagTracker::default();
        let unflushed = |mut s: ShardStats, bytes: u64| {
            s.unflushed_bytes = bytes;
            s
        };
        t.on_poll(
            &[
                unflushed(shard(2, 9_999_999, 9_999, 1), 1 << 30),
                shard(2, 0, 0, 1),
            ],
            false,
        );
        t.on_poll(
            &[
                unflushed(shard(2, 4096, 3, 1), 300),
                unflushed(shard(2, 100, 7, 1), 200),
            ],
            true,
        );
        t.on_poll(&[shard(2, 0, 0, 1), shard(2, 0, 0, 1)], true);
        t.on_failed_poll();
        assert_eq!(
            t.unflushed_max(),
            Some(500),
            "the warm-up's 1 GiB does not count"
        );
        let f = t.figures();
        assert_eq!(f.max_lag_bytes, Some(4096));
        assert_eq!(f.max_lag_ms, Some(7));
        assert_eq!(f.end_lag_bytes, Some(0));
        assert_eq!((f.polls, f.polls_failed), (3, 1));
        assert!(f.link_stayed_up);
    }

    #[test]
    fn a_link_that_drops_or_reconnects_did_not_stay_up() {
        let mut t = LagTracker::default();
        t.on_poll(&[shard(2, 0, 0, 1)], true);
        t.on_poll(&[shard(1, 0, 0, 1)], true);
        let f = t.figures();
        assert_eq!(f.polls_not_streaming, 1);
        assert!(!f.link_stayed_up);

        // Down between two polls: only the connects counter tells.
        let mut t = LagTracker::default();
        t.on_poll(&[shard(2, 0, 0, 1)], true);
        t.on_poll(&[shard(2, 0, 0, 2)], true);
        assert_eq!(t.figures().reconnects, 1);
        assert!(!t.figures().link_stayed_up);

        // Nothing answered: nothing is known, so the link is not claimed up.
        let mut t = LagTracker::default();
        t.on_failed_poll();
        assert!(!t.figures().link_stayed_up);
        assert_eq!(t.figures().max_lag_bytes, None);
    }
}
