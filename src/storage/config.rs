//! [`StorageConfig`]: the `[storage]` section of the broker config, and the storage settings of
//! one shard's store.
//!
//! Contract: each setting has exactly one bound, checked here by [`StorageConfig::problems`];
//! the broker's `Config::validate` and [`ShardStore::open`](super::ShardStore::open) both use
//! this check, so a config the broker accepts is one every shard's store accepts.

use serde::{Deserialize, Serialize};

use super::backend::BLOCK_BYTES;
use super::{FetchVerify, FlushMode, RecoveryMode, SegmentPrepare, StorageError, SyncFlushIo};
use crate::format::record::MAX_RECORD_BYTES;

/// Smallest segment file. The store caps a record at `min(max_record_bytes, segment_bytes)`,
/// so a small segment only means smaller records and more rolls; below this a segment roll
/// (prepare, open, fsync the directory) would come every few appends.
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;
/// Smallest ASYNC_FLUSH byte threshold: one block. Less would flush a partial block after
/// every append, which is SYNC_FLUSH's cost without its promise.
pub const FLUSH_BYTES_MIN: u64 = BLOCK_BYTES;
/// Smallest `max_record_bytes`: room for a record header, a topic name and a small batch.
pub const MAX_RECORD_BYTES_MIN: u64 = 1024;
/// Default `prepare_bytes_per_sec`: 32 MiB/s.
pub const PREPARE_BYTES_PER_SEC_DEFAULT: u64 = 32 << 20;

/// Default `disk_reject_ratio`: RocketMQ's `diskMaxUsedSpaceRatio` of 90 %.
pub const DISK_REJECT_RATIO_DEFAULT: f64 = 0.90;
/// Smallest `disk_reject_ratio`: below it a broker on an ordinary, half-used disk would refuse
/// every write (a misplaced decimal point, not a policy).
pub const DISK_REJECT_RATIO_MIN: f64 = 0.05;

/// Storage configuration of one shard (the `[storage]` section of the broker's config file).
/// Field names carry their unit last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Size of each CommitLog segment file: a multiple of 4 KiB, at least
    /// [`SEGMENT_BYTES_MIN`]. Default 1 GiB (RocketMQ's).
    pub segment_bytes: u64,
    /// What a produce ack means: `sync_flush` (default: after a group-committed fdatasync that
    /// covers the record) or `async_flush` (after the append to the shard's buffer).
    pub flush_mode: FlushMode,
    /// ASYNC_FLUSH: the background flusher writes and syncs at least this often. Default 500
    /// (RocketMQ's).
    pub flush_interval_ms: u64,
    /// ASYNC_FLUSH: ... or as soon as this many bytes are unflushed. Default 4 MiB.
    pub flush_bytes: u64,
    /// A produce whose flush has not completed in this time gets FLUSH_DISK_TIMEOUT. Read by
    /// the produce path's ack wait, not by the store. Default 5000.
    pub flush_timeout_ms: u64,
    /// Size of each aligned write buffer (chunk), a multiple of 4 KiB; 1 MiB writes reach full
    /// disk bandwidth. Default 1 MiB.
    pub write_buffer_bytes: u64,
    /// Writes in flight before appends wait (bounds the memory of a shard's log). Default 8.
    pub max_writes_in_flight: usize,
    /// Largest record (header + topic + body) the store takes, 1 KiB ..= 64 MiB. Default 8 MiB.
    pub max_record_bytes: u64,
    /// What a shard does at open with a corrupt record before its durable checkpoint (bytes
    /// that were acknowledged): `strict` (default: refuse to open, naming file and position) or
    /// `skip-corrupt` (quarantine exactly that record and keep everything after it).
    pub recovery: RecoveryMode,
    /// Produces get DISK_FULL (retriable, naming the usage and this threshold) while the data
    /// dir's file system is used above this ratio (`df`'s Use%, checked every second and
    /// before a segment is prepared), and no new segment is prepared. In
    /// [`DISK_REJECT_RATIO_MIN`]`..=1.0`; 1.0 leaves only the device's own ENOSPC. Default
    /// 0.90 (RocketMQ's).
    pub disk_reject_ratio: f64,
    /// Sealed segments whose last write (file modification time) is older than this many
    /// hours are deleted, oldest first, checked every minute (RocketMQ's fileReservedTime).
    /// Deletes only whole sealed segments, never the active one; consumers and replicas behind
    /// the oldest kept offset then start at it. 0 keeps everything. Default 72.
    pub retention_hours: u64,
    /// Retention by size: while the log's segments (sealed and active) take more than this
    /// many bytes, the oldest sealed ones are deleted, checked every second. 0 (default): no
    /// bound. At least `segment_bytes` when set.
    pub retention_bytes: u64,
    /// While the data dir's file system is used above this ratio, expired segments are
    /// deleted at once (checked every second) instead of at the next minute's check. Default
    /// 0.75 (RocketMQ's cleaning threshold).
    pub disk_clean_ratio: f64,
    /// Forced deletion of segments that have not expired, while the file system is used above
    /// `disk_force_clean_ratio`: the oldest sealed segment goes, one per second, with a log
    /// line naming every queue that lost messages. It deletes messages nobody consumed yet
    /// (RocketMQ does this at 85 % by default, a top complaint of its users), so it is off
    /// (false) unless the operator turns it on.
    pub force_clean: bool,
    /// See `force_clean`. Default 0.85 (RocketMQ's), at least `disk_clean_ratio`.
    pub disk_force_clean_ratio: f64,
    /// Start from the index snapshot when one fits (default `true`): the open reads the
    /// consume-queue files and scans only the log written after the snapshot; the records
    /// before it are checked in the background while the shard serves (a corrupt one is then
    /// reported, and the next open scans everything and refuses). `false`: every open scans
    /// and checks the whole log before serving (about 4 s per GB here).
    pub index_snapshot: bool,
    /// The pace of zeroing the next segment while this one fills, when the log is idle or far
    /// from its end: bytes per second, written 256 KiB at a time, so a SYNC_FLUSH fdatasync
    /// (which makes the device flush everything it caches, zeros included) waits behind at most
    /// one such write. Faster as the active segment fills: the spare is done by the time half
    /// of what is left of the active one is. 0: zero at full speed (4 MiB in flight).
    /// Default 33554432 (32 MiB/s: a 1 GiB segment in 32 s).
    pub prepare_bytes_per_sec: u64,
    /// How the next segment is prepared: `zero` (written zeros, at `prepare_bytes_per_sec`),
    /// `allocate` (fallocate, nothing written) or `auto` (default: `zero` under SYNC_FLUSH,
    /// whose fdatasyncs are cheaper over written blocks; `allocate` under ASYNC_FLUSH, whose
    /// bandwidth the zeros halved). See [`SegmentPrepare`].
    pub segment_prepare: SegmentPrepare,
    /// Segments dropped by retention that are kept (renamed `<base>.recycled`) to become later
    /// segments as they are, their blocks already written: no zeros to write and no extents
    /// to convert, so the log writes at the disk's overwrite speed. What a previous life left
    /// in them is never read as a record (every record carries its own log position). At most
    /// this many are kept; none while the file system is used above `disk_clean_ratio` (the
    /// space watch then removes those there are).
    /// 0: dropped segments are deleted. Default 2.
    pub recycle_segments: u32,
    /// How a SYNC_FLUSH cycle issues its tail write and fdatasync: `inline` (plain syscalls on
    /// the shard's thread, the default) or `ring` (io_uring). See [`SyncFlushIo`].
    pub sync_flush_io: SyncFlushIo,
    /// Whether fetches check every record's CRC (`always`) or only until every record of the
    /// log has been checked once in this broker's life (`once`, the default). See
    /// [`FetchVerify`].
    pub fetch_verify: FetchVerify,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_bytes: 1 << 30,
            flush_mode: FlushMode::SyncFlush,
            flush_interval_ms: 500,
            flush_bytes: 4 << 20,
            flush_timeout_ms: 5000,
            write_buffer_bytes: 1 << 20,
            max_writes_in_flight: 8,
            max_record_bytes: 8 << 20,
            recovery: RecoveryMode::Strict,
            disk_reject_ratio: DISK_REJECT_RATIO_DEFAULT,
            retention_hours: 72,
            retention_bytes: 0,
            disk_clean_ratio: 0.75,
            force_clean: false,
            disk_force_clean_ratio: 0.85,
            index_snapshot: true,
            prepare_bytes_per_sec: PREPARE_BYTES_PER_SEC_DEFAULT,
            segment_prepare: SegmentPrepare::Auto,
            recycle_segments: 2,
            sync_flush_io: SyncFlushIo::Inline,
            fetch_verify: FetchVerify::Once,
        }
    }
}

impl StorageConfig {
    /// Every problem of this section, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.segment_bytes < SEGMENT_BYTES_MIN || self.segment_bytes % BLOCK_BYTES != 0 {
            problems.push(format!(
                "segment_bytes is {} but must be a multiple of {BLOCK_BYTES} and at least \
                 {SEGMENT_BYTES_MIN}",
                self.segment_bytes
            ));
        }
        if self.flush_interval_ms == 0 {
            problems.push("flush_interval_ms must be at least 1".to_string());
        }
        if self.flush_bytes < FLUSH_BYTES_MIN {
            problems.push(format!(
                "flush_bytes is {} but must be at least {FLUSH_BYTES_MIN}",
                self.flush_bytes
            ));
        }
        if self.flush_timeout_ms == 0 {
            problems.push("flush_timeout_ms must be at least 1".to_string());
        }
        if self.write_buffer_bytes < BLOCK_BYTES || self.write_buffer_bytes % BLOCK_BYTES != 0 {
            problems.push(format!(
                "write_buffer_bytes is {} but must be a positive multiple of {BLOCK_BYTES}",
                self.write_buffer_bytes
            ));
        }
        if self.max_writes_in_flight == 0 {
            problems.push("max_writes_in_flight must be at least 1".to_string());
        }
        if self.max_record_bytes < MAX_RECORD_BYTES_MIN
            || self.max_record_bytes > u64::from(MAX_RECORD_BYTES)
        {
            problems.push(format!(
                "max_record_bytes is {} but must be in {MAX_RECORD_BYTES_MIN}..={MAX_RECORD_BYTES}",
                self.max_record_bytes
            ));
        }
        // Written so that NaN fails too.
        if !(self.disk_reject_ratio >= DISK_REJECT_RATIO_MIN && self.disk_reject_ratio <= 1.0) {
            problems.push(format!(
                "disk_reject_ratio is {} but must be in {DISK_REJECT_RATIO_MIN}..=1.0 (a fraction \
                 of the file system, like 0.90)",
                self.disk_reject_ratio
            ));
        }
        if !(self.disk_clean_ratio >= DISK_REJECT_RATIO_MIN && self.disk_clean_ratio <= 1.0) {
            problems.push(format!(
                "disk_clean_ratio is {} but must be in {DISK_REJECT_RATIO_MIN}..=1.0",
                self.disk_clean_ratio
            ));
        }
        if !(self.disk_force_clean_ratio >= self.disk_clean_ratio
            && self.disk_force_clean_ratio <= 1.0)
        {
            problems.push(format!(
                "disk_force_clean_ratio is {} but must be in disk_clean_ratio ({})..=1.0",
                self.disk_force_clean_ratio, self.disk_clean_ratio
            ));
        }
        if self.retention_bytes != 0 && self.retention_bytes < self.segment_bytes {
            problems.push(format!(
                "retention_bytes is {} but must be 0 (no bound) or at least segment_bytes ({})",
                self.retention_bytes, self.segment_bytes
            ));
        }
        problems
    }

    /// Reports every problem at once.
    pub fn validate(&self) -> Result<(), StorageError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StorageError::Config(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        StorageConfig::default().validate().unwrap();
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let cfg = StorageConfig {
            segment_bytes: 1000,
            flush_bytes: 0,
            write_buffer_bytes: 100,
            max_writes_in_flight: 0,
            max_record_bytes: 10,
            disk_reject_ratio: 90.0,
            ..StorageConfig::default()
        };
        assert_eq!(cfg.problems().len(), 6, "{:?}", cfg.problems());
        assert!(matches!(cfg.validate(), Err(StorageError::Config(p)) if p.len() == 6));
    }

    #[test]
    fn disk_reject_ratio_is_a_fraction() {
        let at = |disk_reject_ratio| StorageConfig {
            disk_reject_ratio,
            ..StorageConfig::default()
        };
        assert_eq!(StorageConfig::default().disk_reject_ratio, 0.90);
        at(1.0).validate().unwrap();
        at(DISK_REJECT_RATIO_MIN).validate().unwrap();
        for bad in [0.0, 0.01, 1.01, 90.0, f64::NAN] {
            let p = at(bad).problems();
            assert!(
                p.len() == 1 && p[0].contains("disk_reject_ratio"),
                "{bad}: {p:?}"
            );
        }
        let c: StorageConfig = toml::from_str("disk_reject_ratio = 0.5").unwrap();
        assert_eq!(c.disk_reject_ratio, 0.5);
    }

    #[test]
    fn segment_bytes_has_one_minimum() {
        let at = |segment_bytes| StorageConfig {
            segment_bytes,
            ..StorageConfig::default()
        };
        at(SEGMENT_BYTES_MIN).validate().unwrap();
        let below = at(SEGMENT_BYTES_MIN - BLOCK_BYTES).problems();
        assert_eq!(below.len(), 1, "{below:?}");
        assert!(below[0].contains("segment_bytes"), "{below:?}");
        assert_eq!(
            at(SEGMENT_BYTES_MIN + 1).problems().len(),
            1,
            "not block-aligned"
        );
    }

    #[test]
    fn toml_section_rejects_unknown_fields() {
        assert!(toml::from_str::<StorageConfig>("no_such_field = 1").is_err());
        let c: StorageConfig = toml::from_str("max_writes_in_flight = 3").unwrap();
        assert_eq!(c.max_writes_in_flight, 3);
        assert_eq!(c.segment_bytes, StorageConfig::default().segment_bytes);
    }
}
