//! The per-shard CommitLog: the append/write path and the watermarks.
//!
//! # Write path
//! Records are copied once into the *active chunk*, an aligned buffer (`write_buffer_bytes`)
//! whose first byte is the log position `chunk.base` (block aligned). A chunk is handed off to
//! a spawned write task when it is full (no copy; several such writes are in flight, at most
//! `max_writes_in_flight`), when the flusher needs the bytes on disk (the partial tail block is
//! copied into a fresh chunk and rewritten by the next write as it grows), or when the segment
//! rolls.
//!
//! Two writes that share a block must land in order, or an older image of the tail block could
//! overwrite a newer one: a write that starts in the block where the previous write ended
//! waits for it. Writes of full chunks do not share blocks and run in parallel.
//!
//! # Watermarks (`LogPosition`s, bytes)
//! - `append_pos`: end of the last appended record (in memory).
//! - `written`: every byte below it has been written to its file (completed writes, advanced
//!   only over contiguous completed ranges; an out-of-order completion never skips a hole).
//! - `durable`: every byte below it was written and then covered by a completed fdatasync.
//! - `visible`: `min(durable, visible_cap)`; what readers may see.
//!
//! `append_pos >= written >= durable >= visible` is asserted wherever one of them changes.
//! After a write or fdatasync error the log is *poisoned*: nothing advances any more.
//!
//! # A full disk is not a poison
//! ENOSPC / EDQUOT ([`is_disk_full`]) mean "not now", not "the device lies", so they stop new
//! writes without giving up anything the log holds:
//! - the next segment cannot be prepared (`prepare_blocked`): appends that fit in the active
//!   segment go on; one that needs a roll gets [`StorageError::DiskFull`] at once;
//! - a write of appended bytes hits ENOSPC (`stalled_writes`): its buffer is kept and the write
//!   retried with backoff until it lands (those bytes may be acknowledged already under
//!   ASYNC_FLUSH); meanwhile every new append gets DiskFull, so the unflushed window does not
//!   grow while it cannot drain;
//! - the file system is used above `disk_reject_ratio` (`over_ratio`, read by
//!   [`CommitLog::watch_space`] every second and before a segment is prepared): no segment is
//!   prepared and client appends get DiskFull.
//!
//! The space watch retries a blocked preparation every [`SPACE_CHECK_INTERVAL_MS`], so writes
//! resume by themselves once space is freed. An fdatasync error still poisons, ENOSPC
//! included: after a failed fsync Linux may report the next one clean without the data being
//! on disk, so a retried sync proves nothing.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::format::record::{build_header, RecordHeader, HEADER_BYTES};
use crate::storage::backend::{
    align_down, align_up, BackendFile, IoBuf, StorageBackend, PACED_WRITE_BYTES,
};
use crate::storage::counters::{Counters, FlushCycle};
use crate::storage::error::StorageError;
use crate::storage::recovery::RecoveredLog;
use crate::storage::segment::{recycled_path, segment_path, zeroing_wait, Seg, Segment};
use crate::storage::signal::Signal;
use crate::storage::space::{fs_space, is_disk_full, over_ratio_reason};
use crate::storage::{FlushMode, LogPosition, StorageConfig};

/// How often the space watch reads the file system (one `statvfs`) and retries a segment
/// preparation that the disk refused: the delay before writes resume once space is freed.
pub(crate) const SPACE_CHECK_INTERVAL_MS: u64 = 1000;
/// First and longest wait before a write that hit ENOSPC is issued again.
const WRITE_RETRY_FIRST_MS: u64 = 10;
const WRITE_RETRY_MAX_MS: u64 = 1000;

type BufOf<B> = <<B as StorageBackend>::File as BackendFile>::Buf;

struct Chunk<B: StorageBackend> {
    seg: Seg<B>,
    /// Log position of `buf[0]`; block aligned.
    base: u64,
    buf: BufOf<B>,
    used: usize,
    /// Usable bytes: the buffer size, or less at the end of the segment.
    cap: usize,
}

/// The log's positions and flags, copied out in one borrow (see [`CommitLog::marks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogMarks {
    /// End of the last appended record, or the start of the next segment after a roll.
    pub appended: LogPosition,
    pub written: LogPosition,
    pub durable: LogPosition,
    /// `min(durable, visible_cap)`.
    pub visible: LogPosition,
    /// End of the last appended record (`appended` without a roll's zero padding).
    pub record_end: LogPosition,
    /// A record end at or below `durable`: what the durable checkpoint may claim.
    pub durable_record_end: LogPosition,
    /// Highest position a `wait_durable` caller asked for.
    pub sync_requested: LogPosition,
    pub inflight_writes: usize,
    /// The next segment is prepared.
    pub has_spare: bool,
    pub poisoned: bool,
    pub closing: bool,
    /// Writes waiting for space after ENOSPC (their bytes are kept and retried).
    pub stalled_writes: usize,
}

impl LogMarks {
    /// Poisoned or closing: nothing more will become durable or visible.
    pub fn stopped(&self) -> bool {
        self.poisoned || self.closing
    }
}

/// A one-shot completion flag (waited on through [`CommitLog::changed`]).
type Done = Rc<Cell<bool>>;

struct LogState<B: StorageBackend> {
    segments: BTreeMap<u64, Seg<B>>,
    active: Seg<B>,
    chunk: Option<Chunk<B>>,
    append_pos: u64,
    /// Start of the bytes not yet handed to a write.
    write_from: u64,
    written: u64,
    durable: u64,
    /// End of the last appended record (`append_pos` without a roll's zero padding).
    record_end: u64,
    /// A record end at or below `durable`: what the durable checkpoint may claim.
    durable_record_end: u64,
    visible_cap: Option<u64>,
    /// Completed write ranges above `written` (start -> end).
    completed: BTreeMap<u64, u64>,
    /// Segments with writes completed since the last fdatasync.
    dirty: Vec<Seg<B>>,
    /// The last write if it ended inside a block: (segment base, that block, its completion).
    last_partial: Option<(u64, u64, Done)>,
    inflight_writes: usize,
    poisoned: Option<String>,
    spare: Option<Seg<B>>,
    /// Dropped segments kept for reuse as the next spare (`<base>.recycled` files).
    recyclable: Vec<PathBuf>,
    /// Dropped segments on their way to `recyclable` (renames under way).
    recycling: usize,
    preparing: bool,
    /// Why the next segment cannot be prepared (a full disk, or usage above the reject ratio);
    /// cleared when a preparation succeeds.
    prepare_blocked: Option<String>,
    /// Writes retrying after ENOSPC, and why the last one stalled.
    stalled_writes: usize,
    stall_reason: String,
    /// The last reading of the file system was above `disk_reject_ratio`: the message.
    over_ratio: Option<String>,
    /// Highest position a `wait_durable` caller asked for.
    sync_requested: u64,
    closing: bool,
    counters: Counters,
    /// No write may reach at or past this before a checkpoint slot recording a larger one is
    /// durable (see `checkpoint.rs`, `reserved`): recovery reads only up to it. Raised by the
    /// checkpoint task; 0 until its first reservation after open.
    write_limit: u64,
    /// A write waits for a larger `write_limit`.
    reserve_waiting: bool,
}

impl<B: StorageBackend> LogState<B> {
    fn visible(&self) -> u64 {
        self.durable.min(self.visible_cap.unwrap_or(u64::MAX))
    }

    fn check_watermarks(&self) {
        assert!(
            self.append_pos >= self.written
                && self.written >= self.durable
                && self.durable >= self.visible(),
            "watermarks out of order: append {} written {} durable {} visible {}",
            self.append_pos,
            self.written,
            self.durable,
            self.visible()
        );
    }

    fn poison(&mut self, cause: String) {
        if self.poisoned.is_none() {
            log::error!("storage: poisoning the commit log: {cause}");
            self.poisoned = Some(cause);
        }
    }

    fn poisoned_error(&self) -> Option<StorageError> {
        self.poisoned
            .as_ref()
            .map(|c| StorageError::Poisoned { cause: c.clone() })
    }

    /// Rolls wait until a preparation succeeds; logged once per episode.
    fn block_prepare(&mut self, why: String) {
        if self.prepare_blocked.is_none() {
            log::warn!("storage: disk full: {why}; retrying every {SPACE_CHECK_INTERVAL_MS} ms");
        }
        self.prepare_blocked = Some(why);
    }

    fn stall_write(&mut self, why: String) {
        if self.stalled_writes == 0 {
            log::warn!("storage: disk full: {why}");
        }
        self.stalled_writes += 1;
        self.stall_reason = why;
    }

    fn stall_error(&self) -> Option<StorageError> {
        (self.stalled_writes > 0).then(|| StorageError::DiskFull {
            reason: format!(
                "{}; new writes are refused until the held-back bytes are written",
                self.stall_reason
            ),
        })
    }

    fn set_over_ratio(&mut self, over: Option<String>) {
        match (&self.over_ratio, &over) {
            (None, Some(why)) => log::warn!("storage: refusing produces: {why}"),
            (Some(_), None) => log::info!("storage: disk usage is below disk_reject_ratio again"),
            _ => {}
        }
        self.over_ratio = over;
    }

    /// A chunk's write of `[from, to)` (`phys_len` bytes at `file_pos` of `seg`) ended, inline
    /// or on io_uring: written, so the positions move on, or failed, which poisons the log.
    fn finish_write(
        &mut self,
        from: u64,
        to: u64,
        seg: Seg<B>,
        r: std::io::Result<()>,
        phys_len: usize,
        file_pos: u64,
    ) {
        match r {
            Ok(()) => self.complete(from, to, Some(seg)),
            Err(e) => self.poison(format!(
                "write of {phys_len} bytes at {file_pos} in segment {}: {e}",
                seg.base
            )),
        }
    }

    fn complete(&mut self, from: u64, to: u64, seg: Option<Seg<B>>) {
        self.completed.insert(from, to);
        while let Some(end) = self.completed.remove(&self.written) {
            self.written = end;
        }
        if let Some(seg) = seg {
            if !self.dirty.iter().any(|s| s.base == seg.base) {
                self.dirty.push(seg);
            }
        }
        self.check_watermarks();
    }
}

pub(crate) struct CommitLog<B: StorageBackend> {
    pub backend: B,
    pub dir: PathBuf,
    pub cfg: StorageConfig,
    /// Private to the log: the rest of storage reads it through [`CommitLog::marks`] and
    /// changes it only through the methods below, so every change keeps the watermark order.
    st: RefCell<LogState<B>>,
    /// Written watermark, write completions, spare segment, in-flight count, poison.
    pub changed: Signal,
    /// Durable/visible watermark or poison (append waiters, readers).
    pub durable_changed: Signal,
    /// Work for the flusher (sync requested, bytes pending, closing, poison).
    pub flusher_wake: Signal,
    /// A write waits for the checkpoint task to raise the write limit.
    pub reserve_wanted: Signal,
    /// Test-only fault: this many flush cycles skip their fdatasync but still advance
    /// `durable` (an ack before the sync). Always 0 outside fault-injection tests.
    skip_syncs: Cell<u32>,
}

impl<B: StorageBackend> CommitLog<B> {
    /// A log continuing a recovered one: it ends at `rec.end` in `rec.active`, and `rec.tail`
    /// holds the bytes of the partial block `[align_down(end), end)`.
    pub fn new(backend: B, dir: PathBuf, cfg: StorageConfig, rec: RecoveredLog<B>) -> Rc<Self> {
        let RecoveredLog {
            segments,
            active,
            end,
            record_end,
            tail,
            spare,
            recyclable,
            ..
        } = rec;
        let mut st = LogState {
            segments,
            active: active.clone(),
            chunk: None,
            append_pos: end,
            write_from: end,
            written: end,
            durable: end,
            record_end,
            durable_record_end: record_end,
            visible_cap: None,
            completed: BTreeMap::new(),
            dirty: Vec::new(),
            last_partial: None,
            inflight_writes: 0,
            poisoned: None,
            spare,
            recyclable,
            recycling: 0,
            preparing: false,
            prepare_blocked: None,
            stalled_writes: 0,
            stall_reason: String::new(),
            over_ratio: None,
            sync_requested: end,
            closing: false,
            counters: Counters::default(),
            write_limit: 0,
            reserve_waiting: false,
        };
        let base = align_down(end);
        if base != end {
            let mut chunk = Self::alloc_chunk(&cfg, &active, base);
            chunk.buf.bytes_mut()[..tail.len()].copy_from_slice(&tail);
            chunk.used = (end - base) as usize;
            st.chunk = Some(chunk);
        }
        Rc::new(CommitLog {
            backend,
            dir,
            cfg,
            st: RefCell::new(st),
            changed: Signal::default(),
            durable_changed: Signal::default(),
            flusher_wake: Signal::default(),
            reserve_wanted: Signal::default(),
            skip_syncs: Cell::new(0),
        })
    }

    /// Consumes one injected "skip the fdatasync" fault, if any.
    pub fn take_skipped_sync(&self) -> bool {
        let n = self.skip_syncs.get();
        if n > 0 {
            self.skip_syncs.set(n - 1);
        }
        n > 0
    }

    fn alloc_chunk(cfg: &StorageConfig, seg: &Seg<B>, base: u64) -> Chunk<B> {
        let cap = (cfg.write_buffer_bytes).min(seg.end() - base) as usize;
        Chunk {
            seg: seg.clone(),
            base,
            // Not zeroed: every byte below `used` is copied in, and `hand_off` zeroes the
            // rest of the last block it writes.
            buf: seg.file.alloc_write_buf(cap),
            used: 0,
            cap,
        }
    }

    fn notify_all(&self) {
        self.changed.notify_all();
        self.durable_changed.notify_all();
        self.flusher_wake.notify_all();
    }

    pub fn poison(&self, cause: String) {
        self.st.borrow_mut().poison(cause);
        self.notify_all();
    }

    /// Starts preparing the segment after the active one unless one is ready or under way, or
    /// the file system is above the reject ratio (read now: checked before every preparation).
    /// A preparation the disk refuses blocks rolls until a later call succeeds; it never
    /// poisons the log.
    pub fn ensure_spare(self: &Rc<Self>) {
        let (base, reuse) = {
            let mut st = self.st.borrow_mut();
            if st.spare.is_some() || st.preparing || st.poisoned.is_some() || st.closing {
                return;
            }
            // A recycled segment takes no new space: it is used above the reject ratio too.
            let reuse = st.recyclable.pop();
            if let (None, Ok(space)) = (&reuse, fs_space(&self.dir)) {
                let over = over_ratio_reason(&space, self.cfg.disk_reject_ratio, &self.dir);
                st.set_over_ratio(over.clone());
                if let Some(why) = over {
                    st.block_prepare(format!("no new segment is prepared: {why}"));
                    drop(st);
                    self.notify_all();
                    return;
                }
            }
            st.preparing = true;
            (st.active.end(), reuse)
        };
        let log = self.clone();
        glommio::spawn_local(async move {
            let path = segment_path(&log.dir, base);
            let (started, appended_then) = (Instant::now(), log.st.borrow().append_pos);
            let seg_bytes = log.cfg.segment_bytes;
            let pace = |zeroed: u64| {
                let st = log.st.borrow();
                if st.closing || st.poisoned.is_some() {
                    return None;
                }
                let elapsed = started.elapsed().as_secs_f64().max(0.05);
                let rate = st.append_pos.saturating_sub(appended_then) as f64 / elapsed;
                let room = st.active.end().saturating_sub(st.append_pos);
                Some(zeroing_wait(
                    room,
                    seg_bytes - zeroed,
                    rate,
                    log.cfg.prepare_bytes_per_sec,
                    PACED_WRITE_BYTES as u64,
                ))
            };
            let allocate = log.cfg.segment_prepare.allocates(log.cfg.flush_mode);
            let r = async {
                let prepared = if let Some(from) = &reuse {
                    log.backend.rename(from, &path).await
                } else if allocate {
                    log.backend.create_allocated(&path, seg_bytes).await
                } else {
                    log.backend
                        .create_zeroed_paced(&path, seg_bytes, &pace)
                        .await
                };
                prepared.map_err(|e| ("preparing", e))?;
                log.backend.open(&path).await.map_err(|e| ("opening", e))
            }
            .await;
            let mut retry = false;
            {
                let mut st = log.st.borrow_mut();
                st.preparing = false;
                match r {
                    Ok(file) => {
                        if reuse.is_some() {
                            st.counters.segments_recycled += 1;
                        }
                        if st.prepare_blocked.take().is_some() {
                            log::info!(
                                "storage: segment {} prepared: there is space again, appends \
                                 that need a new segment are taken again",
                                path.display()
                            );
                        }
                        st.spare = Some(Rc::new(Segment {
                            base,
                            bytes: log.cfg.segment_bytes,
                            file,
                            path,
                        }))
                    }
                    // Given up because the log closes: `create_zeroed` removed its `.tmp`.
                    Err((_, e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err((what, e)) if is_disk_full(&e) => {
                        // Nothing of it is left behind (`create_zeroed` removes its partial
                        // file); the space watch tries again.
                        let _ = log.backend.remove(&path);
                        st.block_prepare(format!("{what} segment {} failed: {e}", path.display()));
                    }
                    // A kept segment that cannot be reused is no reason to stop the log:
                    // it goes, and the next preparation makes a new one.
                    Err((what, e)) if reuse.is_some() => {
                        log::warn!(
                            "storage: {what} recycled segment {} as {} failed ({e}); \
                             preparing a new one",
                            reuse
                                .as_ref()
                                .map_or(String::new(), |p| p.display().to_string()),
                            path.display()
                        );
                        if let Some(p) = &reuse {
                            let _ = log.backend.remove(p);
                        }
                        let _ = log.backend.remove(&path);
                        retry = true;
                    }
                    Err((what, e)) => st.poison(format!("{what} segment {}: {e}", path.display())),
                }
            }
            log.notify_all();
            if retry {
                log.ensure_spare();
            }
        })
        .detach();
    }

    /// The space watch: reads the file system every [`SPACE_CHECK_INTERVAL_MS`] (one
    /// `statvfs`, off the append and ack paths, which only read its last verdict), keeps the
    /// reject-ratio verdict current, and retries a segment preparation the disk refused, so
    /// writes resume by themselves once space is freed. Ends when the log stops.
    pub fn watch_space(self: &Rc<Self>) {
        self.check_space();
        self.ensure_spare();
        let log = self.clone();
        glommio::spawn_local(async move {
            let interval = Duration::from_millis(SPACE_CHECK_INTERVAL_MS);
            loop {
                futures_lite::future::or(glommio::timer::sleep(interval), async {
                    log.changed.wait_until(|| log.marks().stopped()).await
                })
                .await;
                if log.marks().stopped() {
                    break;
                }
                log.check_space();
                log.ensure_spare();
            }
        })
        .detach();
    }

    /// One reading of the file system against the reject ratio.
    fn check_space(&self) {
        // No reading (a simulated disk has no file system): no verdict, nothing refused.
        let Ok(space) = fs_space(&self.dir) else {
            return;
        };
        let over = over_ratio_reason(&space, self.cfg.disk_reject_ratio, &self.dir);
        let mut st = self.st.borrow_mut();
        st.set_over_ratio(over);
        // Kept segments are free space in waiting: above the clean ratio it is needed now.
        if space.used_ratio() > self.cfg.disk_clean_ratio && !st.recyclable.is_empty() {
            for p in std::mem::take(&mut st.recyclable) {
                match self.backend.remove(&p) {
                    Ok(()) => log::info!(
                        "storage: removed recycled segment {} (the disk is used above \
                         disk_clean_ratio {})",
                        p.display(),
                        self.cfg.disk_clean_ratio
                    ),
                    Err(e) => log::warn!("storage: removing {}: {e}", p.display()),
                }
            }
        }
    }

    /// Why a client append must be refused now because of the disk, if it must: writes
    /// retrying after ENOSPC, or the file system above the reject ratio. (A segment that
    /// cannot be prepared refuses only the appends that need it, in [`Self::ensure_room`].)
    pub fn disk_refusal(&self) -> Option<StorageError> {
        let st = self.st.borrow();
        st.stall_error().or_else(|| {
            st.over_ratio.as_ref().map(|why| StorageError::DiskFull {
                reason: why.clone(),
            })
        })
    }

    /// Every reason the disk is refusing writes now, for messages (`None`: it is not).
    pub fn disk_full_reason(&self) -> Option<String> {
        let st = self.st.borrow();
        let reasons: Vec<&str> = [
            (st.stalled_writes > 0).then_some(st.stall_reason.as_str()),
            st.prepare_blocked.as_deref(),
            st.over_ratio.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Waits until a record of `total` bytes can be appended synchronously: room in the active
    /// segment (rolling to the spare if needed) and a free write slot. Refused with DiskFull at
    /// once while writes wait for space, or when it needs a segment the disk refused.
    pub async fn ensure_room(self: &Rc<Self>, total: u64) -> Result<(), StorageError> {
        loop {
            {
                let mut st = self.st.borrow_mut();
                if let Some(e) = st.poisoned_error() {
                    return Err(e);
                }
                if st.closing {
                    return Err(StorageError::Closed);
                }
                if let Some(e) = st.stall_error() {
                    return Err(e);
                }
                if st.inflight_writes < self.cfg.max_writes_in_flight {
                    if st.append_pos + total <= st.active.end() {
                        return Ok(());
                    }
                    if st.spare.is_some() {
                        self.roll(&mut st);
                        drop(st);
                        self.ensure_spare();
                        continue;
                    }
                    if let Some(why) = &st.prepare_blocked {
                        return Err(StorageError::DiskFull {
                            reason: format!(
                                "segment {} is full and the next one cannot be prepared: {why}",
                                st.active.base
                            ),
                        });
                    }
                }
            }
            self.ensure_spare();
            self.changed
                .wait_until(|| {
                    let st = self.st.borrow();
                    st.poisoned.is_some()
                        || st.closing
                        || st.stalled_writes > 0
                        || (st.inflight_writes < self.cfg.max_writes_in_flight
                            && (st.append_pos + total <= st.active.end()
                                || st.spare.is_some()
                                || st.prepare_blocked.is_some()))
                })
                .await;
        }
    }

    /// Moves to the spare segment. The rest of the active segment is skipped, and written
    /// with zeros: a recycled segment holds its previous life there, and recovery takes a
    /// sealed segment's end for a roll only when zeros follow its last record. (At most a
    /// record's size: the rest is smaller than the record that did not fit.)
    fn roll(self: &Rc<Self>, st: &mut LogState<B>) {
        let seg_end = st.active.end();
        let has_new_bytes = st.write_from < st.append_pos;
        // The zeros start after the block holding the last record's end: that block is (or
        // was) written whole, zeros after the end included.
        let zeros_from = align_up(st.append_pos).min(seg_end);
        st.append_pos = seg_end;
        match st.chunk.take() {
            // Only when it holds bytes not yet handed to a write: rewriting an already written
            // tail block for nothing would just widen the window a crash can tear.
            Some(chunk) if has_new_bytes => self.hand_off(st, chunk, zeros_from),
            _ => {
                let from = st.write_from;
                st.write_from = zeros_from.max(from);
                if from < st.write_from {
                    st.complete(from, st.write_from, None);
                }
            }
        }
        if st.write_from < seg_end {
            let len = (seg_end - zeros_from) as usize;
            let zeros = Chunk {
                seg: st.active.clone(),
                base: zeros_from,
                buf: st.active.file.alloc_buf(len),
                used: len,
                cap: len,
            };
            self.hand_off(st, zeros, seg_end);
        }
        let next = st.spare.take().expect("roll needs a spare");
        assert_eq!(
            next.base, seg_end,
            "spare segment must follow the active one"
        );
        st.segments.insert(next.base, next.clone());
        st.active = next;
        st.append_pos = seg_end;
        st.write_from = seg_end;
        st.check_watermarks();
        log::debug!("storage: rolled to segment {}", seg_end);
    }

    /// Appends one record synchronously (after [`Self::ensure_room`] in the same task turn).
    /// Returns `(position, end, encoded header)`.
    pub fn append_record(
        self: &Rc<Self>,
        mut header: RecordHeader,
        topic: &[u8],
        body: &[u8],
    ) -> (LogPosition, LogPosition, [u8; HEADER_BYTES]) {
        let mut st = self.st.borrow_mut();
        let total = (HEADER_BYTES + topic.len() + body.len()) as u64;
        let pos = st.append_pos;
        assert!(pos + total <= st.active.end(), "ensure_room not called");
        header.log_position = pos;
        let enc = build_header(header, topic, body);
        self.copy_in(&mut st, &enc);
        self.copy_in(&mut st, topic);
        self.copy_in(&mut st, body);
        drop(st);
        self.finish_append(pos + total);
        (LogPosition(pos), LogPosition(pos + total), enc)
    }

    /// Appends one already-encoded record (a replica copying its master) at the append
    /// position, which the caller has checked is the record's own position. Returns its end.
    pub fn append_encoded(self: &Rc<Self>, record: &[u8]) -> LogPosition {
        let mut st = self.st.borrow_mut();
        let pos = st.append_pos;
        let end = pos + record.len() as u64;
        assert!(end <= st.active.end(), "ensure_room not called");
        self.copy_in(&mut st, record);
        drop(st);
        self.finish_append(end);
        LogPosition(end)
    }

    fn finish_append(self: &Rc<Self>, end: u64) {
        let mut st = self.st.borrow_mut();
        st.append_pos = end;
        st.record_end = end;
        st.counters.appends += 1;
        let unflushed = st.append_pos - st.durable;
        st.counters.unflushed_hwm_bytes = st.counters.unflushed_hwm_bytes.max(unflushed);
        let wake =
            self.cfg.flush_mode == FlushMode::AsyncFlush && unflushed >= self.cfg.flush_bytes;
        drop(st);
        if wake {
            self.flusher_wake.notify_all();
        }
    }

    fn copy_in(self: &Rc<Self>, st: &mut LogState<B>, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if st.chunk.is_none() {
                let at = st.chunk_cursor();
                assert_eq!(at, align_down(at), "a fresh chunk starts on a block");
                st.chunk = Some(Self::alloc_chunk(&self.cfg, &st.active, at));
            }
            let chunk = st.chunk.as_mut().expect("just ensured");
            let n = bytes.len().min(chunk.cap - chunk.used);
            chunk.buf.bytes_mut()[chunk.used..chunk.used + n].copy_from_slice(&bytes[..n]);
            chunk.used += n;
            bytes = &bytes[n..];
            if chunk.used == chunk.cap {
                let chunk = st.chunk.take().expect("present");
                let to = chunk.base + chunk.cap as u64;
                self.hand_off(st, chunk, to);
            }
        }
    }

    /// Hands the dirty part of the active chunk to a write, keeping the partial tail block in a
    /// fresh chunk. Returns the position everything below which will be written.
    ///
    /// `inline`: the write of the tail is tried first as a blocking syscall on this thread
    /// ([`BackendFile::write_blocking`]) when nothing orders it behind another write; it is
    /// complete when this returns. Otherwise (or when that write fails: a full disk is
    /// retried, an error poisons) it goes to a spawned write task as without `inline`.
    pub fn hand_off_partial(self: &Rc<Self>, inline: bool) -> LogPosition {
        let mut st = self.st.borrow_mut();
        let end = st.append_pos;
        if st.write_from >= end {
            return LogPosition(end);
        }
        let chunk = st.chunk.take().expect("dirty bytes live in a chunk");
        let tail_base = align_down(end);
        let tail_len = (end - tail_base) as usize;
        if tail_len > 0 && tail_base < chunk.seg.end() {
            let mut fresh = Self::alloc_chunk(&self.cfg, &chunk.seg, tail_base);
            let from = (tail_base - chunk.base) as usize;
            fresh.buf.bytes_mut()[..tail_len]
                .copy_from_slice(&chunk.buf.bytes()[from..from + tail_len]);
            fresh.used = tail_len;
            st.chunk = Some(fresh);
        }
        self.hand_off_with(&mut st, chunk, end, inline);
        LogPosition(end)
    }

    /// Spawns the write of `chunk`, which covers the log range `[write_from, to)`.
    fn hand_off(self: &Rc<Self>, st: &mut LogState<B>, chunk: Chunk<B>, to: u64) {
        self.hand_off_with(st, chunk, to, false)
    }

    fn hand_off_with(
        self: &Rc<Self>,
        st: &mut LogState<B>,
        mut chunk: Chunk<B>,
        to: u64,
        inline: bool,
    ) {
        let from = st.write_from;
        st.write_from = to;
        let phys_len = align_up(chunk.used as u64) as usize;
        // A partial last block ends in zeros on disk (recovery's zero-tail rule).
        chunk.buf.bytes_mut()[chunk.used..phys_len].fill(0);
        chunk.buf.trim(phys_len);
        let seg = chunk.seg.clone();
        let file_pos = chunk.base - seg.base;
        let wait_for = match st.last_partial.take() {
            Some((seg_base, block, done)) if seg_base == seg.base && block == chunk.base => {
                Some(done)
            }
            _ => None,
        };
        let done: Done = Rc::new(Cell::new(false));
        if chunk.used as u64 % crate::storage::backend::BLOCK_BYTES != 0 {
            st.last_partial = Some((
                seg.base,
                chunk.base + align_down(chunk.used as u64),
                done.clone(),
            ));
        }
        st.counters.writes += 1;
        st.counters.written_bytes += phys_len as u64;
        let buf = chunk.buf;
        let write_end = seg.base + file_pos + phys_len as u64;
        let ordered = wait_for.as_ref().map_or(true, |prev| prev.get());
        if inline && ordered && st.write_limit >= write_end && st.poisoned.is_none() {
            match seg.file.write_blocking(&buf, file_pos) {
                // A full disk: the spawned write below keeps the bytes and retries them.
                Err(e) if is_disk_full(&e) => {}
                r => {
                    st.finish_write(from, to, seg, r, phys_len, file_pos);
                    done.set(true);
                    self.notify_all();
                    return;
                }
            }
        }
        st.inflight_writes += 1;
        let log = self.clone();
        glommio::spawn_local(async move {
            // glommio may poll a new task right away, while our caller still holds `st`.
            futures_lite::future::yield_now().await;
            if let Some(prev) = wait_for {
                log.changed.wait_until(|| prev.get()).await;
            }
            if log.st.borrow().write_limit < write_end {
                log.st.borrow_mut().reserve_waiting = true;
                log.reserve_wanted.notify_all();
                log.changed
                    .wait_until(|| {
                        let st = log.st.borrow();
                        st.write_limit >= write_end || st.poisoned.is_some()
                    })
                    .await;
            }
            // Shared, so that a write refused for space can be issued again with the same
            // bytes: they may be acknowledged already (ASYNC_FLUSH) and exist nowhere else.
            let buf = Rc::new(buf);
            let mut stalled = false;
            let mut backoff = Duration::from_millis(WRITE_RETRY_FIRST_MS);
            let r = loop {
                if log.st.borrow().poisoned.is_some() {
                    break Err(std::io::Error::other("log already poisoned"));
                }
                match seg.file.write_shared(buf.clone(), file_pos).await {
                    Err(e) if is_disk_full(&e) => {
                        let why = format!(
                            "a write of {phys_len} bytes at {file_pos} in segment {} is \
                             refused by the disk ({e}); the bytes are kept and the write \
                             retried until space is freed",
                            seg.base
                        );
                        if !stalled {
                            stalled = true;
                            log.st.borrow_mut().stall_write(why);
                            log.notify_all();
                        }
                        glommio::timer::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(WRITE_RETRY_MAX_MS));
                    }
                    r => break r,
                }
            };
            drop(buf);
            {
                let mut st = log.st.borrow_mut();
                st.inflight_writes -= 1;
                if stalled {
                    st.stalled_writes -= 1;
                    if r.is_ok() {
                        log::info!(
                            "storage: a write held back by the full disk landed at {file_pos} \
                             in segment {}",
                            seg.base
                        );
                    }
                }
                st.finish_write(from, to, seg, r, phys_len, file_pos);
            }
            done.set(true);
            log.notify_all();
        })
        .detach();
    }

    /// Takes the segments to fdatasync so that everything below the returned position is
    /// durable once their syncs complete.
    pub fn take_dirty(&self) -> (Vec<Seg<B>>, LogPosition) {
        let mut st = self.st.borrow_mut();
        (std::mem::take(&mut st.dirty), LogPosition(st.written))
    }

    /// `record_end` is a record end at or below `upto` (the checkpoint may claim it).
    pub fn set_durable(&self, upto: LogPosition, record_end: LogPosition) {
        let (upto, record_end) = (upto.0, record_end.0);
        let mut st = self.st.borrow_mut();
        assert!(
            upto <= st.written,
            "durable {upto} beyond written {}",
            st.written
        );
        assert!(
            record_end <= upto,
            "record end {record_end} beyond durable {upto}"
        );
        if upto > st.durable {
            st.durable = upto;
        }
        st.durable_record_end = st.durable_record_end.max(record_end);
        st.check_watermarks();
        drop(st);
        self.durable_changed.notify_all();
    }

    /// Reads `len` bytes at log position `pos` (must lie in one segment), in the backend's
    /// read buffer.
    pub async fn read_range(
        &self,
        pos: LogPosition,
        len: u32,
    ) -> Result<<B::File as BackendFile>::ReadBuf, StorageError> {
        let pos = pos.0;
        let seg = {
            let st = self.st.borrow();
            st.segments
                .range(..=pos)
                .next_back()
                .map(|(_, s)| s.clone())
        };
        let Some(seg) = seg.filter(|s| pos + u64::from(len) <= s.end()) else {
            return Err(StorageError::Corrupt {
                position: pos,
                detail: format!("{len} bytes at {pos} are not inside a segment"),
            });
        };
        let out = seg
            .file
            .read_buf(pos - seg.base, len as usize)
            .await
            .map_err(|e| StorageError::io("read", seg.path.clone(), e))?;
        if out.len() != len as usize {
            return Err(StorageError::Corrupt {
                position: pos,
                detail: format!("short read: {} of {len} bytes", out.len()),
            });
        }
        Ok(out)
    }
}

impl<B: StorageBackend> LogState<B> {
    fn has_spare(&self) -> bool {
        self.spare.is_some()
    }

    /// Where the next byte goes when there is no chunk.
    fn chunk_cursor(&self) -> u64 {
        self.append_pos.max(self.write_from)
    }
}

/// The narrow API the rest of storage uses instead of borrowing the state.
impl<B: StorageBackend> CommitLog<B> {
    /// The positions and flags now.
    pub fn marks(&self) -> LogMarks {
        let st = self.st.borrow();
        LogMarks {
            appended: LogPosition(st.append_pos),
            written: LogPosition(st.written),
            durable: LogPosition(st.durable),
            visible: LogPosition(st.visible()),
            record_end: LogPosition(st.record_end),
            durable_record_end: LogPosition(st.durable_record_end),
            sync_requested: LogPosition(st.sync_requested),
            inflight_writes: st.inflight_writes,
            has_spare: st.has_spare(),
            poisoned: st.poisoned.is_some(),
            closing: st.closing,
            stalled_writes: st.stalled_writes,
        }
    }

    /// Whether the checkpoint task should record a larger write limit now: a write waits for
    /// one, or appends came within `margin` of it.
    pub fn wants_reservation(&self, margin: u64) -> bool {
        let st = self.st.borrow();
        st.reserve_waiting || st.append_pos.saturating_add(margin) > st.write_limit
    }

    /// Raises the write limit, after a checkpoint slot recording it is durable.
    pub fn set_write_limit(&self, limit: u64) {
        {
            let mut st = self.st.borrow_mut();
            st.write_limit = st.write_limit.max(limit);
            st.reserve_waiting = false;
        }
        self.changed.notify_all();
    }

    /// The error every operation returns once the log is poisoned.
    pub fn poisoned_error(&self) -> Option<StorageError> {
        self.st.borrow().poisoned_error()
    }

    pub fn counters(&self) -> Counters {
        self.st.borrow().counters
    }

    /// Counts a completed flush cycle.
    pub fn note_flush_cycle(&self, cycle: FlushCycle) {
        self.st.borrow_mut().counters.note_flush_cycle(cycle);
    }

    /// Asks the flusher for durability up to `end` (capped at the append position). Returns
    /// the position to wait for, `None` when it is durable already, or the poison error.
    pub fn request_sync(&self, end: LogPosition) -> Result<Option<LogPosition>, StorageError> {
        let end = end.0;
        let mut st = self.st.borrow_mut();
        if st.durable >= end {
            return Ok(None);
        }
        if let Some(e) = st.poisoned_error() {
            return Err(e);
        }
        let target = end.min(st.append_pos);
        if st.durable >= target {
            return Ok(None);
        }
        st.sync_requested = st.sync_requested.max(target);
        Ok(Some(LogPosition(target)))
    }

    /// Caps the visible watermark (`None`: visible = durable).
    pub fn set_visible_cap(&self, cap: Option<LogPosition>) {
        self.st.borrow_mut().visible_cap = cap.map(|c| c.0);
    }

    /// At close, waits for the flusher to end (everything written and synced). If writes stay
    /// held back by a full disk for `flush_timeout_ms`, gives up on them: under SYNC_FLUSH
    /// none of those bytes was acknowledged (an ack waits for durability), so the close is
    /// clean (`Ok(false)`: do not wait for the held-back writes); under ASYNC_FLUSH they were,
    /// and DiskFull says how many bytes are lost. `Ok(true)`: the flusher ended normally.
    pub async fn join_flusher(
        &self,
        flusher: Option<glommio::task::JoinHandle<()>>,
    ) -> Result<bool, StorageError> {
        let Some(flusher) = flusher else {
            return Ok(true);
        };
        let wait = Duration::from_millis(self.cfg.flush_timeout_ms);
        let gave_up = futures_lite::future::or(
            async {
                flusher.await;
                false
            },
            async {
                loop {
                    self.changed
                        .wait_until(|| self.marks().stalled_writes > 0)
                        .await;
                    glommio::timer::sleep(wait).await;
                    if self.marks().stalled_writes > 0 {
                        return true;
                    }
                }
            },
        )
        .await;
        if !gave_up {
            return Ok(true);
        }
        let m = self.marks();
        let held = m.appended.bytes_since(m.durable);
        let why = self.st.borrow().stall_reason.clone();
        if self.cfg.flush_mode == FlushMode::SyncFlush {
            log::warn!(
                "storage: closing with {held} appended bytes the full disk did not take within \
                 {} ms ({why}); none was acknowledged (SYNC_FLUSH acks only durable bytes)",
                self.cfg.flush_timeout_ms
            );
            Ok(false)
        } else {
            Err(StorageError::DiskFull {
                reason: format!(
                    "closing with {held} bytes acknowledged under ASYNC_FLUSH that the full disk \
                     did not take within {} ms: {why}",
                    self.cfg.flush_timeout_ms
                ),
            })
        }
    }

    /// Stops appends; the flusher flushes what is left and ends.
    pub fn begin_close(&self) {
        self.st.borrow_mut().closing = true;
        // Every task waiting on the log re-checks: the checkpoint task ends on it.
        self.notify_all();
    }

    /// Resolves once no segment is being prepared (a closing log's preparation gives up at
    /// its next paced write and removes its `.tmp`).
    pub async fn wait_no_preparation(&self) {
        self.changed
            .wait_until(|| !self.st.borrow().preparing)
            .await;
    }

    /// Test-only fault: the next `n` flush cycles skip their fdatasync.
    pub fn inject_skipped_syncs(&self, n: u32) {
        self.skip_syncs.set(n);
    }

    /// `(base, end)` of the segment holding log position `pos`, if any.
    pub fn segment_of(&self, pos: LogPosition) -> Option<(LogPosition, LogPosition)> {
        let st = self.st.borrow();
        let (_, seg) = st.segments.range(..=pos.0).next_back()?;
        Some((LogPosition(seg.base), LogPosition(seg.end())))
    }

    /// Base of the oldest segment still kept (0 for an empty log).
    pub fn first_segment_base(&self) -> LogPosition {
        LogPosition(
            self.st
                .borrow()
                .segments
                .keys()
                .next()
                .copied()
                .unwrap_or(0),
        )
    }

    /// The segments that end at or below `position`, never the active one.
    pub fn sealed_segments_before(&self, position: LogPosition) -> Vec<Seg<B>> {
        let st = self.st.borrow();
        st.segments
            .values()
            .filter(|s| s.end() <= position.0 && s.base < st.active.base)
            .cloned()
            .collect()
    }

    /// Forgets a segment whose file was removed.
    pub fn forget_segment(&self, base: u64) {
        self.st.borrow_mut().segments.remove(&base);
    }

    /// Keeps a dropped (already forgotten) segment to be reused as a later spare, if it can
    /// be: `recycle_segments` not reached, the file system not above `disk_clean_ratio`, the
    /// segment of today's size, and nothing else holding it (`seg` is the last reference: no
    /// read or write of it is under way, none can start, and no fdatasync of it is pending).
    /// Returns it when it cannot be kept (the caller removes the file). The rename runs in the
    /// background; until it is durable the file still has its segment name, and an open after
    /// a crash finds it as the log's first segment again (retention then drops it again).
    pub fn recycle(self: &Rc<Self>, seg: Seg<B>) -> Option<Seg<B>> {
        {
            let mut st = self.st.borrow_mut();
            let room = (st.recyclable.len() + st.recycling) < self.cfg.recycle_segments as usize;
            let alone = Rc::strong_count(&seg) == 1;
            // Unreadable usage does not stop it (as it does not stop a preparation).
            let roomy_disk =
                fs_space(&self.dir).map_or(true, |s| s.used_ratio() <= self.cfg.disk_clean_ratio);
            let stopped = st.closing || st.poisoned.is_some();
            if !room || !alone || !roomy_disk || stopped || seg.bytes != self.cfg.segment_bytes {
                return Some(seg);
            }
            st.recycling += 1;
        }
        let (from, base) = (seg.path.clone(), seg.base);
        drop(seg);
        let to = recycled_path(&self.dir, base);
        let log = self.clone();
        glommio::spawn_local(async move {
            let r = log.backend.rename(&from, &to).await;
            let mut st = log.st.borrow_mut();
            st.recycling -= 1;
            match r {
                Ok(()) => st.recyclable.push(to),
                Err(e) => {
                    log::warn!(
                        "storage: keeping dropped segment {} for reuse failed ({e}); removed",
                        from.display()
                    );
                    let _ = log.backend.remove(&from);
                }
            }
        })
        .detach();
        None
    }
}
