//! The broker's typed configuration, in sections.
//!
//! One [`Config`] of three sections with documented defaults, each owned by the module that
//! uses it: [`ServerConfig`] (`[server]`, here), [`StorageConfig`] (`[storage]`, in
//! `storage::config`) and [`ReplicationConfig`] (`[replication]`, in `config::replication`, since the shard and replication layers both read it).
//! Each section has its `Default` and a `problems()` check with one bound per setting; the
//! sections never import this module. A config is read from a TOML file (`--config`, one
//! table per section), then every field can be overridden by a command-line flag (see
//! `src/broker_args.rs`), then [`Config::validate`] reports every problem of every section at
//! once, so an operator fixes a config in one round trip. The effective config is logged at
//! start ([`Config::to_toml`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod replication;

pub use crate::storage::StorageConfig;
pub use replication::ReplicationConfig;

/// Errors from loading or validating a [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
    Invalid { problems: Vec<String> },
}

/// Which cores run shards: all online cores, the first N, or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CoreSelection {
    #[default]
    All,
    Count(usize),
    List(Vec<usize>),
}

impl CoreSelection {
    /// Resolves the selection against the cores this process may run on.
    pub fn resolve(&self, available: &[usize]) -> Result<Vec<usize>, String> {
        match self {
            CoreSelection::All => Ok(available.to_vec()),
            CoreSelection::Count(n) if *n == 0 => {
                Err("cores: a count must be at least 1 (to name core 0 alone, write `0,`)".into())
            }
            CoreSelection::Count(n) if *n > available.len() => Err(format!(
                "cores: asked for {n} cores but only {} are available ({available:?})",
                available.len()
            )),
            CoreSelection::Count(n) => Ok(available[..*n].to_vec()),
            CoreSelection::List(list) => {
                if list.is_empty() {
                    return Err("cores: the list is empty".into());
                }
                for c in list {
                    if !available.contains(c) {
                        return Err(format!(
                            "cores: core {c} is not available to this process (available: {available:?})"
                        ));
                    }
                }
                let mut dedup = list.clone();
                dedup.sort_unstable();
                dedup.dedup();
                if dedup.len() != list.len() {
                    return Err(format!("cores: {list:?} names a core twice"));
                }
                Ok(list.clone())
            }
        }
    }
}

impl FromStr for CoreSelection {
    type Err = String;

    /// `all`, a count (`2`), or a comma-separated list of core ids (`0,1`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(CoreSelection::All);
        }
        if s.contains(',') {
            // `1,` names core 1 alone (a bare `1` is a count).
            let list = s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("cores: {s:?} is not a list of core ids like 0,1"))?;
            return Ok(CoreSelection::List(list));
        }
        s.parse::<usize>()
            .map(CoreSelection::Count)
            .map_err(|_| format!("cores: {s:?} is not `all`, a count, or a list like 0,1"))
    }
}

impl fmt::Display for CoreSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreSelection::All => write!(f, "all"),
            CoreSelection::Count(n) => write!(f, "{n}"),
            // One core is written `1,`: a bare `1` would read back as a count.
            CoreSelection::List(l) if l.len() == 1 => write!(f, "{},", l[0]),
            CoreSelection::List(l) => {
                let parts: Vec<String> = l.iter().map(|c| c.to_string()).collect();
                write!(f, "{}", parts.join(","))
            }
        }
    }
}

impl Serialize for CoreSelection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CoreSelection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(CoreSelection::Count(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Where the broker serves its Prometheus metrics (`GET /metrics`, HTTP/1.1): `off`, or a
/// `host:port` to bind (port 0 picks a free one). Default [`DEFAULT_METRICS_LISTEN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    Addr(String),
}

/// 9400: not taken by Prometheus' well-known exporters, and next to nothing RingMQ uses.
/// Loopback only by default: the endpoint has no authentication.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9400";

impl Default for MetricsListen {
    fn default() -> Self {
        MetricsListen::Addr(DEFAULT_METRICS_LISTEN.to_string())
    }
}

impl MetricsListen {
    /// The address to bind, `None` when off.
    pub fn addr(&self) -> Option<&str> {
        match self {
            MetricsListen::Off => None,
            MetricsListen::Addr(a) => Some(a),
        }
    }
}

impl FromStr for MetricsListen {
    type Err = String;

    /// `off` (also `none`, `false`, `no`), or `host:port` (an IPv6 host in brackets).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if ["off", "none", "false", "no"]
            .iter()
            .any(|w| s.eq_ignore_ascii_case(w))
        {
            return Ok(MetricsListen::Off);
        }
        let bad = || format!("metrics_listen: {s:?} is not `off` or HOST:PORT like 127.0.0.1:9400");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(MetricsListen::Addr(s.to_string()))
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Off => f.write_str("off"),
            MetricsListen::Addr(a) => f.write_str(a),
        }
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The broker process's own settings (the `[server]` section): where its data lives, where it
/// listens, which cores run shards, and what one connection may make it hold. Field names
/// carry their unit last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Root of all broker data: `shard-<n>/` per shard and `topics.toml`. Default `./ringmq-data`.
    pub data_dir: PathBuf,
    /// Address the listeners bind to. Default `127.0.0.1`.
    pub listen_host: String,
    /// Host written into routes for clients; defaults to `listen_host`.
    pub advertised_host: Option<String>,
    /// Shard `i` listens on `port + i` (a port per shard, so shard-aware clients never pay a
    /// cross-core hop). Default 10911 (RocketMQ's broker port). 0 picks free ports (tests).
    pub port: u16,
    /// Cores that run shards: `all` (default), a count, or a list like `0,1`.
    pub cores: CoreSelection,
    /// Requests one connection may have in flight before the broker stops reading from it.
    /// Default 4096.
    pub max_inflight_requests_per_connection: u32,
    /// Bytes one connection may make the broker hold: bodies of requests being handled plus
    /// responses not yet written to its socket (each charged for its largest size before it
    /// is handled). When spent, the broker stops reading that connection. Default 64 MiB.
    pub max_inflight_bytes_per_connection: u64,
    /// Bytes all connections of one shard may make it hold together (request bodies, frames
    /// being read, responses until written). Past it a produce gets SYSTEM_BUSY (retriable;
    /// the client backs off and re-sends) and other requests wait; the last quarter is kept
    /// for produce. At least one max-size request. Default 134217728 (128 MiB: under a wire
    /// fuzzer the broker's peak RSS fell from 924 to 247 MiB with it).
    pub shard_inflight_bytes: u64,
    /// A frame must arrive whole within this long of its first byte, or the connection is
    /// closed (a stalled or trickling client must not pin buffers forever; bytes arriving do
    /// not restart the clock). Idle connections between frames are kept. Default 10000.
    pub partial_frame_timeout_ms: u64,
    /// Refuse (false, default) or allow with a loud warning (true) a data dir on a file system
    /// without O_DIRECT such as tmpfs, where "durable" would mean nothing.
    pub allow_non_direct_io: bool,
    /// Bytes of io_uring registered buffer memory per shard. Default 0 = glommio's default
    /// (10 MiB); when not root, memlock (often 8 MiB) must cover all shards together.
    pub io_memory_bytes: u64,
    /// How long a shard's executor keeps polling its io_uring rings for completions after it
    /// ran out of work, before it parks its thread in the kernel. Waking a parked vCPU costs
    /// tens of µs on a VM, on every disk completion and every request that arrives; spinning
    /// keeps the core busy instead (at most this long after each burst of work). 0 = park at
    /// once. Default 0.
    pub spin_before_park_us: u64,
    /// The Prometheus endpoint: `off` or `host:port`. Served by a thread of its own, never by
    /// a shard. Default `127.0.0.1:9400`.
    pub metrics_listen: MetricsListen,
    /// Transactions: a half message with no end this long after it was stored is checked back
    /// with a live member of its producer group. Default 6000 (RocketMQ's).
    pub transaction_timeout_ms: u64,
    /// Transactions: how often an unresolved check is repeated. Default 6000.
    pub transaction_check_interval_ms: u64,
    /// Transactions: checks before a half message is rolled back and recorded as discarded.
    /// Default 15 (RocketMQ's).
    pub transaction_check_max: u32,
    /// Flow control: a produce that waited longer than this for the log to take it (its turn
    /// in the append line, room for its write, the next segment) is refused with SYSTEM_BUSY
    /// (retriable) instead of waiting on. 0: no bound. Default 1000 (RocketMQ's queue bound is
    /// 200 ms; ours also covers a segment roll, which on this disk can take ~0.7 s).
    pub max_queue_wait_ms: u64,
    /// Flow control: while the log's appended bytes lead its durable ones by more than this,
    /// produces are refused with SYSTEM_BUSY (under ASYNC_FLUSH this bounds what a crash can
    /// take back). 0: no bound. Default 268435456 (256 MiB).
    pub max_flush_lag_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./ringmq-data"),
            listen_host: "127.0.0.1".into(),
            advertised_host: None,
            port: 10911,
            cores: CoreSelection::All,
            max_inflight_requests_per_connection: 4096,
            max_inflight_bytes_per_connection: 64 << 20,
            shard_inflight_bytes: 128 << 20,
            partial_frame_timeout_ms: 10_000,
            allow_non_direct_io: false,
            io_memory_bytes: 0,
            spin_before_park_us: 0,
            metrics_listen: MetricsListen::default(),
            transaction_timeout_ms: 6_000,
            transaction_check_interval_ms: 6_000,
            transaction_check_max: 15,
            max_queue_wait_ms: 1_000,
            max_flush_lag_bytes: 256 << 20,
        }
    }
}

impl ServerConfig {
    /// Every problem of this section, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.data_dir.as_os_str().is_empty() {
            problems.push("data_dir is empty".to_string());
        }
        if self.listen_host.trim().is_empty() {
            problems.push("listen_host is empty".to_string());
        }
        if self.partial_frame_timeout_ms == 0 {
            problems.push("partial_frame_timeout_ms must be at least 1".to_string());
        }
        if self.max_inflight_requests_per_connection == 0 {
            problems.push("max_inflight_requests_per_connection must be at least 1".to_string());
        }
        if self.shard_inflight_bytes < crate::protocol::MAX_BODY_BYTES as u64 {
            problems.push(format!(
                "shard_inflight_bytes is {} but must hold one max-size request ({} bytes)",
                self.shard_inflight_bytes,
                crate::protocol::MAX_BODY_BYTES
            ));
        }
        if self.max_inflight_bytes_per_connection < crate::protocol::MAX_BODY_BYTES as u64 {
            problems.push(format!(
                "max_inflight_bytes_per_connection is {} but must hold one max-size request ({} bytes)",
                self.max_inflight_bytes_per_connection,
                crate::protocol::MAX_BODY_BYTES
            ));
        }
        for (name, value) in [
            ("transaction_timeout_ms", self.transaction_timeout_ms),
            (
                "transaction_check_interval_ms",
                self.transaction_check_interval_ms,
            ),
        ] {
            if !(100..=86_400_000).contains(&value) {
                problems.push(format!("{name} is {value}; it must be 100..=86400000"));
            }
        }
        if !(1..=1000).contains(&self.transaction_check_max) {
            problems.push(format!(
                "transaction_check_max is {}; it must be 1..=1000",
                self.transaction_check_max
            ));
        }
        if self.max_flush_lag_bytes != 0
            && self.max_flush_lag_bytes < crate::protocol::MAX_BODY_BYTES as u64
        {
            problems.push(format!(
                "max_flush_lag_bytes is {} but must be 0 (no bound) or hold one max-size \
                 request ({} bytes)",
                self.max_flush_lag_bytes,
                crate::protocol::MAX_BODY_BYTES
            ));
        }
        if let CoreSelection::Count(0) = self.cores {
            problems.push(
                "cores: a count must be at least 1 (to name core 0 alone, write `0,`)".to_string(),
            );
        }
        problems
    }

    /// The host clients should dial.
    pub fn advertised_host(&self) -> &str {
        self.advertised_host.as_deref().unwrap_or(&self.listen_host)
    }
}

/// Everything a broker needs to start, in sections; each section's type, defaults and checks
/// belong to the module that uses it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: data dir, listeners, cores, per-connection bounds, io memory.
    pub server: ServerConfig,
    /// `[storage]`: segments, flush mode and thresholds, write path, recovery.
    pub storage: StorageConfig,
    /// `[replication]`: role, master/peer, ack mode and deadline, catch-up, node id.
    pub replication: ReplicationConfig,
}

impl Config {
    /// Reads a TOML file; missing fields take their defaults, unknown fields are an error.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks every section and reports all problems of all of them together, each prefixed
    /// with its section (`storage: segment_bytes is ...`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sections = [
            ("server", self.server.problems()),
            ("storage", self.storage.problems()),
            ("replication", self.replication.problems()),
        ];
        let problems: Vec<String> = sections
            .into_iter()
            .flat_map(|(name, ps)| ps.into_iter().map(move |p| format!("{name}: {p}")))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// The effective config as TOML, for the start-up log and the BrokerInfo reply.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FlushMode;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let mut cfg = Config::default();
        cfg.storage.flush_interval_ms = 0;
        cfg.storage.segment_bytes = 1000;
        cfg.server.max_inflight_requests_per_connection = 0;
        match cfg.validate() {
            Err(ConfigError::Invalid { problems }) => assert_eq!(problems.len(), 3, "{problems:?}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn validate_reports_the_problems_of_every_section() {
        let mut cfg = Config::default();
        cfg.server.listen_host = String::new();
        cfg.storage.max_writes_in_flight = 0;
        cfg.replication.replica_timeout_ms = 0;
        match cfg.validate() {
            Err(ConfigError::Invalid { problems }) => {
                assert_eq!(problems.len(), 3, "{problems:?}");
                for (p, section) in problems.iter().zip(["server:", "storage:", "replication:"]) {
                    assert!(p.starts_with(section), "{problems:?}");
                }
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// The broker and the store agree on the smallest segment: the broker's check is the
    /// store's (`storage::config::SEGMENT_BYTES_MIN`), not a second, different minimum.
    #[test]
    fn segment_bytes_has_the_same_minimum_for_the_broker_and_the_store() {
        use crate::storage::config::SEGMENT_BYTES_MIN;
        let mut cfg = Config::default();
        cfg.storage.segment_bytes = SEGMENT_BYTES_MIN;
        cfg.validate().unwrap();
        cfg.storage.validate().unwrap();
        cfg.storage.segment_bytes = SEGMENT_BYTES_MIN - 4096;
        assert!(cfg.validate().is_err());
        assert!(cfg.storage.validate().is_err());
    }

    #[test]
    fn core_selection_parses_all_count_and_list() {
        assert_eq!("all".parse::<CoreSelection>().unwrap(), CoreSelection::All);
        assert_eq!(
            "2".parse::<CoreSelection>().unwrap(),
            CoreSelection::Count(2)
        );
        assert_eq!(
            "0, 1".parse::<CoreSelection>().unwrap(),
            CoreSelection::List(vec![0, 1])
        );
        assert_eq!(
            "1,".parse::<CoreSelection>().unwrap(),
            CoreSelection::List(vec![1])
        );
        for sel in [
            CoreSelection::All,
            CoreSelection::Count(1),
            CoreSelection::List(vec![1]),
            CoreSelection::List(vec![0, 1]),
        ] {
            assert_eq!(sel.to_string().parse::<CoreSelection>().unwrap(), sel);
        }
        assert!("x".parse::<CoreSelection>().is_err());
        assert!("0,x".parse::<CoreSelection>().is_err());
    }

    #[test]
    fn core_selection_resolves_against_available_cores() {
        let avail = [0, 1];
        assert_eq!(CoreSelection::All.resolve(&avail).unwrap(), vec![0, 1]);
        assert_eq!(CoreSelection::Count(1).resolve(&avail).unwrap(), vec![0]);
        assert!(CoreSelection::Count(3).resolve(&avail).is_err());
        assert!(CoreSelection::List(vec![5]).resolve(&avail).is_err());
        assert!(CoreSelection::List(vec![1, 1]).resolve(&avail).is_err());
    }

    #[test]
    fn toml_round_trips_and_rejects_unknown_fields() {
        let mut cfg = Config::default();
        cfg.server.cores = CoreSelection::List(vec![0, 1]);
        cfg.storage.flush_mode = FlushMode::AsyncFlush;
        cfg.storage.max_writes_in_flight = 3;
        cfg.replication.peer = Some("h:1".into());
        let back: Config = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        assert!(toml::from_str::<Config>("no_such_field = 1").is_err());
        assert!(toml::from_str::<Config>("[storage]\nno_such_field = 1").is_err());
        // A setting in the wrong section is unknown there, not silently ignored.
        assert!(toml::from_str::<Config>("[server]\nflush_mode = \"async_flush\"").is_err());
        let c: Config =
            toml::from_str("[server]\ncores = 2\n[storage]\nflush_mode = \"async_flush\"").unwrap();
        assert_eq!(c.server.cores, CoreSelection::Count(2));
        assert_eq!(c.storage.flush_mode, FlushMode::AsyncFlush);
    }

    #[test]
    fn metrics_listen_is_off_or_host_port_in_the_file_and_on_the_command_line() {
        assert_eq!(
            Config::default().server.metrics_listen.addr(),
            Some(DEFAULT_METRICS_LISTEN)
        );
        let c: Config = toml::from_str("[server]\nmetrics_listen = \"off\"").unwrap();
        assert_eq!(c.server.metrics_listen, MetricsListen::Off);
        let c: Config = toml::from_str("[server]\nmetrics_listen = \"0.0.0.0:9500\"").unwrap();
        assert_eq!(c.server.metrics_listen.addr(), Some("0.0.0.0:9500"));
        assert_eq!(toml::from_str::<Config>(&c.to_toml()).unwrap(), c);
        for bad in ["9400", "host:", ":9400", "h:99999", "h:port"] {
            assert!(bad.parse::<MetricsListen>().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Config>("[server]\nmetrics_listen = \"nope\"").is_err());
    }
}
