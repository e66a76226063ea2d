//! The broker's typed configuration.
//!
//! One [`Config`] with documented defaults. It is read from a TOML file (`--config`), then every
//! field can be overridden by a command-line flag (see `main.rs`), then [`Config::validate`]
//! reports every problem at once, so an operator fixes a config in one round trip.
//! The effective config is logged at start ([`Config::to_toml`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::replication::{ReplicaAck, ReplicationMode, Role};
use crate::storage::{FlushMode, RecoveryMode, StorageConfig};

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

/// Everything a broker needs to start. Field names carry their unit last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
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
    /// What a produce ack means: `sync_flush` (default: after group-committed fdatasync) or
    /// `async_flush` (after the append to the shard's buffer).
    pub flush_mode: FlushMode,
    /// ASYNC_FLUSH: the background flusher writes and syncs at least this often. Default 500.
    pub flush_interval_ms: u64,
    /// ASYNC_FLUSH: ... or as soon as this many bytes are unflushed. Default 4 MiB.
    pub flush_bytes: u64,
    /// A produce whose flush has not completed in this time gets FLUSH_DISK_TIMEOUT. Default 5000.
    pub flush_timeout_ms: u64,
    /// CommitLog segment size. Default 1 GiB.
    pub segment_bytes: u64,
    /// Requests one connection may have in flight before the broker stops reading from it.
    /// Default 4096.
    pub max_inflight_requests_per_connection: u32,
    /// Bytes one connection may make the broker hold: bodies of requests being handled plus
    /// responses not yet written to its socket (each charged for its largest size before it
    /// is handled). When spent, the broker stops reading that connection. Default 64 MiB.
    pub max_inflight_bytes_per_connection: u64,
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
    /// `master` (default) or `slave`. A slave follows `master`, serves fetches and refuses
    /// produce with NOT_MASTER until promoted (`ringmq admin promote`).
    pub role: Role,
    /// Slave: the master's address (`host:port` of its shard 0).
    pub master: Option<String>,
    /// Master: the other broker of the pair (optional). At start a master asks it and refuses
    /// to start if the peer is a master of a newer epoch (this broker was superseded).
    pub peer: Option<String>,
    /// `async_master` (default: acks do not wait for the slave) or `sync_master`.
    pub replication: ReplicationMode,
    /// SYNC_MASTER: the slave has `received` the record (appended to its log) or made it
    /// `durable` (its fdatasync covered it, the default).
    pub replica_ack: ReplicaAck,
    /// SYNC_MASTER: a produce the slave has not acknowledged in this time gets
    /// FLUSH_SLAVE_TIMEOUT. Default 3000.
    pub replica_timeout_ms: u64,
    /// Master: the most a follower that is behind is sent per second from the log files
    /// (0 = no limit). Large reads at full disk speed stall the same disk's writes and
    /// fdatasyncs for hundreds of milliseconds on the test VM; see README. Default 64 MiB/s.
    pub replica_catchup_bytes_per_sec: u64,
    /// Master with a `peer`: take writes even when the peer cannot be reached at start. Without
    /// it such a master starts fenced (read-only: produce gets NOT_MASTER) until it hears from
    /// the peer, since the peer may have been promoted meanwhile. Default false.
    pub force_master: bool,
    /// This broker's node id (1 ..= 2^24 - 1), the low bits of every epoch it mints, so two
    /// brokers never mint the same epoch. Default: a random id made once and kept in
    /// `<data_dir>/node_id`.
    pub node_id: Option<u32>,
    /// What a shard does at open with a corrupt record before its durable checkpoint (bytes
    /// that were acknowledged): `strict` (default: refuse to open, naming file and position) or
    /// `skip-corrupt` (quarantine exactly that record and keep everything after it).
    pub recovery: RecoveryMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./ringmq-data"),
            listen_host: "127.0.0.1".into(),
            advertised_host: None,
            port: 10911,
            cores: CoreSelection::All,
            flush_mode: FlushMode::SyncFlush,
            flush_interval_ms: 500,
            flush_bytes: 4 << 20,
            flush_timeout_ms: 5000,
            segment_bytes: 1 << 30,
            max_inflight_requests_per_connection: 4096,
            max_inflight_bytes_per_connection: 64 << 20,
            partial_frame_timeout_ms: 10_000,
            allow_non_direct_io: false,
            io_memory_bytes: 0,
            role: Role::Master,
            master: None,
            peer: None,
            replication: ReplicationMode::AsyncMaster,
            replica_ack: ReplicaAck::Durable,
            replica_timeout_ms: 3000,
            replica_catchup_bytes_per_sec: 64 << 20,
            force_master: false,
            node_id: None,
            recovery: RecoveryMode::Strict,
        }
    }
}

/// Smallest segment: must hold the largest record (a max-size body plus headers).
const SEGMENT_BYTES_MIN: u64 = 32 << 20;

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

    /// Checks every field and reports all problems together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.data_dir.as_os_str().is_empty() {
            problems.push("data_dir is empty".to_string());
        }
        if self.listen_host.trim().is_empty() {
            problems.push("listen_host is empty".to_string());
        }
        if self.flush_interval_ms == 0 {
            problems.push("flush_interval_ms must be at least 1".to_string());
        }
        if self.flush_bytes < 4096 {
            problems.push(format!(
                "flush_bytes is {} but must be at least 4096",
                self.flush_bytes
            ));
        }
        if self.flush_timeout_ms == 0 {
            problems.push("flush_timeout_ms must be at least 1".to_string());
        }
        if self.segment_bytes < SEGMENT_BYTES_MIN || self.segment_bytes % 4096 != 0 {
            problems.push(format!(
                "segment_bytes is {} but must be a multiple of 4096 and at least {SEGMENT_BYTES_MIN}",
                self.segment_bytes
            ));
        }
        if self.partial_frame_timeout_ms == 0 {
            problems.push("partial_frame_timeout_ms must be at least 1".to_string());
        }
        if self.max_inflight_requests_per_connection == 0 {
            problems.push("max_inflight_requests_per_connection must be at least 1".to_string());
        }
        if self.max_inflight_bytes_per_connection < crate::protocol::MAX_BODY_BYTES as u64 {
            problems.push(format!(
                "max_inflight_bytes_per_connection is {} but must hold one max-size request ({} bytes)",
                self.max_inflight_bytes_per_connection,
                crate::protocol::MAX_BODY_BYTES
            ));
        }
        if self.role == Role::Slave && !self.master.as_deref().is_some_and(|m| !m.trim().is_empty())
        {
            problems.push("role is slave but no master is set (--master HOST:PORT)".to_string());
        }
        if self.role == Role::Master && self.master.is_some() {
            problems.push(
                "master is set but role is master; --master is for --role slave (use --peer to \
                 name the other broker of a pair)"
                    .to_string(),
            );
        }
        if let Some(id) = self.node_id {
            if id == 0 || id > crate::replication::epoch::NODE_ID_MAX {
                problems.push(format!(
                    "node_id is {id} but must be in 1..={}",
                    crate::replication::epoch::NODE_ID_MAX
                ));
            }
        }
        if self.replica_timeout_ms == 0 {
            problems.push("replica_timeout_ms must be at least 1".to_string());
        }
        if let CoreSelection::Count(0) = self.cores {
            problems.push(
                "cores: a count must be at least 1 (to name core 0 alone, write `0,`)".to_string(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// The host clients should dial.
    pub fn advertised_host(&self) -> &str {
        self.advertised_host.as_deref().unwrap_or(&self.listen_host)
    }

    /// The other broker of the pair, if any: `peer`, or on a slave (and a promoted one) its
    /// `master`. Only a follower from this host may open a replication stream.
    pub fn pair_peer(&self) -> Option<&str> {
        self.peer.as_deref().or(self.master.as_deref())
    }

    /// Whether a master streams its log to a follower at all: it names a peer, or waits for a
    /// slave (SYNC_MASTER). A lone ASYNC_MASTER refuses ReplFollow.
    pub fn accepts_followers(&self) -> bool {
        self.pair_peer().is_some() || self.replication == ReplicationMode::SyncMaster
    }

    /// The storage engine's share of the config.
    pub fn storage(&self) -> StorageConfig {
        StorageConfig {
            segment_bytes: self.segment_bytes,
            flush_mode: self.flush_mode,
            flush_interval_ms: self.flush_interval_ms,
            flush_bytes: self.flush_bytes,
            recovery: self.recovery,
            ..StorageConfig::default()
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

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let cfg = Config {
            flush_interval_ms: 0,
            segment_bytes: 1000,
            max_inflight_requests_per_connection: 0,
            ..Config::default()
        };
        match cfg.validate() {
            Err(ConfigError::Invalid { problems }) => assert_eq!(problems.len(), 3, "{problems:?}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
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
        let cfg = Config {
            cores: CoreSelection::List(vec![0, 1]),
            flush_mode: FlushMode::AsyncFlush,
            ..Config::default()
        };
        let back: Config = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        assert!(toml::from_str::<Config>("no_such_field = 1").is_err());
        let c: Config = toml::from_str("cores = 2\nflush_mode = \"async_flush\"").unwrap();
        assert_eq!(c.cores, CoreSelection::Count(2));
        assert_eq!(c.flush_mode, FlushMode::AsyncFlush);
    }
}
