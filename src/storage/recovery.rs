//! Recovery on open. The log is the truth; everything else is derived from it.
//!
//! The log is scanned (every record's CRC is checked, and the consume queues, key index and
//! producer table are rebuilt from it). The durable checkpoint (`checkpoint.rs`) says up to
//! which record end `C` the log was once durable. Where the scan goes next is decided by
//! [`decide`], a decision table with one test per row (`tests/storage_sim.rs`, `recovery_*`):
//!
//! | observation | action | test |
//! |---|---|---|
//! | valid record at the scan position | continue | `recovery_clean_tail_keeps_everything` |
//! | only zeros to the segment end and the next segment starts with a record that could not have fit here | continue in the next segment (the writer rolled) | `reads_cross_segment_boundaries_and_survive_reopen` |
//! | clean tail at or past `C`: only zeros (a prepared segment) or nothing follows | end here, nothing to truncate | `recovery_zero_filled_prepared_tail_after_crash_stops_cleanly` |
//! | torn record at or past `C`: bad header, short or invalid record, or non-zero bytes after the zeros | truncate here | `recovery_torn_record_is_truncated` |
//! | CRC mismatch at or past `C` followed by valid records | truncate here, and warn | `recovery_crc_mismatch_past_the_checkpoint_followed_by_valid_records_truncates` |
//! | bad record (any of the above) before `C`, `recovery = strict` | refuse to open: [`StorageError::CorruptDurable`] names file, byte and what to run | `recovery_flipped_byte_before_the_checkpoint_refuses_to_open` (+ `storage_disk.rs`) |
//! | bad record before `C`, `recovery = skip-corrupt` | quarantine: copy the bytes up to the next valid record (a record whose CRC and self-position check out) to `<shard>/quarantine/<position>.bin`, write a gap record in their place, continue there | `recovery_skip_corrupt_quarantines_exactly_the_bad_record` (+ `storage_disk.rs`) |
//! | no record (zeros or end of the log) before `C`, `strict` | refuse to open | `recovery_missing_durable_bytes_refuse_to_open` |
//! | no record before `C`, `skip-corrupt` | continue in the next segment if one follows, else end the log here (lower the checkpoint first); report the loss | `recovery_missing_durable_bytes_refuse_to_open` |
//! | the scan reached the caller's truncation limit (a replica whose history diverged) | truncate here (lower the checkpoint first) | `opening_with_a_limit_truncates_the_log_and_rebuilds_what_derives_from_it` |
//! | index file ahead of the log (or diverging) | truncate the index file to the matching prefix | `recovery_index_ahead_of_the_log_is_truncated` |
//! | index file behind the log | append the missing entries rebuilt from the log | `recovery_index_behind_the_log_is_rebuilt` |
//! | index file missing | rebuild it from the log | `recovery_missing_index_files_are_rebuilt` |
//!
//! **Why a bad record past the checkpoint truncates:** the disk persists writes that were not
//! yet fsynced in any order, so a crash inside the unsynced window routinely leaves a bad
//! record followed by good ones. Past `C` nothing was promised durable except what a crash
//! inside the lazy checkpoint's lag (at most
//! [`crate::storage::checkpoint::CHECKPOINT_INTERVAL_MS`] plus one write) leaves
//! uncovered; there we cannot tell a torn write from corruption and we truncate (as RocketMQ
//! does), log a warning and report how many valid-looking records were discarded.
//!
//! **Why a bad record before the checkpoint never truncates:** those bytes were covered by a
//! completed fdatasync, so they were acknowledged; dropping them (and everything after) would
//! take back acks for a single flipped bit. Refusing is the default because only an operator
//! can say whether a backup or the replica should be used instead; `skip-corrupt` keeps every
//! valid record and makes the loss exactly the bad record, with its bytes kept aside.
//!
//! A **gap record** (flag [`FLAG_GAP`]) keeps the log a sequence of valid records, so the next
//! open (strict again) passes, and a replica streaming the range copies it as is. It gets no
//! consume-queue entry: the queue offsets of later records come from their own headers and do
//! not move; consumers see the lost offsets as a gap.
//!
//! Truncating means: the bytes from the truncation point to the last non-zero byte of that
//! segment are overwritten with zeros (so stale records can never reappear at a position a new
//! record ends on), later segments are deleted, and then every segment is fdatasynced (bytes
//! that survived a process crash may still be only in the device cache).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::format::record::{
    build_header, RecordHeader, RecordView, FLAG_GAP, HEADER_BYTES, RECORD_MAGIC,
};
use crate::storage::backend::{align_down, align_up, BackendFile, IoBuf, StorageBackend};
use crate::storage::checkpoint::{Checkpoint, CHECKPOINT_FILE};
use crate::storage::error::StorageError;
use crate::storage::segment::{
    create_segment, is_recycled_name, parse_segment_name, segment_path, Seg, Segment,
};
use crate::storage::{RecoveryMode, StorageConfig};

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
    /// A bad record starting below the durable checkpoint: corruption of acknowledged bytes.
    CorruptBeforeCheckpoint,
    /// No record (zeros, or the end of the log) below the durable checkpoint; whether later
    /// segments follow.
    MissingBeforeCheckpoint {
        more_segments: bool,
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
    /// Fail the open with [`StorageError::CorruptDurable`].
    RefuseToOpen,
    /// Move the bad bytes aside and put a gap record in their place.
    Quarantine,
    TruncateIndex,
    ExtendIndex,
    RebuildIndex,
    Keep,
}

/// The recovery decision table.
pub fn decide(o: Observation, mode: RecoveryMode) -> Action {
    match (o, mode) {
        (Observation::ValidRecord, _) => Action::Continue,
        (Observation::RolledToNextSegment, _) => Action::NextSegment,
        (Observation::CleanTail, _) => Action::EndHere,
        (Observation::TornRecord, _) => Action::TruncateLog,
        (Observation::CrcMismatchThenValid { .. }, _) => Action::TruncateLog,
        (Observation::CorruptBeforeCheckpoint, RecoveryMode::Strict) => Action::RefuseToOpen,
        (Observation::CorruptBeforeCheckpoint, RecoveryMode::SkipCorrupt) => Action::Quarantine,
        (Observation::MissingBeforeCheckpoint { .. }, RecoveryMode::Strict) => Action::RefuseToOpen,
        (
            Observation::MissingBeforeCheckpoint {
                more_segments: true,
            },
            RecoveryMode::SkipCorrupt,
        ) => Action::NextSegment,
        (
            Observation::MissingBeforeCheckpoint {
                more_segments: false,
            },
            RecoveryMode::SkipCorrupt,
        ) => Action::TruncateLog,
        (Observation::BeyondLimit, _) => Action::TruncateLog,
        (Observation::IndexAhead, _) => Action::TruncateIndex,
        (Observation::IndexBehind, _) => Action::ExtendIndex,
        (Observation::IndexMissing, _) => Action::RebuildIndex,
        (Observation::IndexConsistent, _) => Action::Keep,
    }
}

/// One range of the log that recovery moved aside (`recovery = skip-corrupt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Log position of the first bad byte and how many bytes were moved aside.
    pub position: u64,
    pub bytes: u64,
    /// Where the bytes were copied.
    pub file: PathBuf,
    /// `(topic, queue, first offset, message count)` of the lost record, when its header was
    /// still readable (the offsets are then a gap in that queue).
    pub lost: Option<(String, u32, u64, u32)>,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records_scanned: u64,
    /// End of the recovered log.
    pub end_position: u64,
    /// The durable checkpoint found at open (0: none).
    pub checkpoint: u64,
    /// The observation that ended the scan.
    pub tail: Option<Observation>,
    /// Where the log was truncated and how many non-zero bytes were discarded there.
    pub truncated_at: Option<u64>,
    pub truncated_bytes: u64,
    pub segments_removed: u64,
    /// Valid-looking records found after a CRC mismatch and discarded.
    pub valid_records_discarded: u64,
    /// Corrupt ranges before the checkpoint moved aside (`skip-corrupt`).
    pub quarantined: Vec<Quarantined>,
    /// `skip-corrupt`: bytes the checkpoint said were durable but that were gone (upper bound).
    pub durable_bytes_lost: u64,
    pub index_entries_rebuilt: u64,
    pub index_entries_truncated: u64,
    pub index_files_rebuilt: u64,
    pub producers: u64,
    /// Where the scan began: 0 or the first segment, or an index snapshot's position.
    pub scan_start: u64,
    /// An index snapshot was used (the scan began at its position).
    pub from_snapshot: bool,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovered {} records in {} segments, log ends at {} (checkpoint {})",
            self.records_scanned, self.segments, self.end_position, self.checkpoint
        )?;
        if self.from_snapshot {
            write!(
                f,
                "; scanned from the index snapshot at {}",
                self.scan_start
            )?;
        }
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
        if !self.quarantined.is_empty() {
            write!(
                f,
                "; WARNING: quarantined {} corrupt ranges ({} bytes)",
                self.quarantined.len(),
                self.quarantined.iter().map(|q| q.bytes).sum::<u64>()
            )?;
        }
        if self.durable_bytes_lost > 0 {
            write!(
                f,
                "; WARNING: up to {} durable bytes were missing",
                self.durable_bytes_lost
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
    /// End of the last record (below `end` when the log ends in a rolled segment's padding).
    pub record_end: u64,
    pub tail: Vec<u8>,
    pub spare: Option<Seg<B>>,
    /// Dropped segments kept for reuse (`<base>.recycled`, `segment_bytes` long).
    pub recyclable: Vec<PathBuf>,
    pub checkpoint: Option<Checkpoint<<B as StorageBackend>::File>>,
    pub report: RecoveryReport,
}

/// Bytes read per scan window.
const SCAN_WINDOW_BYTES: usize = 1 << 20;
/// Bytes read per window when only looking for non-zero bytes (larger reads, more bandwidth).
const ZERO_SCAN_WINDOW_BYTES: usize = 8 << 20;

/// Index of the last non-zero byte of `b`, 16 bytes at a time.
fn last_nonzero_in(b: &[u8]) -> Option<usize> {
    let whole = b.len() / 16 * 16;
    if let Some(i) = b[whole..].iter().rposition(|&x| x != 0) {
        return Some(whole + i);
    }
    let w = b[..whole]
        .chunks_exact(16)
        .rposition(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) != 0)?;
    let at = w * 16;
    b[at..at + 16].iter().rposition(|&x| x != 0).map(|i| at + i)
}

struct Scanner<'a, F: BackendFile> {
    seg: &'a Segment<F>,
    win_start: u64,
    win: Vec<u8>,
    /// Every byte at or past this is known to be zero (the checkpoint's write reservation):
    /// [`Self::last_nonzero`] reads no further.
    zero_from: u64,
}

impl<'a, F: BackendFile> Scanner<'a, F> {
    fn new(seg: &'a Segment<F>) -> Self {
        Scanner {
            seg,
            win_start: seg.base,
            win: Vec::new(),
            zero_from: u64::MAX,
        }
    }

    /// A scanner that trusts every byte at or past `zero_from` to be zero.
    fn bounded(seg: &'a Segment<F>, zero_from: u64) -> Self {
        Scanner {
            zero_from,
            ..Scanner::new(seg)
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

    /// Drops the cached window (after the file was changed under it).
    fn forget(&mut self) {
        self.win.clear();
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
        let hdr = match RecordHeader::decode(h) {
            Ok(h) => h,
            Err(e) => {
                return Ok(Slot::Invalid {
                    len: None,
                    why: e.to_string(),
                })
            }
        };
        let total = hdr.total_len as usize;
        if pos + total as u64 > self.seg.end() {
            return Ok(Slot::Invalid {
                len: None,
                why: format!("record of {total} bytes would cross the segment end"),
            });
        }
        let b = self.bytes(pos, total).await?;
        Ok(match RecordView::parse_at(b, pos) {
            Ok(_) => Slot::Valid { len: total as u64 },
            Err(e) => Slot::Invalid {
                len: Some(total as u64),
                why: e.to_string(),
            },
        })
    }

    /// Position one past the last non-zero byte in `[from, end)`, or `from`. Reads in
    /// [`ZERO_SCAN_WINDOW_BYTES`] windows and tests 16 bytes at a time: at a clean tail this
    /// reads the rest of the segment, the largest cost of an open from a snapshot.
    async fn last_nonzero(&mut self, from: u64) -> Result<u64, StorageError> {
        let mut last = from;
        let mut pos = from;
        let end = self.seg.end().min(self.zero_from);
        while pos < end {
            let want = ZERO_SCAN_WINDOW_BYTES.min((end - pos) as usize);
            let b = self.bytes(pos, want).await?;
            let n = b.len() as u64;
            if let Some(i) = last_nonzero_in(b) {
                last = pos + i as u64 + 1;
            }
            pos += n;
        }
        Ok(last)
    }

    /// The first position after `from` in this segment holding a valid record (its CRC and
    /// its own recorded position check out), found by looking for the record magic.
    async fn next_valid_after(&mut self, from: u64) -> Result<Option<u64>, StorageError> {
        let magic = RECORD_MAGIC.to_le_bytes();
        let mut pos = from + 1;
        while pos + HEADER_BYTES as u64 <= self.seg.end() {
            let b = self.bytes(pos, SCAN_WINDOW_BYTES).await?;
            let n = b.len();
            let hit = b.windows(4).position(|w| w == magic);
            match hit {
                Some(i) => {
                    let cand = pos + i as u64;
                    if let Slot::Valid { .. } = self.record_at(cand).await? {
                        return Ok(Some(cand));
                    }
                    pos = cand + 1;
                }
                // The last 3 bytes may start a magic that continues in the next window.
                None => pos += (n as u64).saturating_sub(3).max(1),
            }
        }
        Ok(None)
    }
}

enum Slot {
    Valid { len: u64 },
    Zero,
    End,
    Invalid { len: Option<u64>, why: String },
}

/// The log's segments and checkpoint, opened but not yet scanned.
pub(crate) struct OpenedLog<B: StorageBackend> {
    segs: Vec<Seg<B>>,
    ckpt: Checkpoint<<B as StorageBackend>::File>,
    /// The log had no segment: this open created the first one (all zeros).
    fresh: bool,
    recyclable: Vec<PathBuf>,
}

impl<B: StorageBackend> OpenedLog<B> {
    /// The durable checkpoint found at open.
    pub fn checkpoint(&self) -> u64 {
        self.ckpt.position()
    }

    /// Position of the first byte the log holds.
    pub fn start(&self) -> u64 {
        self.segs[0].base
    }

    /// End of the last segment.
    pub fn end(&self) -> u64 {
        self.segs.last().expect("at least one segment").end()
    }
}

/// Whether `log_dir` holds a segment file. Without one, an open first prepares a whole
/// segment (`segment_bytes` of zeros), and fails on a file system with less room than that.
pub fn log_has_segments(log_dir: &Path) -> bool {
    std::fs::read_dir(log_dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(parse_segment_name)
                .is_some()
        })
    })
}

/// Opens the segments (creating the first when there is none) and the checkpoint in `dir`,
/// and removes leftover `.tmp` files and recycled segments it cannot reuse (another size, or
/// more than `recycle_segments`). Reads no record.
pub(crate) async fn open_log<B: StorageBackend>(
    backend: &B,
    dir: &Path,
    cfg: &StorageConfig,
) -> Result<OpenedLog<B>, StorageError> {
    backend
        .create_dir_all(dir)
        .map_err(|e| StorageError::io("create dir", dir, e))?;
    let names = backend
        .list(dir)
        .map_err(|e| StorageError::io("list", dir, e))?;
    for n in names.iter().filter(|n| n.ends_with(".tmp")) {
        let _ = backend.remove(&dir.join(n));
    }
    let mut recyclable = Vec::new();
    for n in names.iter().filter(|n| is_recycled_name(n)) {
        let p = dir.join(n);
        let fits = match backend.open(&p).await {
            Ok(f) => f.file_len().await.ok() == Some(cfg.segment_bytes),
            Err(_) => false,
        };
        if fits && recyclable.len() < cfg.recycle_segments as usize {
            recyclable.push(p);
        } else {
            backend
                .remove(&p)
                .map_err(|e| StorageError::io("remove recycled segment", &p, e))?;
        }
    }
    let mut bases: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    bases.sort_unstable();
    let fresh = bases.is_empty();
    if bases.is_empty() {
        let p = segment_path(dir, 0);
        create_segment(backend, &p, cfg)
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

    let ckpt_path = dir.join(CHECKPOINT_FILE);
    let ckpt = Checkpoint::open(backend, dir)
        .await
        .map_err(|e| StorageError::io("open checkpoint", &ckpt_path, e))?;
    Ok(OpenedLog {
        segs,
        ckpt,
        fresh,
        recyclable,
    })
}

/// Scans, truncates and prepares the opened log in `dir`. `on_record(view)` is called for
/// every record kept, in log order, from `start` (a record boundary at or below the
/// checkpoint, from an index snapshot; the caller checked it against [`OpenedLog`]) or from
/// the first segment. With `limit`, nothing that ends past it is kept.
pub(crate) async fn recover_log<B: StorageBackend>(
    backend: &B,
    dir: &Path,
    opened: OpenedLog<B>,
    cfg: &StorageConfig,
    limit: Option<u64>,
    start: Option<ScanStart>,
    mut on_record: impl FnMut(&RecordView<'_>),
) -> Result<RecoveredLog<B>, StorageError> {
    let OpenedLog {
        segs,
        ckpt,
        fresh,
        recyclable,
    } = opened;
    // Past this every byte is zero: the writer's reservation (see `checkpoint.rs`).
    let zero_from = if fresh { 0 } else { ckpt.reserved() };
    // `last_nonzero(base)` of whole segments already read (the spare is looked at twice).
    let mut last_nonzero_of: HashMap<u64, u64> = HashMap::new();
    let mut clean_spare = false;
    let ckpt_path = dir.join(CHECKPOINT_FILE);
    let mut report = RecoveryReport {
        checkpoint: ckpt.position(),
        ..RecoveryReport::default()
    };
    // Below this every record was durable once; a replica truncating to `limit` drops what
    // lies past the limit on purpose.
    let durable_below = limit.map_or(ckpt.position(), |l| l.min(ckpt.position()));
    let quarantine_dir = dir.parent().unwrap_or(dir).join("quarantine");

    // Scan: find the end of the valid prefix.
    let (mut idx, mut pos) = match start.map(|s| s.position) {
        Some(p) => (
            segs.iter()
                .position(|g| p < g.end())
                .unwrap_or(segs.len() - 1),
            p,
        ),
        None => (0, segs[0].base),
    };
    report.scan_start = pos;
    let mut record_end = pos;
    let mut truncate = false;
    let mut quarantined_at = None;
    let tail_obs;
    'segments: loop {
        let seg = segs[idx].clone();
        let mut sc = Scanner::bounded(&seg, zero_from);
        loop {
            let below = pos < durable_below;
            let slot = sc.record_at(pos).await?;
            let mut why = String::new();
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
                    record_end = pos;
                    continue;
                }
                // The log of a clean close ends exactly at its snapshot: nothing was written
                // past it since its segments were prepared (zero-filled and synced).
                Slot::Zero | Slot::End
                    if start.is_some_and(|s| s.clean_close && s.position == pos) =>
                {
                    clean_spare = true;
                    Observation::CleanTail
                }
                Slot::Zero | Slot::End => {
                    let stale = sc.last_nonzero(pos).await? > pos;
                    let more_segments = segs
                        .get(idx + 1)
                        .is_some_and(|n| !limit.is_some_and(|l| n.base >= l));
                    if stale {
                        why = "zeros followed by non-zero bytes where a record should start".into();
                        if below {
                            Observation::CorruptBeforeCheckpoint
                        } else {
                            Observation::TornRecord
                        }
                    } else {
                        match next_start(&segs, idx, pos, zero_from, &mut last_nonzero_of).await? {
                            NextStart::Continues if more_segments => {
                                Observation::RolledToNextSegment
                            }
                            // The next segment begins with a bad record: judge it there.
                            NextStart::Bad if below && more_segments => {
                                Observation::RolledToNextSegment
                            }
                            _ if below => {
                                why = format!(
                                    "no record here (zeros or the end of the log) although the \
                                     checkpoint says the log was durable up to {durable_below}"
                                );
                                Observation::MissingBeforeCheckpoint { more_segments }
                            }
                            _ => Observation::CleanTail,
                        }
                    }
                }
                Slot::Invalid { len: None, why: w } => {
                    why = w;
                    if below {
                        Observation::CorruptBeforeCheckpoint
                    } else {
                        Observation::TornRecord
                    }
                }
                Slot::Invalid {
                    len: Some(len),
                    why: w,
                } => {
                    why = w;
                    if below {
                        Observation::CorruptBeforeCheckpoint
                    } else {
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
                }
            };
            match decide(obs, cfg.recovery) {
                Action::NextSegment => {
                    if let Observation::MissingBeforeCheckpoint { .. } = obs {
                        let lost = seg.end().min(durable_below) - pos;
                        report.durable_bytes_lost += lost;
                        log::warn!(
                            "storage: {} at byte {}: {why}; skipping {lost} bytes to the next \
                             segment (recovery = skip-corrupt)",
                            seg.path.display(),
                            pos - seg.base
                        );
                    }
                    idx += 1;
                    pos = segs[idx].base;
                    continue 'segments;
                }
                Action::EndHere => {
                    tail_obs = obs;
                    break 'segments;
                }
                Action::TruncateLog => {
                    match obs {
                        Observation::BeyondLimit => log::warn!(
                            "storage: truncating the log to {pos} as asked (replica resync)"
                        ),
                        Observation::CrcMismatchThenValid { valid_after } => {
                            report.valid_records_discarded = valid_after;
                            log::warn!(
                                "storage: CRC mismatch at log position {pos} (past the durable \
                                 checkpoint {durable_below}) followed by {valid_after} valid \
                                 records; truncating (see recovery.rs for why)"
                            );
                        }
                        Observation::MissingBeforeCheckpoint { .. } => {
                            report.durable_bytes_lost += durable_below - pos;
                            log::warn!(
                                "storage: {} at byte {}: {why}; the log ends here \
                                 (recovery = skip-corrupt)",
                                seg.path.display(),
                                pos - seg.base
                            );
                        }
                        _ => {}
                    }
                    tail_obs = obs;
                    truncate = true;
                    break 'segments;
                }
                Action::RefuseToOpen => {
                    return Err(StorageError::CorruptDurable {
                        path: seg.path.clone(),
                        file_offset: pos - seg.base,
                        position: pos,
                        checkpoint: ckpt.position(),
                        detail: why,
                    });
                }
                Action::Quarantine => {
                    if quarantined_at == Some(pos) {
                        return Err(StorageError::Corrupt {
                            position: pos,
                            detail: "quarantine left no valid record or clean tail here".into(),
                        });
                    }
                    quarantined_at = Some(pos);
                    let q = quarantine(&mut sc, pos, &why, &quarantine_dir).await?;
                    report.quarantined.push(q);
                    // Look at `pos` again: a gap record now, or zeros.
                }
                a => unreachable!("log scan got index action {a:?}"),
            }
        }
    }
    report.tail = Some(tail_obs);
    report.segments = idx as u64 + 1;
    report.end_position = pos;
    let active = segs[idx].clone();

    // The checkpoint must never claim more than the log keeps: lower it before truncating, so a
    // crash in between cannot make the next open take the truncation for corruption.
    if ckpt.position() > record_end {
        ckpt.store(record_end, ckpt.reserved())
            .await
            .map_err(|e| StorageError::io("write checkpoint", &ckpt_path, e))?;
        log::warn!("storage: durable checkpoint lowered to {record_end}");
    }
    if truncate {
        let mut sc = Scanner::bounded(&active, zero_from);
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
        let clean = if i == idx + 1 && clean_spare {
            true
        } else if let Some(&last) = last_nonzero_of.get(&seg.base) {
            last == seg.base
        } else {
            Scanner::bounded(seg, zero_from)
                .last_nonzero(seg.base)
                .await?
                == seg.base
        };
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
        record_end,
        tail,
        spare,
        recyclable,
        checkpoint: Some(ckpt),
        report,
    })
}

/// Where a scan begins when an index snapshot is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanStart {
    /// The snapshot's position (a record boundary at or below the checkpoint).
    pub position: u64,
    /// The snapshot was written by a clean close at the log end.
    pub clean_close: bool,
}

/// How the background check of the records below an index snapshot ended.
#[derive(Debug)]
pub enum ScrubOutcome {
    /// Every record below the snapshot position checked out.
    Clean { records: u64 },
    /// A bad record (or missing bytes) below the durable checkpoint: the same finding that
    /// makes a full scan refuse to open ([`StorageError::CorruptDurable`]).
    Corrupt(StorageError),
    /// Stopped before the end (the store closed).
    Stopped,
}

/// The background check after an open from an index snapshot: reads every record from the
/// first segment up to `to` (the snapshot position, a record boundary), checks each one as
/// the open-time scan would, and hands valid ones to `on_record` (which rebuilds the key
/// index, and returns `false` to stop). Cooperative: yields to the shard's other tasks.
pub(crate) async fn scrub<F: BackendFile>(
    segs: Vec<Rc<Segment<F>>>,
    to: u64,
    checkpoint: u64,
    mut on_record: impl FnMut(&RecordView<'_>) -> bool,
) -> Result<ScrubOutcome, StorageError> {
    let mut records = 0u64;
    for seg in &segs {
        let mut sc = Scanner::new(seg);
        let mut pos = seg.base;
        while pos < to.min(seg.end()) {
            let corrupt = |why: String| {
                Ok(ScrubOutcome::Corrupt(StorageError::CorruptDurable {
                    path: seg.path.clone(),
                    file_offset: pos - seg.base,
                    position: pos,
                    checkpoint,
                    detail: why,
                }))
            };
            match sc.record_at(pos).await? {
                Slot::Valid { len } => {
                    let b = sc.bytes(pos, len as usize).await?;
                    let v = RecordView::parse_at(b, pos).expect("validated");
                    if !on_record(&v) {
                        return Ok(ScrubOutcome::Stopped);
                    }
                    records += 1;
                    pos += len;
                }
                // The writer rolled here: only zeros may follow in this segment.
                Slot::Zero | Slot::End if to >= seg.end() => {
                    if sc.last_nonzero(pos).await? > pos {
                        return corrupt(
                            "zeros followed by non-zero bytes where a record should start".into(),
                        );
                    }
                    break;
                }
                Slot::Zero | Slot::End => {
                    return corrupt(format!(
                        "no record here although the index snapshot says records continue to {to}"
                    ))
                }
                Slot::Invalid { why, .. } => return corrupt(why),
            }
            glommio::yield_if_needed().await;
        }
    }
    Ok(ScrubOutcome::Clean { records })
}

/// How the segment after `idx` begins, seen from a log that has only zeros from `pos` to the
/// end of segment `idx`.
enum NextStart {
    /// No next segment, or it is empty (zeros).
    Nothing,
    /// A valid record that would not have fit at `pos`: the writer rolled there.
    Continues,
    /// A valid record that would have fit at `pos`: something is missing here.
    Fits,
    /// Not a valid record.
    Bad,
}

async fn next_start<F: BackendFile>(
    segs: &[Rc<Segment<F>>],
    idx: usize,
    pos: u64,
    zero_from: u64,
    last_nonzero_of: &mut HashMap<u64, u64>,
) -> Result<NextStart, StorageError> {
    let Some(next) = segs.get(idx + 1) else {
        return Ok(NextStart::Nothing);
    };
    let mut sc = Scanner::bounded(next, zero_from);
    Ok(match sc.record_at(next.base).await? {
        Slot::Valid { len } if pos + len > segs[idx].end() => NextStart::Continues,
        Slot::Valid { .. } => NextStart::Fits,
        Slot::Zero | Slot::End => {
            let last = sc.last_nonzero(next.base).await?;
            last_nonzero_of.insert(next.base, last);
            if last == next.base {
                NextStart::Nothing
            } else {
                NextStart::Bad
            }
        }
        _ => NextStart::Bad,
    })
}

/// Largest gap record written in place of quarantined bytes (a long bad range gets several).
const GAP_RECORD_BYTES_MAX: u64 = 1 << 20;

/// Moves the bad bytes at `pos` aside: copies everything up to the next valid record of the
/// segment (or, when none follows, up to its last non-zero byte) to
/// `<quarantine_dir>/<position>.bin` (fsynced before the log is touched), then writes gap
/// records over that range (or zeros, when nothing valid follows in this segment).
async fn quarantine<F: BackendFile>(
    sc: &mut Scanner<'_, F>,
    pos: u64,
    why: &str,
    quarantine_dir: &Path,
) -> Result<Quarantined, StorageError> {
    let seg = sc.seg;
    let next = sc.next_valid_after(pos).await?;
    let to = match next {
        Some(q) => q,
        None => sc.last_nonzero(pos).await?,
    };
    let mut bytes = Vec::with_capacity((to - pos) as usize);
    seg.file
        .read_into(pos - seg.base, (to - pos) as usize, &mut bytes)
        .await
        .map_err(|e| StorageError::io("read", &seg.path, e))?;
    // The lost record's queue and offsets, if its header survived (only the body was hit).
    let lost = RecordHeader::decode(&bytes).ok().and_then(|h| {
        let topic_end = HEADER_BYTES + usize::from(h.topic_len);
        let topic = std::str::from_utf8(bytes.get(HEADER_BYTES..topic_end)?).ok()?;
        (!topic.is_empty()).then(|| {
            (
                topic.to_string(),
                h.queue_id,
                h.base_queue_offset,
                h.message_count,
            )
        })
    });
    let file = quarantine_dir.join(format!("{pos:020}.bin"));
    write_aside(&file, &bytes).map_err(|e| StorageError::io("write quarantine file", &file, e))?;
    match next {
        Some(q) => {
            let gap =
                gap_records(pos, q - pos, lost.as_ref()).ok_or_else(|| StorageError::Corrupt {
                    position: pos,
                    detail: format!("{} bad bytes are too few for a gap record", q - pos),
                })?;
            overwrite(seg, pos, &gap).await?;
        }
        None => zero_range(seg, pos, to).await?,
    }
    sc.forget();
    log::warn!(
        "storage: QUARANTINED {} bytes of {} at byte {} (log position {pos}; {why}) to {}{}; \
         every valid record after them is kept",
        to - pos,
        seg.path.display(),
        pos - seg.base,
        file.display(),
        lost.as_ref().map_or(String::new(), |(t, q, o, n)| format!(
            "; queue {t}/{q} loses offsets {o}..{}",
            o + u64::from(*n)
        ))
    );
    Ok(Quarantined {
        position: pos,
        bytes: to - pos,
        file,
        lost,
    })
}

/// Gap records covering exactly `len` bytes from `pos`; the first one repeats the lost
/// record's topic and queue fields when given (and when they fit). `None` if `len` is too
/// small for one record header.
fn gap_records(pos: u64, len: u64, lost: Option<&(String, u32, u64, u32)>) -> Option<Vec<u8>> {
    let hdr = HEADER_BYTES as u64;
    if len < hdr {
        return None;
    }
    let mut out = Vec::with_capacity(len as usize);
    let mut at = pos;
    let end = pos + len;
    let mut first = true;
    while at < end {
        let mut n = (end - at).min(GAP_RECORD_BYTES_MAX);
        let rest = end - at - n;
        if rest > 0 && rest < hdr {
            // Leave room for one more header.
            n -= hdr - rest;
        }
        let info = lost.filter(|l| first && hdr + l.0.len() as u64 <= n);
        let mut h = RecordHeader {
            flags: FLAG_GAP,
            log_position: at,
            ..Default::default()
        };
        let topic: &[u8] = match info {
            Some((t, q, o, c)) => {
                h.queue_id = *q;
                h.base_queue_offset = *o;
                h.message_count = *c;
                t.as_bytes()
            }
            None => &[],
        };
        let body = vec![0u8; (n - hdr) as usize - topic.len()];
        out.extend_from_slice(&build_header(h, topic, &body));
        out.extend_from_slice(topic);
        out.extend_from_slice(&body);
        at += n;
        first = false;
    }
    Some(out)
}

/// Copies quarantined bytes to their side file durably (file and directory fsynced): they must
/// be safe before the log is overwritten. Runs once at open, off the data path.
fn write_aside(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `data` into the log at `from` (read-modify-write of the blocks it touches), then
/// fdatasyncs.
async fn overwrite<F: BackendFile>(
    seg: &Segment<F>,
    from: u64,
    data: &[u8],
) -> Result<(), StorageError> {
    let to = from + data.len() as u64;
    let end = align_up(to).min(seg.end());
    let mut at = align_down(from).max(seg.base);
    while at < end {
        let n = (end - at).min(SCAN_WINDOW_BYTES as u64) as usize;
        let mut old = Vec::with_capacity(n);
        seg.file
            .read_into(at - seg.base, n, &mut old)
            .await
            .map_err(|e| StorageError::io("read", &seg.path, e))?;
        let mut buf = seg.file.alloc_buf(n);
        buf.bytes_mut()[..old.len()].copy_from_slice(&old);
        let (lo, hi) = (at.max(from), (at + n as u64).min(to));
        buf.bytes_mut()[(lo - at) as usize..(hi - at) as usize]
            .copy_from_slice(&data[(lo - from) as usize..(hi - from) as usize]);
        seg.file
            .write_at(buf, at - seg.base)
            .await
            .map_err(|e| StorageError::io("write gap record", &seg.path, e))?;
        at += n as u64;
    }
    seg.file
        .sync()
        .await
        .map_err(|e| StorageError::io("fdatasync", &seg.path, e))
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
    fn last_nonzero_in_finds_the_last_non_zero_byte_anywhere() {
        for len in [0usize, 1, 15, 16, 17, 100, 4096] {
            assert_eq!(last_nonzero_in(&vec![0u8; len]), None, "len {len}");
            for at in 0..len {
                let mut b = vec![0u8; len];
                b[at] = 1;
                if at > 3 {
                    b[at - 3] = 7;
                }
                assert_eq!(last_nonzero_in(&b), Some(at), "len {len} at {at}");
            }
        }
    }

    #[test]
    fn gap_records_cover_exactly_the_range_and_parse_as_gaps() {
        let lost = ("orders".to_string(), 3u32, 40u64, 2u32);
        for len in [
            64u64,
            100,
            5000,
            GAP_RECORD_BYTES_MAX + 10,
            3 * GAP_RECORD_BYTES_MAX,
        ] {
            let b = gap_records(1000, len, Some(&lost)).unwrap();
            assert_eq!(b.len() as u64, len);
            let mut at = 0usize;
            let mut first = true;
            while at < b.len() {
                let v = RecordView::parse_at(&b[at..], 1000 + at as u64).unwrap();
                assert!(v.header.is_gap());
                if first && len >= 70 {
                    assert_eq!((v.topic, v.header.base_queue_offset), ("orders", 40));
                }
                first = false;
                at += v.bytes.len();
            }
        }
        assert!(gap_records(0, 63, None).is_none());
    }
}
