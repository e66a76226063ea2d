//! Per-shard storage: a CommitLog on O_DIRECT files with group-committed fdatasync, derived
//! ConsumeQueues and key index, idempotent-producer de-duplication and crash recovery.
//!
//! # Layout
//! - [`config`]: [`StorageConfig`], the `[storage]` section of the broker config: its
//!   defaults and its one bound per setting.
//! - The on-disk record format is [`crate::format::record`] and a record's body is a
//!   [`crate::format::batch`] (pure, shared with the client and the bench).
//! - [`backend`]: file I/O as a trait; [`backend::DmaBackend`] (glommio `DmaFile`) and
//!   [`sim::SimBackend`] (a disk with written/durable images that can crash).
//! - `segment`: segment files named by their 20-digit base position, prepared by writing zeros.
//! - `commitlog`: the append/write path (aligned chunks, writes in flight, the partial tail
//!   block rewritten as it grows) and the watermarks `appended >= written >= durable >= visible`.
//!   Its state is private: the other files read `LogMarks` and call narrow methods.
//! - `flush`: the flush leader (group commit for [`FlushMode::SyncFlush`], timer/bytes for
//!   [`FlushMode::AsyncFlush`]).
//! - [`Signal`] (`signal`): the wait-until-a-condition-holds primitive; `counters`: the
//!   raw counters of the log and the flusher.
//! - [`index`]: the indexes derived from the log: [`index::consume_queue`] (per (topic, queue)
//!   entries, persisted lazily behind the durable log), `key_index` (message key -> log
//!   positions) and `producer` (the idempotent producer sequence table).
//! - `append_order`: appends keep their arrival order across the wait for room in the log.
//! - [`checkpoint`]: the durable checkpoint (how far the log was durable, and the write
//!   reservation past which nothing was written), written lazily.
//! - `index::snapshot`: the index snapshot a restart starts from (scans only what follows it).
//! - [`recovery`]: the recovery decision table, one test per row; quarantine of corrupt records.
//! - [`ShardStore`] (`store`): the API the server calls.
//! - `stream` (with `tail_feed`): the log as a stream of raw records, for replication.
//! - [`probe`]: the glommio io-poll probe work-around (`prime_dma_probe`).
//! - [`space`]: free space of the log's file system (`statvfs`) and what counts as a full disk;
//!   `disk_state`: what the store tells about a full disk.
//!
//! # Durability contract
//! [`ShardStore::append`] only copies the record into memory and assigns offsets.
//! [`ShardStore::wait_durable`] resolves once an fdatasync issued after the record's bytes were
//! written has completed. Readers never see past the visible watermark (= durable, optionally
//! capped lower by replication), so a consumer never reads what a crash could take back. After
//! any write or fdatasync error the log is poisoned: appends and waits fail with
//! [`StorageError::Poisoned`] and nothing more becomes durable. A full disk (ENOSPC, EDQUOT,
//! usage above `disk_reject_ratio`) is not a poison: appends get [`StorageError::DiskFull`]
//! (retriable), nothing appended is dropped, reads go on, and writes resume by themselves once
//! space is freed (see `commitlog`).

mod append_order;
pub mod backend;
pub mod checkpoint;
mod commitlog;
pub mod config;
mod counters;
mod disk_state;
pub mod error;
mod flush;
pub mod index;
pub mod probe;
pub mod recovery;
mod segment;
mod signal;
pub mod space;
pub use signal::Signal;
pub mod sim;
mod store;
mod stream;
mod tail_feed;

use std::fmt;
use std::str::FromStr;

pub use backend::{DmaBackend, StorageBackend};
pub use config::{StorageConfig, PREPARE_BYTES_PER_SEC_DEFAULT};
pub use error::StorageError;
pub use probe::prime_dma_probe;
pub use recovery::RecoveryReport;
pub use store::{AppendHook, BackgroundCheck, ShardStore, StorageFault, COMMITLOG_DIR};
pub use stream::LogChunk;

/// When an append counts as stored (see DESIGN.md, "Flush modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushMode {
    /// Acked after an fdatasync that covers the record (group commit).
    SyncFlush,
    /// Acked when in the shard's buffer; flushed every `flush_interval_ms` or `flush_bytes`.
    AsyncFlush,
}

/// How a new segment is prepared before the log writes into it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SegmentPrepare {
    /// `zero` under SYNC_FLUSH, `allocate` under ASYNC_FLUSH (the default).
    #[default]
    Auto,
    /// Write zeros over the whole file, at a pace: the log then only overwrites written
    /// blocks, and an fdatasync flushes data alone (into unwritten extents it costs about 2x,
    /// NOTES.md). Costs one write of the segment's size, which competes with the log's own.
    Zero,
    /// fallocate the file: no bytes written (unwritten extents read as zeros, so recovery
    /// sees the same), but each log write converts extents and each fdatasync journals that.
    /// What ASYNC_FLUSH's bandwidth wants: the zeros took about half of it.
    Allocate,
}

impl SegmentPrepare {
    /// Whether segments are fallocated under `flush_mode`.
    pub fn allocates(self, flush_mode: FlushMode) -> bool {
        match self {
            SegmentPrepare::Auto => flush_mode == FlushMode::AsyncFlush,
            SegmentPrepare::Zero => false,
            SegmentPrepare::Allocate => true,
        }
    }
}

/// How a SYNC_FLUSH flush cycle issues its tail write and its fdatasync (ASYNC_FLUSH cycles,
/// and writes of full chunks, always go through io_uring).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SyncFlushIo {
    /// Plain `pwrite(2)` and `fdatasync(2)` on the shard's thread (the default). The thread
    /// sleeps in the kernel for the ~0.1-0.3 ms of the device's round trips and the device's
    /// completion wakes it directly. Through io_uring the fdatasync is punted to a kernel worker
    /// thread, and each wait parks the reactor (timers, a membarrier) and wakes it again: on
    /// this VM 206 µs p50 for a 4 KiB write + fdatasync against 128 µs inline. What arrives
    /// meanwhile waits in the socket buffers and goes into the next cycle, as it does anyway.
    #[default]
    Inline,
    /// Both through io_uring: the shard keeps serving other connections (fetches, replication)
    /// while a cycle is on the device, at the cost of the hand-offs above.
    Ring,
}

/// What recovery does with a bad record *before* the durable checkpoint (bytes that were once
/// durable, so not a torn write). A bad tail past the checkpoint is always truncated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum RecoveryMode {
    /// Refuse to open, naming the file and the byte position (the default: an operator decides).
    #[default]
    #[serde(rename = "strict")]
    Strict,
    /// Quarantine exactly the bad record (bytes copied to `<shard>/quarantine/<position>.bin`,
    /// a gap record in its place, offsets of later records unchanged) and keep everything after.
    #[serde(rename = "skip-corrupt", alias = "skip_corrupt")]
    SkipCorrupt,
}

/// `Display` and `FromStr` of a settings enum from one table: a variant prints as its first
/// name and parses from any of its names, case-insensitive, `-` and `_` alike.
macro_rules! setting_names {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal $(| $alias:literal)*),+ $(,)?) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $($ty::$variant => $name),+
                })
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let norm = |n: &str| n.to_ascii_lowercase().replace('-', "_");
                let given = norm(s);
                $(
                    if given == norm($name) $(|| given == norm($alias))* {
                        return Ok($ty::$variant);
                    }
                )+
                let names = [$($name),+].join(" | ");
                Err(format!(concat!("unknown ", $what, " {:?} ({})"), s, names))
            }
        }
    };
}

setting_names!(FlushMode, "flush mode",
    SyncFlush => "sync_flush" | "sync",
    AsyncFlush => "async_flush" | "async",
);
setting_names!(SegmentPrepare, "segment preparation",
    Auto => "auto",
    Zero => "zero",
    Allocate => "allocate",
);
setting_names!(SyncFlushIo, "sync flush io", Inline => "inline", Ring => "ring");
setting_names!(RecoveryMode, "recovery mode", Strict => "strict", SkipCorrupt => "skip-corrupt");
setting_names!(FetchVerify, "fetch verify", Once => "once", Always => "always");

/// Whether a fetch checks the CRC of every record it reads from the log files.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FetchVerify {
    /// Once per record in a broker's life (the default): the open checks every record it
    /// scans, the background check every record below the index snapshot, an append the
    /// records it builds or receives. Fetches check CRCs only until that covers the whole log
    /// (while the background check runs, or after it found a corrupt record), then send what
    /// they read. A bit flipped on the disk later still reaches no application: the client
    /// library checks every record's CRC as it parses a fetch, and refuses the response.
    #[default]
    Once,
    /// Every record of every fetch, on the broker (the client still checks them too).
    Always,
}

/// A byte position in a shard's CommitLog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPosition(pub u64);

/// A logical message offset within one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct QueueOffset(pub u64);

impl LogPosition {
    /// Bytes from `earlier` up to this position (`earlier` must not be beyond it).
    pub fn bytes_since(self, earlier: LogPosition) -> u64 {
        debug_assert!(earlier <= self, "{earlier} is beyond {self}");
        self.0 - earlier.0
    }
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for QueueOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Idempotent producer fields of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerSeq {
    pub producer_id: u64,
    pub epoch: u16,
    pub base_sequence: u32,
}

/// One batch to append.
#[derive(Debug, Clone, Copy)]
pub struct AppendRequest<'a> {
    pub topic: &'a str,
    pub queue_id: u32,
    pub message_count: u32,
    pub producer: Option<ProducerSeq>,
    /// The message batch as the producer sent it.
    pub body: &'a [u8],
}

/// Where a batch went. `end` is what to pass to `wait_durable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: QueueOffset,
    pub count: u32,
    pub position: LogPosition,
    pub end: LogPosition,
    /// A retry of a batch already stored: these are the original offsets.
    pub duplicate: bool,
}

/// Whole records of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBatch {
    /// Concatenated records (parse with [`crate::format::record::RecordIter`]).
    pub records: bytes::Bytes,
    /// Offset to ask for next.
    pub next_offset: QueueOffset,
    pub min_offset: QueueOffset,
    /// Visible end offset of the queue.
    pub end_offset: QueueOffset,
}

impl ReadBatch {
    fn empty(next: QueueOffset, min: QueueOffset, end: QueueOffset) -> Self {
        ReadBatch {
            records: bytes::Bytes::new(),
            next_offset: next,
            min_offset: min,
            end_offset: end,
        }
    }
}

/// Offsets and size of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub min_offset: QueueOffset,
    pub visible_end_offset: QueueOffset,
    pub written_end_offset: QueueOffset,
    pub bytes: u64,
    pub records: u64,
}

/// The shard's watermarks: `appended >= written >= durable >= visible`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub appended: LogPosition,
    pub written: LogPosition,
    pub durable: LogPosition,
    pub visible: LogPosition,
}

/// Counters of one shard's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageMetrics {
    pub appends: u64,
    pub fsyncs: u64,
    pub flush_cycles: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub unflushed_bytes: u64,
    pub unflushed_hwm_bytes: u64,
    pub flush_latency_sum_us: u64,
    pub flush_latency_count: u64,
    /// Time the fdatasyncs of each flush cycle took, in µs.
    pub fsync_latency_us: crate::metrics::Histogram,
    /// Log bytes each flush cycle made durable (the group commit's size).
    pub group_commit_bytes: crate::metrics::Histogram,
    /// Appends each flush cycle made durable.
    pub group_commit_records: crate::metrics::Histogram,
    pub poisoned: bool,
    /// Corrupt records quarantined by recovery at the last open (`recovery = skip-corrupt`).
    pub quarantined_records: u64,
    /// Durable checkpoints written since open.
    pub checkpoints: u64,
    /// New segments that were recycled ones since open (`recycle_segments`).
    pub segments_recycled: u64,
}

impl StorageMetrics {
    /// Appends per fdatasync so far.
    pub fn appends_per_fsync(&self) -> f64 {
        self.appends as f64 / self.fsyncs.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_from_any_of_their_names_and_print_the_first() {
        assert_eq!("SYNC".parse::<FlushMode>(), Ok(FlushMode::SyncFlush));
        assert_eq!(
            "async-flush".parse::<FlushMode>(),
            Ok(FlushMode::AsyncFlush)
        );
        assert_eq!(FlushMode::AsyncFlush.to_string(), "async_flush");
        assert_eq!(
            "skip_corrupt".parse::<RecoveryMode>(),
            Ok(RecoveryMode::SkipCorrupt)
        );
        assert_eq!(RecoveryMode::SkipCorrupt.to_string(), "skip-corrupt");
        assert_eq!("always".parse::<FetchVerify>(), Ok(FetchVerify::Always));
        assert_eq!(
            "sometimes".parse::<FetchVerify>(),
            Err("unknown fetch verify \"sometimes\" (once | always)".to_string())
        );
        for p in [
            SegmentPrepare::Auto,
            SegmentPrepare::Zero,
            SegmentPrepare::Allocate,
        ] {
            assert_eq!(p.to_string().parse::<SegmentPrepare>(), Ok(p));
        }
        assert_eq!("ring".parse::<SyncFlushIo>(), Ok(SyncFlushIo::Ring));
    }
}
