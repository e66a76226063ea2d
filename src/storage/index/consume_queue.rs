//! ConsumeQueue: per (topic, queue) fixed-size entries pointing into the CommitLog. Derived
//! data: kept in memory for reads, persisted lazily to `<dir>/consumequeue/<topic>/<queue>`
//! only up to the durable log (never ahead of it), and reconciled with the log at open (the log
//! is the truth). The files are small sequential appends written with plain `std::fs` and never
//! fsynced: losing or tearing them costs only a rebuild from the log.
//!
//! Entry (28 bytes, little-endian):
//! ```text
//! 0                8        12               20       24       28
//! +----------------+--------+----------------+--------+--------+
//! | log_position   | size   | base_offset    | count  | tag    |
//! | u64            | u32    | u64            | u32    | hash32 |
//! +----------------+--------+----------------+--------+--------+
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size of one persisted entry.
pub const CQ_ENTRY_BYTES: usize = 28;

/// One record of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqEntry {
    pub position: u64,
    pub size: u32,
    pub base_offset: u64,
    pub count: u32,
    pub tag_hash: u32,
}

impl CqEntry {
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
    pub fn end_position(&self) -> u64 {
        self.position + u64::from(self.size)
    }
    pub fn encode(&self) -> [u8; CQ_ENTRY_BYTES] {
        let mut b = [0u8; CQ_ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.position.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[12..20].copy_from_slice(&self.base_offset.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..28].copy_from_slice(&self.tag_hash.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; CQ_ENTRY_BYTES]) -> CqEntry {
        CqEntry {
            position: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            size: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            base_offset: u64::from_le_bytes(b[12..20].try_into().unwrap()),
            count: u32::from_le_bytes(b[20..24].try_into().unwrap()),
            tag_hash: u32::from_le_bytes(b[24..28].try_into().unwrap()),
        }
    }
}

/// Path of a queue's index file.
pub fn cq_path(dir: &Path, topic: &str, queue_id: u32) -> PathBuf {
    dir.join("consumequeue")
        .join(topic)
        .join(queue_id.to_string())
}

/// In-memory index of one queue.
pub(crate) struct QueueIndex {
    /// Small id used as a map key by the producer table.
    pub uid: u32,
    /// Sorted by offset and by position.
    pub entries: Vec<CqEntry>,
    /// Offset the next record of this queue gets.
    pub next_offset: u64,
    /// `entries[..persisted]` are in the file.
    pub persisted: usize,
    pub bytes: u64,
}

impl QueueIndex {
    pub fn new(uid: u32) -> Self {
        QueueIndex {
            uid,
            entries: Vec::new(),
            next_offset: 0,
            persisted: 0,
            bytes: 0,
        }
    }

    pub fn push(&mut self, e: CqEntry) {
        debug_assert!(self
            .entries
            .last()
            .map_or(true, |l| l.end_position() <= e.position));
        self.next_offset = e.end_offset();
        self.bytes += u64::from(e.size);
        self.entries.push(e);
    }

    pub fn min_offset(&self) -> u64 {
        self.entries
            .first()
            .map_or(self.next_offset, |e| e.base_offset)
    }

    /// Number of entries wholly below `visible`.
    pub fn visible_count(&self, visible: u64) -> usize {
        self.entries
            .partition_point(|e| e.end_position() <= visible)
    }

    pub fn visible_end(&self, visible: u64) -> u64 {
        match self.visible_count(visible) {
            0 => self.min_offset(),
            n => self.entries[n - 1].end_offset(),
        }
    }

    /// Index of the entry containing `offset` (or the first one after it).
    pub fn find(&self, offset: u64) -> usize {
        self.entries.partition_point(|e| e.end_offset() <= offset)
    }

    /// Drops entries of log positions below `position`.
    pub fn prune_below(&mut self, position: u64) {
        let n = self.entries.partition_point(|e| e.position < position);
        for e in &self.entries[..n] {
            self.bytes -= u64::from(e.size);
        }
        self.entries.drain(..n);
        self.persisted = self.persisted.saturating_sub(n);
    }

    /// Appends entries that became durable to the file.
    pub fn persist(&mut self, path: &Path, durable: u64) -> std::io::Result<()> {
        let upto = self.visible_count(durable);
        if upto <= self.persisted {
            return Ok(());
        }
        let mut buf = Vec::with_capacity((upto - self.persisted) * CQ_ENTRY_BYTES);
        for e in &self.entries[self.persisted..upto] {
            buf.extend_from_slice(&e.encode());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(&buf)?;
        self.persisted = upto;
        Ok(())
    }
}

/// Reads a queue's index file; a trailing partial entry is ignored. `None` if missing.
pub fn read_cq_file(path: &Path) -> std::io::Result<Option<Vec<CqEntry>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(
            b.chunks_exact(CQ_ENTRY_BYTES)
                .map(|c| CqEntry::decode(c.try_into().expect("exact chunk")))
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Rewrites a queue's index file so that it holds exactly `keep` entries of the file followed
/// by `append`.
pub fn rewrite_cq_file(path: &Path, keep: usize, append: &[CqEntry]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    f.set_len((keep * CQ_ENTRY_BYTES) as u64)?;
    let mut f = OpenOptions::new().append(true).open(path)?;
    let mut buf = Vec::with_capacity(append.len() * CQ_ENTRY_BYTES);
    for e in append {
        buf.extend_from_slice(&e.encode());
    }
    f.write_all(&buf)
}
