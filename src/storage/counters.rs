//! The raw counters the CommitLog and its flusher keep; `ShardStore::metrics` turns them into
//! [`crate::storage::StorageMetrics`].

use crate::metrics::Histogram;

/// Bucket bounds of the fdatasync latency histogram, in µs (rendered in seconds). This disk's
/// fdatasync is ~60 µs alone and ~130 µs with a 64 KiB write (NOTES.md); a sync behind a
/// segment preparation takes tens of ms.
pub const FSYNC_LATENCY_BOUNDS_US: &[u64] = &[
    50, 100, 150, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 2_500_000,
];
/// Bucket bounds of the group-commit size in bytes (log bytes one flush cycle made durable).
pub const GROUP_COMMIT_BYTES_BOUNDS: &[u64] = &[
    512,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
];
/// Bucket bounds of the group-commit size in records (appends one flush cycle made durable).
pub const GROUP_COMMIT_RECORDS_BOUNDS: &[u64] =
    &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384];

/// Raw counters kept by the log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters {
    pub appends: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub fsyncs: u64,
    pub flush_cycles: u64,
    pub unflushed_hwm_bytes: u64,
    pub flush_latency_sum_us: u64,
    pub flush_latency_count: u64,
    /// How long the fdatasyncs of one flush cycle took (all segments' syncs together).
    pub fsync_latency_us: Histogram,
    /// Log bytes each flush cycle made durable.
    pub group_commit_bytes: Histogram,
    /// Appends each flush cycle made durable.
    pub group_commit_records: Histogram,
    /// Segments made from a recycled one (no zeros written, no extents to convert).
    pub segments_recycled: u64,
    /// `appends` as counted at the hand-off of the last completed flush cycle.
    appends_covered: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            appends: 0,
            writes: 0,
            written_bytes: 0,
            fsyncs: 0,
            flush_cycles: 0,
            unflushed_hwm_bytes: 0,
            flush_latency_sum_us: 0,
            flush_latency_count: 0,
            fsync_latency_us: Histogram::new(FSYNC_LATENCY_BOUNDS_US),
            group_commit_bytes: Histogram::new(GROUP_COMMIT_BYTES_BOUNDS),
            group_commit_records: Histogram::new(GROUP_COMMIT_RECORDS_BOUNDS),
            segments_recycled: 0,
            appends_covered: 0,
        }
    }
}

/// One completed flush cycle, as the flusher saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlushCycle {
    /// fdatasyncs issued (one per dirty segment).
    pub fsyncs: u64,
    /// The whole cycle: hand-off, waiting for the writes, the syncs.
    pub cycle_us: u64,
    /// The syncs alone.
    pub sync_us: u64,
    /// Log bytes the cycle made durable (new durable minus old).
    pub bytes: u64,
    /// `appends` counted when the cycle took its target (every one of them is covered).
    pub appends_at_handoff: u64,
}

impl Counters {
    pub fn note_flush_cycle(&mut self, c: FlushCycle) {
        self.fsyncs += c.fsyncs;
        self.flush_cycles += 1;
        self.flush_latency_sum_us += c.cycle_us;
        self.flush_latency_count += 1;
        self.fsync_latency_us.record(c.sync_us);
        self.group_commit_bytes.record(c.bytes);
        self.group_commit_records
            .record(c.appends_at_handoff.saturating_sub(self.appends_covered));
        self.appends_covered = self.appends_covered.max(c.appends_at_handoff);
    }
}
