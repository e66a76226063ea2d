//! Broker-side flush figures: fsyncs/s, acks per fsync, unflushed-bytes high-water mark.
//!
//! [`snapshot`] reads the broker's counters with the BrokerStats request (summed over shards);
//! a broker that cannot answer gives "n/a" figures rather than failing the run.

use ringmq::client::Admin;
use serde::{Deserialize, Serialize};

/// Cumulative counters as the broker would report them (summed over shards).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerCounters {
    /// fdatasync calls completed since start.
    pub fsyncs: u64,
    /// Records appended since start: one per produce batch, so one per ack.
    pub acks: u64,
    /// Largest unflushed (appended, not yet durable) byte count seen since start.
    pub unflushed_bytes_hwm: u64,
}

/// Reads the broker's counters, summed over its shards.
pub fn snapshot(admin: &Admin) -> Option<BrokerCounters> {
    let shards = admin.broker_stats().ok()?;
    Some(
        shards
            .iter()
            .fold(BrokerCounters::default(), |acc, s| BrokerCounters {
                fsyncs: acc.fsyncs + s.fsyncs,
                acks: acc.acks + s.appends,
                unflushed_bytes_hwm: acc.unflushed_bytes_hwm.max(s.unflushed_bytes_max),
            }),
    )
}

/// The figures of the measured window. `None` = "n/a".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerStats {
    pub fsyncs_per_sec: Option<f64>,
    pub acks_per_fsync: Option<f64>,
    pub unflushed_bytes_hwm: Option<f64>,
}

impl BrokerStats {
    /// Figures between two snapshots `secs` apart.
    pub fn between(
        before: Option<BrokerCounters>,
        after: Option<BrokerCounters>,
        secs: f64,
    ) -> BrokerStats {
        let (Some(b), Some(a)) = (before, after) else {
            return BrokerStats::default();
        };
        let fsyncs = a.fsyncs.saturating_sub(b.fsyncs);
        let acks = a.acks.saturating_sub(b.acks);
        BrokerStats {
            fsyncs_per_sec: (secs > 0.0).then(|| fsyncs as f64 / secs),
            acks_per_fsync: (fsyncs > 0).then(|| acks as f64 / fsyncs as f64),
            unflushed_bytes_hwm: Some(a.unflushed_bytes_hwm as f64),
        }
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
            acks: 1000,
            unflushed_bytes_hwm: 10,
        };
        let a = BrokerCounters {
            fsyncs: 300,
            acks: 3000,
            unflushed_bytes_hwm: 4096,
        };
        let s = BrokerStats::between(Some(b), Some(a), 2.0);
        assert_eq!(s.fsyncs_per_sec, Some(100.0));
        assert_eq!(s.acks_per_fsync, Some(10.0));
        assert_eq!(s.unflushed_bytes_hwm, Some(4096.0));
        assert_eq!(
            BrokerStats::between(None, Some(a), 2.0),
            BrokerStats::default()
        );
        assert_eq!(fmt_opt(None, 1), "n/a");
        assert_eq!(fmt_opt(Some(2.26), 1), "2.3");
    }
}
