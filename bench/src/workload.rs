//! The workload flags shared by `run` and `compare`, and the modes a run can measure.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, ValueEnum};
use ringmq::replication::{ReplicaAck, ReplicationMode};
use ringmq::storage::config::SEGMENT_BYTES_MIN;
use ringmq::storage::FlushMode;
use serde::{Deserialize, Serialize};

/// A broker configuration the bench can measure (each on a fresh embedded broker; the
/// replication modes add a slave in a separate process, see `slave.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    SyncFlush,
    AsyncFlush,
    /// SYNC_FLUSH + ASYNC_MASTER with a slave following: acks do not wait for the slave.
    AsyncMaster,
    /// SYNC_FLUSH + SYNC_MASTER, replica_ack = received: acks wait for the slave's append.
    SyncMasterReceived,
    /// SYNC_FLUSH + SYNC_MASTER, replica_ack = durable: acks wait for the slave's fdatasync.
    SyncMasterDurable,
}

/// Every mode, in the order `compare` runs them by default.
pub const ALL_MODES: [Mode; 5] = [
    Mode::SyncFlush,
    Mode::AsyncFlush,
    Mode::AsyncMaster,
    Mode::SyncMasterReceived,
    Mode::SyncMasterDurable,
];

/// `compare`'s default `--modes`: all of them, ratios relative to sync-flush.
pub const DEFAULT_COMPARE_MODES: &str =
    "sync-flush,async-flush,async-master,sync-master-received,sync-master-durable";

impl Mode {
    pub fn flush_mode(self) -> FlushMode {
        match self {
            Mode::AsyncFlush => FlushMode::AsyncFlush,
            // The replication modes keep the master's own disk contract at SYNC_FLUSH, so
            // their rows differ from sync-flush only by what replication adds.
            Mode::SyncFlush
            | Mode::AsyncMaster
            | Mode::SyncMasterReceived
            | Mode::SyncMasterDurable => FlushMode::SyncFlush,
        }
    }

    /// The master's replication settings; `None` = no slave.
    pub fn replication(self) -> Option<(ReplicationMode, ReplicaAck)> {
        match self {
            Mode::SyncFlush | Mode::AsyncFlush => None,
            // replica_ack is not consulted under ASYNC_MASTER; the default is kept.
            Mode::AsyncMaster => Some((ReplicationMode::AsyncMaster, ReplicaAck::Durable)),
            Mode::SyncMasterReceived => Some((ReplicationMode::SyncMaster, ReplicaAck::Received)),
            Mode::SyncMasterDurable => Some((ReplicationMode::SyncMaster, ReplicaAck::Durable)),
        }
    }

    /// What the report's replication column says: `none`, `async_master`,
    /// `sync_master/received`, `sync_master/durable`.
    pub fn replication_label(self) -> String {
        match self.replication() {
            None => "none".to_string(),
            Some((ReplicationMode::AsyncMaster, _)) => ReplicationMode::AsyncMaster.to_string(),
            Some((r, ack)) => format!("{r}/{ack}"),
        }
    }

    /// The mode a remote broker reports in `BrokerInfo::flush_mode` (`SYNC_FLUSH`, ...).
    pub fn from_broker_info(s: &str) -> Option<Mode> {
        match s.parse() {
            Ok(m @ (Mode::SyncFlush | Mode::AsyncFlush)) => Some(m),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::SyncFlush => "sync-flush",
            Mode::AsyncFlush => "async-flush",
            Mode::AsyncMaster => "async-master",
            Mode::SyncMasterReceived => "sync-master-received",
            Mode::SyncMasterDurable => "sync-master-durable",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for Mode {
    type Err = String;

    /// A label (`sync-master-received`), with `_` for `-` in any case (`SYNC_FLUSH`); `sync`
    /// and `async` for the flush modes.
    fn from_str(s: &str) -> Result<Mode, String> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        match wanted.as_str() {
            "sync" => return Ok(Mode::SyncFlush),
            "async" => return Ok(Mode::AsyncFlush),
            _ => {}
        }
        ALL_MODES
            .into_iter()
            .find(|m| m.label() == wanted)
            .ok_or_else(|| {
                let labels: Vec<&str> = ALL_MODES.iter().map(|m| m.label()).collect();
                format!(
                    "{s:?} is not a mode (expected one of {})",
                    labels.join(", ")
                )
            })
    }
}

/// A comma-separated list of modes, e.g. `sync-flush,async-flush`.
pub fn parse_modes(s: &str) -> Result<Vec<Mode>, String> {
    let modes = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(Mode::from_str)
        .collect::<Result<Vec<_>, _>>()?;
    if modes.is_empty() {
        return Err("--modes is empty".into());
    }
    for (i, m) in modes.iter().enumerate() {
        if modes[..i].contains(m) {
            return Err(format!("--modes names {m} twice"));
        }
    }
    Ok(modes)
}

/// How producers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// `Producer::send_batch`: wait for each ack (latency = send -> ack).
    Sync,
    /// `Producer::send_async`: pipelined, batched by linger time and bytes (latency = send -> ack).
    Async,
    /// `Producer::send_oneway`: no ack (latency = time to hand the message to the socket).
    Oneway,
}

impl fmt::Display for SendMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendMode::Sync => "sync",
            SendMode::Async => "async",
            SendMode::Oneway => "oneway",
        })
    }
}

/// How the producers of a run are driven (see `--driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    #[default]
    Threads,
    EventLoop,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Threads => "threads",
            Driver::EventLoop => "event-loop",
        })
    }
}

/// Where a replication mode's slave process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlaveNet {
    /// A network namespace when this process may make one (root and iproute2), else loopback.
    #[default]
    Auto,
    /// Its own network namespace, joined to this one by a veth pair; fail if that cannot be
    /// made.
    Netns,
    /// 127.0.0.1, like the master.
    Loopback,
}

impl fmt::Display for SlaveNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlaveNet::Auto => "auto",
            SlaveNet::Netns => "netns",
            SlaveNet::Loopback => "loopback",
        })
    }
}

/// The named workloads of the performance issue (`run --workload w1` gives one row of its
/// table): 256 B messages; W1–W3 durable (SYNC_FLUSH), W4 with no fsync on the ack path
/// (ASYNC_FLUSH). W5, consuming a backlog, is the `backlog` subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Preset {
    /// 1 producer, 1 message per request, durable ack.
    W1,
    /// 50 producers, 1 message per request, durable.
    W2,
    /// 1 producer, 1000-message batches, durable.
    W3a,
    /// 50 producers, 16-message batches, durable.
    W3b,
    /// 1 producer, pipelined async sends, durable.
    W3c,
    /// ASYNC_FLUSH, 2 producers x 1000-message batches.
    W4a,
    /// ASYNC_FLUSH, 1 producer, pipelined async sends.
    W4b,
}

impl Preset {
    /// The broker mode the preset measures.
    pub fn mode(self) -> Mode {
        match self {
            Preset::W4a | Preset::W4b => Mode::AsyncFlush,
            _ => Mode::SyncFlush,
        }
    }

    /// Sets the shape of the load (producers, batch, send mode, message size).
    pub fn apply(self, w: &mut Workload) {
        let (producers, batch, send_mode) = match self {
            Preset::W1 => (1, 1, SendMode::Sync),
            Preset::W2 => (50, 1, SendMode::Sync),
            Preset::W3a => (1, 1000, SendMode::Sync),
            Preset::W3b => (50, 16, SendMode::Sync),
            Preset::W3c => (1, 1, SendMode::Async),
            Preset::W4a => (2, 1000, SendMode::Sync),
            Preset::W4b => (1, 1, SendMode::Async),
        };
        w.producers = producers;
        w.batch = batch;
        w.send_mode = send_mode;
        w.message_bytes = 256;
    }
}

/// The workload: the same settings are used for every mode of a `compare`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct Workload {
    /// Drive a running broker at ADDR (host:port of any shard) instead of starting an embedded
    /// one. Only the flush mode that broker runs can then be measured.
    #[arg(long, value_name = "ADDR")]
    pub broker: Option<String>,

    /// Producer threads (each with its own `Producer` and connections).
    #[arg(long, default_value_t = 8)]
    pub producers: usize,

    /// Consumer threads, long-polling; with consumers the report adds end-to-end latency
    /// (producer's intended send time -> consumer receive). Queues are dealt round-robin; one
    /// queue per consumer (--consumers = --queues) gives the cleanest end-to-end figures.
    #[arg(long, default_value_t = 0)]
    pub consumers: usize,

    /// Queues of the bench topic (created by the bench).
    #[arg(long, default_value_t = 4)]
    pub queues: u32,

    /// Payload bytes per message (at least 8: the send timestamp travels in the payload).
    #[arg(long, default_value_t = 1024)]
    pub message_bytes: usize,

    /// Messages per send (sync: one batch of N messages per request; async: the client's batch
    /// size is N messages' worth of bytes, and 1 leaves the client's default of 64 KiB, as
    /// `ringmq produce --mode async` has it; oneway: ignored, one message per send).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,

    /// Async sends: how long the client lets a batch wait for more messages.
    #[arg(long, default_value_t = 2)]
    pub linger_ms: u64,

    /// Async sends: batches the client keeps in flight (all queues) before a send blocks
    /// (the client's `max_in_flight_batches`; default: the client's default).
    #[arg(long)]
    #[serde(default)]
    pub max_in_flight_batches: Option<usize>,

    #[arg(long, value_enum, default_value_t = SendMode::Sync)]
    pub send_mode: SendMode,

    /// How the producers are driven: an OS thread each with its own `Producer` (and the
    /// client's reader, linger and retry threads), or `event-loop`: one thread per load core
    /// drives all its producers' connections with non-blocking sockets, as redis-benchmark
    /// does (SYNC batches only; see bench/src/event_loop.rs).
    #[arg(long, value_enum, default_value_t = Driver::Threads)]
    #[serde(default)]
    pub driver: Driver,

    /// Measured time in seconds (after the warm-up). Ignored when --messages is given.
    #[arg(long, default_value_t = 6)]
    pub duration_secs: u64,

    /// Send this many messages (all producers together) after the warm-up, then stop.
    #[arg(long)]
    pub messages: Option<u64>,

    /// Seconds of load before measuring starts; excluded from every figure except the
    /// throughput timeline, where they are shaded.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,

    /// Open loop: offer this many messages per second in total (split evenly over the
    /// producers, each on its own fixed schedule). Latency is then measured from each send's
    /// intended time, so a stall counts against every send it delays. Without --rate the load
    /// is closed-loop: as fast as acks allow.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub rate: Option<u64>,

    /// Topic to use (default: `ringmq-bench-<pid>-<mode>`, created fresh).
    #[arg(long)]
    pub topic: Option<String>,

    /// Embedded broker: number of shards (cores 0..N-1 of this process' cores).
    #[arg(long, default_value_t = 1)]
    pub broker_cores: usize,

    /// Cores for the load threads, e.g. `1` or `1,2` (default: the cores the embedded broker
    /// does not use, or all cores when none are left or the broker is remote).
    #[arg(long, value_name = "LIST")]
    pub load_cores: Option<String>,

    /// Embedded broker: ASYNC_FLUSH flush interval.
    #[arg(long, default_value_t = 500)]
    pub flush_interval_ms: u64,

    /// Embedded broker: CommitLog segment size in MiB (at least 1).
    #[arg(long, default_value_t = 64)]
    pub segment_mib: u64,

    /// Embedded broker: pace of zeroing the next segment while the log is far from its end,
    /// bytes/s (the broker's `prepare_bytes_per_sec`; 0 = full speed, as before issue 16).
    #[arg(long, default_value_t = ringmq::storage::PREPARE_BYTES_PER_SEC_DEFAULT)]
    #[serde(default = "default_prepare_bytes_per_sec")]
    pub prepare_bytes_per_sec: u64,

    /// Embedded broker: how a SYNC_FLUSH cycle issues its tail write and fdatasync: `inline`
    /// (blocking syscalls on the shard's thread) or `ring` (io_uring); the broker's
    /// `sync_flush_io`.
    #[arg(long, default_value_t = ringmq::storage::SyncFlushIo::default())]
    #[serde(default)]
    pub sync_flush_io: ringmq::storage::SyncFlushIo,

    /// Embedded broker: how long a shard polls for completions before parking its thread
    /// (the broker's `spin_before_park_us`; 0 = park at once).
    #[arg(long, default_value_t = ringmq::config::ServerConfig::default().spin_before_park_us)]
    #[serde(default)]
    pub spin_before_park_us: u64,

    /// Embedded broker: the temporary data dir `.ringmq-bench-<pid>-<mode>` is created in this
    /// directory (must be on a real disk with O_DIRECT, not tmpfs) and removed afterwards.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub data_root: PathBuf,

    /// Replication modes: where the slave process runs (`auto`: a network namespace when
    /// running as root with iproute2, else loopback).
    #[arg(long, value_enum, default_value_t = SlaveNet::Auto)]
    #[serde(default)]
    pub slave_net: SlaveNet,
}

fn default_prepare_bytes_per_sec() -> u64 {
    ringmq::storage::PREPARE_BYTES_PER_SEC_DEFAULT
}

impl Workload {
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.producers == 0 {
            problems.push("--producers must be at least 1".to_string());
        }
        if self.queues == 0 {
            problems.push("--queues must be at least 1".to_string());
        }
        if self.message_bytes < 8 {
            problems.push(
                "--message-bytes must be at least 8 (the payload carries the send timestamp)"
                    .to_string(),
            );
        }
        if self.batch == 0 {
            problems.push("--batch must be at least 1".to_string());
        }
        if self.messages.is_none() && self.duration_secs == 0 {
            problems.push("--duration-secs must be at least 1 (or give --messages)".to_string());
        }
        if self.messages == Some(0) {
            problems.push("--messages must be at least 1".to_string());
        }
        if self.rate == Some(0) {
            problems.push("--rate must be at least 1".to_string());
        }
        if self.broker_cores == 0 {
            problems.push("--broker-cores must be at least 1".to_string());
        }
        if (self.segment_mib << 20) < SEGMENT_BYTES_MIN {
            // The broker's one bound (`storage::config`), in this flag's unit.
            problems.push(format!(
                "--segment-mib must be at least {} (the broker's smallest segment)",
                SEGMENT_BYTES_MIN.div_ceil(1 << 20)
            ));
        }
        if self.flush_interval_ms == 0 {
            problems.push("--flush-interval-ms must be at least 1".to_string());
        }
        if self.driver == Driver::EventLoop && self.send_mode != SendMode::Sync {
            problems.push(format!(
                "--driver event-loop sends SYNC batches only (not --send-mode {})",
                self.send_mode
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Async sends: the client's batch size in bytes (see `--batch`).
    pub fn async_batch_bytes(&self) -> usize {
        if self.batch > 1 {
            self.batch * self.message_bytes
        } else {
            ringmq::client::ProducerConfig::new("").batch_bytes
        }
    }

    /// Messages per send call.
    pub fn unit(&self) -> usize {
        match self.send_mode {
            SendMode::Sync => self.batch,
            SendMode::Async | SendMode::Oneway => 1,
        }
    }

    /// One line describing the workload, for the console and the chart title.
    pub fn describe(&self) -> String {
        let load = match self.rate {
            Some(r) => format!("open loop {r} msg/s"),
            None => "closed loop".to_string(),
        };
        let length = match self.messages {
            Some(n) => format!("{n} msgs"),
            None => format!("{} s", self.duration_secs),
        };
        let batching = match self.send_mode {
            SendMode::Sync => format!("batch {}", self.batch),
            SendMode::Async => format!(
                "batches of {} B / linger {} ms",
                self.async_batch_bytes(),
                self.linger_ms
            ),
            SendMode::Oneway => "no batching".to_string(),
        };
        format!(
            "{} sends ({} driver), {load}, {} producers, {} consumers, {} queues, {} B msgs, {batching}, {} s warm-up + {length}",
            self.send_mode,
            self.driver,
            self.producers,
            self.consumers,
            self.queues,
            self.message_bytes,
            self.warmup_secs
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_in_several_spellings() {
        assert_eq!("sync-flush".parse::<Mode>().unwrap(), Mode::SyncFlush);
        assert_eq!("SYNC_FLUSH".parse::<Mode>().unwrap(), Mode::SyncFlush);
        assert_eq!("async".parse::<Mode>().unwrap(), Mode::AsyncFlush);
        assert!("fast".parse::<Mode>().is_err());
        assert_eq!(
            "sync_master_received".parse::<Mode>().unwrap(),
            Mode::SyncMasterReceived
        );
        for m in ALL_MODES {
            assert_eq!(m.label().parse::<Mode>().unwrap(), m);
        }
        assert_eq!(
            parse_modes(DEFAULT_COMPARE_MODES).unwrap(),
            ALL_MODES.to_vec()
        );
        assert_eq!(
            parse_modes("sync-flush, async-flush").unwrap(),
            vec![Mode::SyncFlush, Mode::AsyncFlush]
        );
        assert!(parse_modes("sync,sync").is_err());
        assert!(parse_modes("").is_err());
    }

    #[test]
    fn replication_modes_keep_sync_flush_on_the_master() {
        assert_eq!(Mode::SyncFlush.replication(), None);
        assert_eq!(Mode::AsyncMaster.flush_mode(), FlushMode::SyncFlush);
        assert_eq!(
            Mode::SyncMasterDurable.replication(),
            Some((ReplicationMode::SyncMaster, ReplicaAck::Durable))
        );
        assert_eq!(
            Mode::SyncMasterReceived.replication_label(),
            "sync_master/received"
        );
        assert_eq!(Mode::AsyncMaster.replication_label(), "async_master");
        assert_eq!(Mode::AsyncFlush.replication_label(), "none");
        // A remote broker's flush mode never names a replication mode.
        assert_eq!(Mode::from_broker_info("SYNC_FLUSH"), Some(Mode::SyncFlush));
        assert_eq!(Mode::from_broker_info("async-master"), None);
    }
}
