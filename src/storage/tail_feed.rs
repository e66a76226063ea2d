//! The tail feed: records appended while a replication stream is caught up, kept in memory so
//! the master sends them without reading its log back (see `stream.rs`). Filled by
//! `ShardStore::append`, drained by `ShardStore::tail_take`.

use std::collections::VecDeque;

use bytes::BytesMut;

/// Records appended while a replication stream is caught up, in order, in runs of contiguous
/// positions of at most [`FEED_CHUNK_BYTES`] (a new run starts where the log rolled to a new
/// segment). When more than `max_bytes` pile up (the replica stopped reading) the feed is
/// dropped and the stream goes back to reading the log from disk.
#[derive(Default)]
pub(crate) struct TailFeed {
    active: bool,
    /// Every record appended at or after `from` is in `runs` (while active).
    from: u64,
    runs: VecDeque<(u64, BytesMut)>,
    bytes: usize,
    max_bytes: usize,
}

/// Largest run handed out at once (a single larger record still goes whole).
const FEED_CHUNK_BYTES: usize = 1 << 20;

impl TailFeed {
    /// An active feed for a stream that has sent everything below `from`, keeping at most
    /// `max_bytes`.
    pub(crate) fn starting_at(from: u64, max_bytes: usize) -> TailFeed {
        TailFeed {
            active: true,
            from,
            runs: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Whether the feed holds every record from `from` on.
    pub(crate) fn covers(&self, from: u64) -> bool {
        self.active && from >= self.from
    }

    /// The next run of records at or after `from` as `(position, bytes)`, if the feed covers
    /// `from` and has one.
    pub(crate) fn take(&mut self, from: u64) -> Option<(u64, BytesMut)> {
        if !self.covers(from) {
            return None;
        }
        let (position, run) = self.runs.pop_front()?;
        debug_assert!(
            position >= from,
            "feed run {position} below the stream at {from}"
        );
        self.bytes -= run.len();
        self.from = position + run.len() as u64;
        Some((position, run))
    }

    pub(crate) fn push(&mut self, position: u64, parts: &[&[u8]]) {
        if !self.active {
            return;
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.bytes + len > self.max_bytes {
            log::info!(
                "replication: tail feed over {} bytes; the stream reads from disk",
                self.max_bytes
            );
            *self = TailFeed::default();
            return;
        }
        let extend = matches!(self.runs.back(), Some((p, b))
            if p + b.len() as u64 == position && b.len() + len <= FEED_CHUNK_BYTES);
        if !extend {
            self.runs
                .push_back((position, BytesMut::with_capacity(len.max(64 << 10))));
        }
        let run = &mut self.runs.back_mut().expect("just ensured").1;
        for p in parts {
            run.extend_from_slice(p);
        }
        self.bytes += len;
    }
}
