//! Recovery on open. The log is the truth; everything else is derived from it.
//!
//! The whole log is scanned (every record's CRC is checked, and the consume queues, key index
//! and producer table are rebuilt from it). Where the scan stops, and how the persisted
//! consume-queue files compare with the log, is decided by [`decide`], a decision table with one
//! test per row (`tests/storage_recovery.rs`):
//!
//! | observation | action |
//! |---|---|
//! | valid record at the scan position | continue |
//! | segment ends (or only zeros follow) and the next segment starts with a record that could not have fit here | continue in the next segment (the writer rolled) |
//! | clean tail: only zeros (a prepared segment) or nothing follows | end here, nothing to truncate |
//! | torn record: bad header, short or invalid record, or non-zero bytes after the zeros | truncate here |
//! | CRC mismatch followed by valid records | truncate here, and warn |
//! | the scan reached the caller's truncation limit (a replica whose history diverged) | truncate here |
//! | index file ahead of the log (or diverging) | truncate the index file to the matching prefix |
//! | index file behind the log | append the missing entries rebuilt from the log |
//! | index file missing | rebuild it from the log |
//!
//! **Why a CRC mismatch followed by valid records truncates instead of refusing to open:** the
//! disk persists writes that were not yet fsynced in any order, so a crash inside the unsynced
//! window routinely leaves a bad record followed by good ones. Those records were never
//! acknowledged under SYNC_FLUSH (an ack needs an fdatasync that covers every earlier byte), so
//! dropping them loses nothing acknowledged. Without a separately persisted durable watermark
//! we cannot tell this apart from media corruption of acknowledged data; refusing to open would
//! turn every ordinary crash into an outage. So we truncate (as RocketMQ does), log a warning
//! and report how many valid-looking records were discarded, so an operator can tell.
//!
//! Truncating means: the bytes from the truncation point to the last non-zero byte of that
//! segment are overwritten with zeros (so stale records can never reappear at a position a new
//! record ends on), later segments are deleted, and then every segment is fdatasynced (bytes
//! that survived a process crash may still be only in the device cache).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::rc::Rc;

use crate::storage::backend::{align_down, align_up, BackendFile, IoBuf, StorageBackend};
use crate::storage::commitlog::Seg;
use crate::storage::error::StorageError;
use crate::storage::record::{RecordHeader, RecordView, HEADER_BYTES};
use crate::storage::segment::{parse_segment_name, segment_path, Segment};
use crate::storage::StorageConfig;

/// What recovery saw at one decision point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    ValidRecord,
    RolledToNextSegment,
    CleanTail,
    TornRecord,
    CrcMismatchThenValid {
        valid_after: u64,
    },
    /// The next record would end past the limit the caller asked to truncate to.
    BeyondLimit,
    IndexAhead,
    IndexBehind,
    IndexMissing,
    IndexConsistent,
}

/// What recovery does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    NextSegment,
    EndHere,
    TruncateLog,
    TruncateIndex,
    ExtendIndex,
    RebuildIndex,
    Keep,
}

/// The recovery decision table.
pub fn decide(o: Observation) -> Action {
    match o {
        Observation::ValidRecord => Action::Continue,
        Observation::RolledToNextSegment => Action::NextSegment,
        Observation::CleanTail => Action::EndHere,
        Observation::TornRecord => Action::TruncateLog,
        Observation::CrcMismatchThenValid { .. } => Action::TruncateLog,
        Observation::BeyondLimit => Action::TruncateLog,
        Observation::IndexAhead => Action::TruncateIndex,
        Observation::IndexBehind => Action::ExtendIndex,
        Observation::IndexMissing => Action::RebuildIndex,
        Observation::IndexConsistent => Action::Keep,
    }
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records_scanned: u64,
    /// End of the recovered log.
    pub end_position: u64,
    /// The observation that ended the scan.
    pub tail: Option<Observation>,
    /// Where the log was truncated and how many non-zero bytes were discarded there.
    pub truncated_at: Option<u64>,
    pub truncated_bytes: u64,
    pub segments_removed: u64,
    /// Valid-looking records found after a CRC mismatch and discarded.
    pub valid_records_discarded: u64,
    pub index_entries_rebuilt: u64,
    pub index_entries_truncated: u64,
    pub index_files_rebuilt: u64,
    pub producers: u64,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovered {} records in {} segments, log ends at {}",
            self.records_scanned, self.segments, self.end_position
        )?;
        if let Some(t) = self.tail {
            write!(f, " ({t:?})")?;
        }
        if let Some(p) = self.truncated_at {
            write!(
                f,
                "; truncated {} bytes at position {p}",
                self.truncated_bytes
            )?;
        }
        if self.segments_removed > 0 {
            write!(f, "; removed {} later segments", self.segments_removed)?;
        }
        if self.valid_records_discarded > 0 {
            write!(
                f,
                "; WARNING: discarded {} valid-looking records after a CRC mismatch",
                self.valid_records_discarded
            )?;
        }
        write!(
            f,
            "; index: {} entries rebuilt, {} truncated, {} files rebuilt; {} producers",
            self.index_entries_rebuilt,
            self.index_entries_truncated,
            self.index_files_rebuilt,
            self.producers
        )
    }
}

/// The recovered log, ready to become a `CommitLog`.
pub(crate) struct RecoveredLog<B: StorageBackend> {
    pub segments: BTreeMap<u64, Seg<B>>,
    pub active: Seg<B>,
    pub end: u64,
    pub tail: Vec<u8>,
    pub spare: Option<Seg<B>>,
    pub report: RecoveryReport,
}

/// Bytes read per scan window.
const SCAN_WINDOW_BYTES: usize = 1 << 20;

struct Scanner<'a, F: BackendFile> {
    seg: &'a Segment<F>,
    win_start: u64,
    win: Vec<u8>,
}

impl<'a, F: BackendFile> Scanner<'a, F> {
    fn new(seg: &'a Segment<F>) -> Self {
        Scanner {
            seg,
            win_start: seg.base,
            win: Vec::new(),
        }
    }

    /// Up to `len` bytes at log position `pos` (fewer at the segment end).
    async fn bytes(&mut self, pos: u64, len: usize) -> Result<&[u8], StorageError> {
        let len = len.min((self.seg.end() - pos) as usize);
        let have =
            pos >= self.win_start && pos + len as u64 <= self.win_start + self.win.len() as u64;
        if !have {
            let want = len
                .max(SCAN_WINDOW_BYTES)
                .min((self.seg.end() - pos) as usize);
            self.win.clear();
            self.win_start = pos;
            self.seg
                .file
                .read_into(pos - self.seg.base, want, &mut self.win)
                .await
                .map_err(|e| StorageError::io("read", self.seg.path.clone(), e))?;
        }
        let at = (pos - self.win_start) as usize;
        let end = (at + len).min(self.win.len());
        Ok(&self.win[at..end])
    }

    /// The record at `pos`, if valid.
    async fn record_at(&mut self, pos: u64) -> Result<Slot, StorageError> {
        if self.seg.end() - pos < HEADER_BYTES as u64 {
            return Ok(Slot::End);
        }
        let h = self.bytes(pos, HEADER_BYTES).await?;
        if h.iter().all(|&b| b == 0) {
            return Ok(Slot::Zero);
        }
        let Ok(hdr) = RecordHeader::decode(h) else {
            return Ok(Slot::Invalid { len: None });
        };
        let total = hdr.total_len as usize;
        if pos + total as u64 > self.seg.end() {
            return Ok(Slot::Invalid { len: None });
        }
        let b = self.bytes(pos, total).await?;
        Ok(match RecordView::parse_at(b, pos) {
            Ok(_) => Slot::Valid { len: total as u64 },
            Err(_) => Slot::Invalid {
                len: Some(total as u64),
            },
        })
    }

    /// Position one past the last non-zero byte in `[from, end)`, or `from`.
    async fn last_nonzero(&mut self, from: u64) -> Result<u64, StorageError> {
        let mut last = from;
        let mut pos = from;
        while pos < self.seg.end() {
            let b = self.bytes(pos, SCAN_WINDOW_BYTES).await?;
            let n = b.len() as u64;
            if let Some(i) = b.iter().rposition(|&x| x != 0) {
                last = pos + i as u64 + 1;
            }
            pos += n;
        }
        Ok(last)
    }
}

enum Slot {
    Valid { len: u64 },
    Zero,
    End,
    Invalid { len: Option<u64> },
}

/// Scans, truncates and prepares the log in `dir`. `on_record(view)` is called for every record
/// kept, in log order. With `limit`, nothing that ends past it is kept.
pub(crate) async fn recover_log<B: StorageBackend>(
    backend: &B,
    dir: &Path,
    cfg: &StorageConfig,
    limit: Option<u64>,
    mut on_record: impl FnMut(&RecordView<'_>),
) -> Result<RecoveredLog<B>, StorageError> {
    backend
        .create_dir_all(dir)
        .map_err(|e| StorageError::io("create dir", dir, e))?;
    let names = backend
        .list(dir)
        .map_err(|e| StorageError::io("list", dir, e))?;
    for n in names.iter().filter(|n| n.ends_with(".tmp")) {
        let _ = backend.remove(&dir.join(n));
    }
    let mut bases: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    bases.sort_unstable();
    let mut report = RecoveryReport::default();
    if bases.is_empty() {
        let p = segment_path(dir, 0);
        backend
            .create_zeroed(&p, cfg.segment_bytes)
            .await
            .map_err(|e| StorageError::io("prepare segment", &p, e))?;
        bases.push(0);
    }
    let mut segs: Vec<Seg<B>> = Vec::with_capacity(bases.len());
    for &base in &bases {
        let p = segment_path(dir, base);
        let file = backend
            .open(&p)
            .await
            .map_err(|e| StorageError::io("open segment", &p, e))?;
        let bytes = file
            .file_len()
            .await
            .map_err(|e| StorageError::io("stat segment", &p, e))?;
        if let Some(prev) = segs.last() {
            if prev.end() != base {
                return Err(StorageError::Corrupt {
                    position: prev.end(),
                    detail: format!(
                        "segment {} does not follow segment {} ({} bytes): a segment is missing",
                        base, prev.base, prev.bytes
                    ),
                });
            }
        }
        segs.push(Rc::new(Segment {
            base,
            bytes,
            file,
            path: p,
        }));
    }

    // Scan: find the end of the valid prefix.
    let mut idx = 0;
    let mut pos = segs[0].base;
    let mut truncate = false;
    let tail_obs;
    'segments: loop {
        let seg = segs[idx].clone();
        let mut sc = Scanner::new(&seg);
        loop {
            let slot = sc.record_at(pos).await?;
            let obs = match slot {
                Slot::Valid { len } if limit.is_some_and(|l| pos + len > l) => {
                    Observation::BeyondLimit
                }
                Slot::Valid { len } => {
                    let b = sc.bytes(pos, len as usize).await?;
                    let v = RecordView::parse_at(b, pos).expect("validated");
                    on_record(&v);
                    report.records_scanned += 1;
                    pos += len;
                    let a = decide(Observation::ValidRecord);
                    debug_assert_eq!(a, Action::Continue);
                    continue;
                }
                Slot::Zero | Slot::End => {
                    let stale = sc.last_nonzero(pos).await? > pos;
                    if stale {
                        Observation::TornRecord
                    } else if limit.is_some_and(|l| segs.get(idx + 1).is_some_and(|n| n.base >= l))
                    {
                        // Whatever the next segment holds lies past the limit.
                        Observation::CleanTail
                    } else if next_continues(&segs, idx, pos).await? {
                        Observation::RolledToNextSegment
                    } else {
                        Observation::CleanTail
                    }
                }
                Slot::Invalid { len: None } => Observation::TornRecord,
                Slot::Invalid { len: Some(len) } => {
                    let mut q = pos + len;
                    let mut valid_after = 0u64;
                    while let Slot::Valid { len } = sc.record_at(q).await? {
                        valid_after += 1;
                        q += len;
                    }
                    if valid_after > 0 {
                        Observation::CrcMismatchThenValid { valid_after }
                    } else {
                        Observation::TornRecord
                    }
                }
            };
            match decide(obs) {
                Action::NextSegment => {
                    idx += 1;
                    pos = segs[idx].base;
                    continue 'segments;
                }
                Action::EndHere => {
                    tail_obs = obs;
                    break 'segments;
                }
                Action::TruncateLog => {
                    if obs == Observation::BeyondLimit {
                        log::warn!(
                            "storage: truncating the log to {pos} as asked (replica resync)"
                        );
                    }
                    if let Observation::CrcMismatchThenValid { valid_after } = obs {
                        report.valid_records_discarded = valid_after;
                        log::warn!(
                            "storage: CRC mismatch at log position {pos} followed by {valid_after} \
                             valid records; truncating (see recovery.rs for why)"
                        );
                    }
                    tail_obs = obs;
                    truncate = true;
                    break 'segments;
                }
                a => unreachable!("log scan got index action {a:?}"),
            }
        }
    }
    report.tail = Some(tail_obs);
    report.segments = idx as u64 + 1;
    report.end_position = pos;
    let active = segs[idx].clone();

    if truncate {
        let mut sc = Scanner::new(&active);
        let last = sc.last_nonzero(pos).await?;
        report.truncated_at = Some(pos);
        report.truncated_bytes = last.saturating_sub(pos);
        zero_range(&active, pos, last).await?;
        log::warn!(
            "storage: truncated {} bytes at log position {pos}",
            report.truncated_bytes
        );
    }
    // Segments after the active one: delete those that hold anything; keep the first as the
    // spare only when it is untouched (all zeros).
    let mut spare = None;
    for (i, seg) in segs.iter().enumerate().skip(idx + 1) {
        let mut sc = Scanner::new(seg);
        let clean = sc.last_nonzero(seg.base).await? == seg.base;
        if i == idx + 1 && clean && seg.bytes == cfg.segment_bytes {
            spare = Some(seg.clone());
        } else {
            if !clean {
                report.truncated_at.get_or_insert(pos);
            }
            backend
                .remove(&seg.path)
                .map_err(|e| StorageError::io("remove segment", &seg.path, e))?;
            report.segments_removed += 1;
        }
    }
    let mut segments = BTreeMap::new();
    for seg in &segs[..=idx] {
        seg.file
            .sync()
            .await
            .map_err(|e| StorageError::io("fdatasync", &seg.path, e))?;
        segments.insert(seg.base, seg.clone());
    }
    let tail_base = align_down(pos).max(active.base);
    let mut tail = Vec::new();
    if tail_base < pos {
        active
            .file
            .read_into(
                tail_base - active.base,
                (pos - tail_base) as usize,
                &mut tail,
            )
            .await
            .map_err(|e| StorageError::io("read tail", &active.path, e))?;
    }
    Ok(RecoveredLog {
        segments,
        active,
        end: pos,
        tail,
        spare,
        report,
    })
}

/// Whether the segment after `idx` begins with a valid record that would not have fit at `pos`
/// (so the writer rolled there). A record that would have fit means something is missing here.
async fn next_continues<F: BackendFile>(
    segs: &[Rc<Segment<F>>],
    idx: usize,
    pos: u64,
) -> Result<bool, StorageError> {
    let Some(next) = segs.get(idx + 1) else {
        return Ok(false);
    };
    let mut sc = Scanner::new(next);
    match sc.record_at(next.base).await? {
        Slot::Valid { len } => Ok(pos + len > segs[idx].end()),
        _ => Ok(false),
    }
}

/// Overwrites `[from, to)` of the log with zeros, keeping the bytes before `from` in its block.
async fn zero_range<F: BackendFile>(
    seg: &Segment<F>,
    from: u64,
    to: u64,
) -> Result<(), StorageError> {
    if to <= from {
        return Ok(());
    }
    let start = align_down(from).max(seg.base);
    let end = align_up(to).min(seg.end());
    let mut keep = Vec::new();
    seg.file
        .read_into(start - seg.base, (from - start) as usize, &mut keep)
        .await
        .map_err(|e| StorageError::io("read", &seg.path, e))?;
    let mut at = start;
    while at < end {
        let n = (end - at).min(SCAN_WINDOW_BYTES as u64) as usize;
        let mut buf = seg.file.alloc_buf(n);
        buf.bytes_mut().fill(0);
        if at == start {
            buf.bytes_mut()[..keep.len()].copy_from_slice(&keep);
        }
        seg.file
            .write_at(buf, at - seg.base)
            .await
            .map_err(|e| StorageError::io("write zeros", &seg.path, e))?;
        at += n as u64;
    }
    seg.file
        .sync()
        .await
        .map_err(|e| StorageError::io("fdatasync", &seg.path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table_rows() {
        use Action::*;
        use Observation::*;
        let rows = [
            (ValidRecord, Continue),
            (RolledToNextSegment, NextSegment),
            (CleanTail, EndHere),
            (TornRecord, TruncateLog),
            (CrcMismatchThenValid { valid_after: 3 }, TruncateLog),
            (BeyondLimit, TruncateLog),
            (IndexAhead, TruncateIndex),
            (IndexBehind, ExtendIndex),
            (IndexMissing, RebuildIndex),
            (IndexConsistent, Keep),
        ];
        for (o, a) in rows {
            assert_eq!(decide(o), a, "{o:?}");
        }
    }
}
