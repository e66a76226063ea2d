//! The raw counters the CommitLog and its flusher keep; `ShardStore::metrics` turns them into
//! [`crate::storage::StorageMetrics`].

/// Raw counters kept by the log.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub appends: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub fsyncs: u64,
    pub flush_cycles: u64,
    pub unflushed_hwm_bytes: u64,
    pub flush_latency_sum_us: u64,
    pub flush_latency_count: u64,
}
