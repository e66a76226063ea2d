//! `ShardStore`: one shard's storage — the CommitLog, its flusher, the consume queues, the key
//! index and the idempotent-producer table — behind the API the server calls. Everything runs
//! inside one glommio executor; state is `Rc<RefCell<_>>` and no borrow is held across `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::format::record::{RecordHeader, RecordView, FLAG_IDEMPOTENT, HEADER_BYTES};
use crate::storage::append_order::AppendOrder;
use crate::storage::backend::{align_up, DmaBackend, StorageBackend};
use crate::storage::checkpoint::{
    Checkpoint, CHECKPOINT_FILE, CHECKPOINT_INTERVAL_MS, WRITE_RESERVATION_BYTES,
};
use crate::storage::commitlog::CommitLog;
use crate::storage::error::StorageError;
use crate::storage::flush::run_flusher;
use crate::storage::index::consume_queue::{cq_path, read_cq_file, rewrite_cq_file, CqEntry};
use crate::storage::index::producer::SeqCheck;
use crate::storage::index::snapshot::{
    read_snapshot, remove_snapshot, write_snapshot, IndexSnapshot, SNAPSHOT_FILE,
};
use crate::storage::index::Indexes;
use crate::storage::recovery::{
    decide, open_log, recover_log, scrub, Action, Observation, OpenedLog, RecoveryReport,
    ScanStart, ScrubOutcome,
};
use crate::storage::segment::{create_segment, parse_segment_name, segment_path, Segment};
use crate::storage::signal::Signal;
use crate::storage::space::is_disk_full;
use crate::storage::tail_feed::TailFeed;
use crate::storage::{
    AppendRequest, Appended, FetchVerify, LogPosition, QueueOffset, QueueStats, ReadBatch,
    RecoveryMode, StorageConfig, StorageMetrics, Watermarks,
};

pub(super) struct Inner<B: StorageBackend> {
    pub(super) log: Rc<CommitLog<B>>,
    dir: PathBuf,
    pub(super) idx: RefCell<Indexes>,
    flusher: RefCell<Option<glommio::task::JoinHandle<()>>>,
    checkpoint: Rc<Checkpoint<B::File>>,
    checkpointer: RefCell<Option<glommio::task::JoinHandle<()>>>,
    /// Set by `close` once the flusher is done: the checkpoint task ends.
    checkpointer_stop: Rc<Cell<bool>>,
    checkpoints: Rc<Cell<u64>>,
    /// Records quarantined at open.
    quarantined: u64,
    /// The index snapshot (see `index/snapshot.rs`): position of the last one written, when,
    /// whether one is being written, and whether writing is off (corruption was found).
    snapshot: Cell<SnapshotState>,
    /// Whether [`ShardStore::fetch`] checks CRCs once the whole log has been checked.
    fetch_verify: FetchVerify,
    /// The background check of the records an open from a snapshot did not scan.
    check: RefCell<BackgroundCheck>,
    /// Recently appended records kept in memory for a replication stream (see `stream.rs`).
    pub(super) feed: RefCell<TailFeed>,
    /// Notified after every append.
    pub(super) appended: Signal,
    /// Told the end of every append (see [`ShardStore::set_append_hook`]).
    append_hook: RefCell<Option<AppendHook>>,
    /// Appends in arrival order (see `AppendOrder`: producer sequences depend on it).
    order: AppendOrder,
}

/// The commit log's directory inside a shard's directory.
pub const COMMITLOG_DIR: &str = "commitlog";

/// Called with the log end after each append, on the shard's thread, before the append
/// returns.
pub type AppendHook = Rc<dyn Fn(LogPosition)>;

/// One shard's storage. Cheap to clone (an `Rc` inside); not `Send`.
pub struct ShardStore<B: StorageBackend = DmaBackend> {
    pub(super) inner: Rc<Inner<B>>,
}

impl<B: StorageBackend> Clone for ShardStore<B> {
    fn clone(&self) -> Self {
        ShardStore {
            inner: self.inner.clone(),
        }
    }
}

impl ShardStore<DmaBackend> {
    /// Opens (recovering) the shard's storage in `dir` on real O_DIRECT files.
    pub async fn open(
        dir: &Path,
        cfg: StorageConfig,
    ) -> Result<(ShardStore<DmaBackend>, RecoveryReport), StorageError> {
        crate::storage::probe::prime_dma_probe(dir).await?;
        Self::open_with(DmaBackend, dir, cfg).await
    }

    /// Like [`Self::open`], but first truncates the log to `limit` (a record boundary): what a
    /// replica does when its history diverged from its master's there. Everything derived
    /// from the log is rebuilt from what is kept.
    pub async fn open_truncated(
        dir: &Path,
        cfg: StorageConfig,
        limit: LogPosition,
    ) -> Result<(ShardStore<DmaBackend>, RecoveryReport), StorageError> {
        crate::storage::probe::prime_dma_probe(dir).await?;
        Self::open_limited(DmaBackend, dir, cfg, Some(limit.0)).await
    }

    /// Drops the whole log and everything derived from it, then opens an empty log whose
    /// first segment starts at `base` (a segment boundary): what a replica does when its
    /// master keeps nothing of what the replica's log shares with it (the master's retention
    /// deleted its segments below `base`). The checkpoint goes first, then the segments newest
    /// first, so a crash part-way leaves an empty log or a prefix of the old one, never a
    /// checkpoint that claims more than the log holds; the next handshake resets again.
    pub async fn open_reset(
        dir: &Path,
        cfg: StorageConfig,
        base: LogPosition,
    ) -> Result<(ShardStore<DmaBackend>, RecoveryReport), StorageError> {
        crate::storage::probe::prime_dma_probe(dir).await?;
        if base.0 % cfg.segment_bytes != 0 {
            return Err(StorageError::InvalidArgument(format!(
                "a log can only start at a segment boundary (a multiple of {}), not at {}",
                cfg.segment_bytes, base.0
            )));
        }
        let backend = DmaBackend;
        remove_snapshot(dir)
            .map_err(|e| StorageError::io("remove index snapshot", dir.join(SNAPSHOT_FILE), e))?;
        let cq_dir = dir.join("consumequeue");
        match std::fs::remove_dir_all(&cq_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("remove consume queues", &cq_dir, e)),
        }
        let log_dir = dir.join(COMMITLOG_DIR);
        backend
            .create_dir_all(&log_dir)
            .map_err(|e| StorageError::io("create dir", &log_dir, e))?;
        let ckpt = log_dir.join(CHECKPOINT_FILE);
        if ckpt.exists() {
            backend
                .remove(&ckpt)
                .map_err(|e| StorageError::io("remove checkpoint", &ckpt, e))?;
        }
        let names = backend
            .list(&log_dir)
            .map_err(|e| StorageError::io("list", &log_dir, e))?;
        let mut bases: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        bases.sort_unstable_by(|a, b| b.cmp(a));
        for b in bases {
            let p = segment_path(&log_dir, b);
            backend
                .remove(&p)
                .map_err(|e| StorageError::io("remove segment", &p, e))?;
        }
        let p = segment_path(&log_dir, base.0);
        create_segment(&backend, &p, &cfg)
            .await
            .map_err(|e| StorageError::io("prepare segment", &p, e))?;
        Self::open_limited(backend, dir, cfg, None).await
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The protocol's one topic-name rule (a topic name is a directory name under `consumequeue/`).
fn validate_topic(topic: &str) -> Result<(), StorageError> {
    crate::protocol::validate_topic_name(topic)
        .map_err(|reason| StorageError::InvalidArgument(format!("topic {topic:?}: {reason}")))
}

impl<B: StorageBackend> ShardStore<B> {
    /// Opens the storage in `dir` on `backend`: recovery (see `recovery.rs`), index
    /// reconciliation, then the flusher starts. The commit log lives in `<dir>/commitlog`.
    pub async fn open_with(
        backend: B,
        dir: &Path,
        cfg: StorageConfig,
    ) -> Result<(ShardStore<B>, RecoveryReport), StorageError> {
        Self::open_limited(backend, dir, cfg, None).await
    }

    /// [`Self::open_with`], truncating the log to `limit` when given.
    pub async fn open_limited(
        backend: B,
        dir: &Path,
        cfg: StorageConfig,
        limit: Option<u64>,
    ) -> Result<(ShardStore<B>, RecoveryReport), StorageError> {
        cfg.validate()?;
        let log_dir = dir.join(COMMITLOG_DIR);
        let t0 = Instant::now();
        let opened = open_log(&backend, &log_dir, &cfg).await?;
        // A snapshot is only trusted by a strict open that truncates nothing on request; any
        // other open may change the log below it, so it is removed first.
        let restored =
            if cfg.index_snapshot && cfg.recovery == RecoveryMode::Strict && limit.is_none() {
                restore_snapshot(dir, &opened)
            } else {
                None
            };
        if restored.is_none() {
            remove_snapshot(dir).map_err(|e| {
                StorageError::io("remove index snapshot", dir.join(SNAPSHOT_FILE), e)
            })?;
        }
        let (mut idx, queue_files, start) = match restored {
            Some((idx, files, start)) => (idx, files, Some(start)),
            None => (Indexes::default(), HashMap::new(), None),
        };
        let first_segment = opened.start();
        let t_restored = t0.elapsed();
        let rec = recover_log(&backend, &log_dir, opened, &cfg, limit, start, |v| {
            idx.apply(v.topic, &v.header, v.body)
        })
        .await?;
        let mut rec = rec;
        let mut report = std::mem::take(&mut rec.report);
        report.from_snapshot = start.is_some();
        let checkpoint = Rc::new(
            rec.checkpoint
                .take()
                .expect("recovery opens the checkpoint"),
        );
        let t_scanned = t0.elapsed();
        reconcile_index_files(dir, first_segment, &mut idx, &mut report, queue_files)?;
        let t_reconciled = t0.elapsed();
        report.producers = idx.producers.len() as u64;
        // Records below the snapshot were not scanned: the background check reads them.
        let unchecked: Vec<_> = match start.map(|s| s.position) {
            Some(p) if p > first_segment => rec
                .segments
                .values()
                .filter(|s| s.base < p)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let fetch_verify = cfg.fetch_verify;
        let log = CommitLog::new(backend, log_dir, cfg, rec);
        log.watch_space();
        let checkpoints = Rc::new(Cell::new(0));
        let inner = Rc::new(Inner {
            log: log.clone(),
            dir: dir.to_path_buf(),
            idx: RefCell::new(idx),
            flusher: RefCell::new(None),
            checkpoint,
            checkpointer: RefCell::new(None),
            checkpointer_stop: Rc::new(Cell::new(false)),
            checkpoints,
            quarantined: report.quarantined.len() as u64,
            snapshot: Cell::new(SnapshotState::default()),
            fetch_verify,
            check: RefCell::new(if unchecked.is_empty() {
                BackgroundCheck::NotNeeded
            } else {
                BackgroundCheck::Running
            }),
            feed: RefCell::new(TailFeed::default()),
            append_hook: RefCell::new(None),
            appended: Signal::default(),
            order: AppendOrder::default(),
        });
        let handle = glommio::spawn_local(run_flusher(log.clone())).detach();
        *inner.flusher.borrow_mut() = Some(handle);
        let weak: Weak<Inner<B>> = Rc::downgrade(&inner);
        let checkpointer = glommio::spawn_local(run_checkpointer(
            log,
            inner.checkpoint.clone(),
            inner.checkpoints.clone(),
            inner.checkpointer_stop.clone(),
            {
                let weak = weak.clone();
                move |durable| {
                    if let Some(inner) = weak.upgrade() {
                        inner.persist_indexes(durable);
                    }
                }
            },
            {
                let weak = weak.clone();
                move |position| {
                    if let Some(inner) = weak.upgrade() {
                        inner.snapshot_in_background(position);
                    }
                }
            },
        ))
        .detach();
        *inner.checkpointer.borrow_mut() = Some(checkpointer);
        // A snapshot of the state just recovered, so that a crash before the next checkpoint
        // does not cost a full scan either.
        // It also replaces a clean close's snapshot before anything is written: that one lets
        // the next open skip reading past the log end, which only a clean close may.
        if !inner
            .write_snapshot(inner.checkpoint.position(), false)
            .await
        {
            remove_snapshot(dir).map_err(|e| {
                StorageError::io("remove index snapshot", dir.join(SNAPSHOT_FILE), e)
            })?;
        }
        let cfg = &inner.log.cfg;
        if cfg.retention_hours > 0 || cfg.retention_bytes > 0 || cfg.force_clean {
            let weak = Rc::downgrade(&inner);
            glommio::spawn_local_into(run_retention(weak), background_queue())
                .map_err(|e| {
                    StorageError::io(
                        "spawn the retention task",
                        dir,
                        std::io::Error::other(e.to_string()),
                    )
                })?
                .detach();
        }
        if let Some(p) = start.map(|s| s.position).filter(|_| !unchecked.is_empty()) {
            glommio::spawn_local_into(
                run_background_check(weak, unchecked, p, inner.checkpoint.position()),
                background_queue(),
            )
            .map_err(|e| {
                StorageError::io(
                    "spawn the background check",
                    dir,
                    std::io::Error::other(e.to_string()),
                )
            })?
            .detach();
        }
        log::info!(
            "storage: opened {} in {:.0} ms (snapshot {:.0}, scan {:.0}, index files {:.0}): {report}",
            dir.display(),
            t0.elapsed().as_secs_f64() * 1e3,
            t_restored.as_secs_f64() * 1e3,
            (t_scanned - t_restored).as_secs_f64() * 1e3,
            (t_reconciled - t_scanned).as_secs_f64() * 1e3,
        );
        Ok((ShardStore { inner }, report))
    }

    /// Copies the record into the log buffer and assigns queue offsets. Does NOT wait for
    /// durability (see [`Self::wait_durable`]).
    pub async fn append(&self, req: AppendRequest<'_>) -> Result<Appended, StorageError> {
        validate_topic(req.topic)?;
        if req.message_count == 0 {
            return Err(StorageError::InvalidArgument("message_count is 0".into()));
        }
        let log = &self.inner.log;
        let total = (HEADER_BYTES + req.topic.len() + req.body.len()) as u64;
        let max = log.cfg.max_record_bytes.min(log.cfg.segment_bytes);
        if total > max {
            return Err(StorageError::RecordTooLarge { size: total, max });
        }
        let _turn = self.inner.order.turn().await;
        // Before the producer-sequence check: while the disk refuses writes, every batch of a
        // pipelined producer hears DISK_FULL, not a gap behind the first refused one.
        if let Some(e) = log.disk_refusal() {
            return Err(e);
        }
        log.ensure_room(total).await?;
        // From here on no await: offsets and the log position are assigned together.
        let mut idx = self.inner.idx.borrow_mut();
        let q = idx.queue_mut(req.topic, req.queue_id);
        let (uid, base_offset) = (q.uid, q.next_offset);
        if let Some(p) = &req.producer {
            match idx.producers.check(
                p.producer_id,
                uid,
                p.epoch,
                p.base_sequence,
                req.message_count,
            )? {
                SeqCheck::Duplicate(m) => {
                    return Ok(Appended {
                        base_offset: QueueOffset(m.base_offset),
                        count: m.count,
                        position: LogPosition(m.position),
                        end: LogPosition(m.end),
                        duplicate: true,
                    })
                }
                SeqCheck::Accept => {}
            }
        }
        let mut h = RecordHeader {
            queue_id: req.queue_id,
            base_queue_offset: base_offset,
            message_count: req.message_count,
            store_timestamp_ms: now_ms(),
            ..Default::default()
        };
        if let Some(p) = &req.producer {
            h.flags |= FLAG_IDEMPOTENT;
            h.producer_id = p.producer_id;
            h.producer_epoch = p.epoch;
            h.base_sequence = p.base_sequence;
        }
        let (pos, end, enc) = log.append_record(h, req.topic.as_bytes(), req.body);
        self.inner
            .feed
            .borrow_mut()
            .push(pos.0, &[&enc, req.topic.as_bytes(), req.body]);
        self.inner.appended.notify_all();
        // Cloned first: the hook may read the store.
        let hook = self.inner.append_hook.borrow().clone();
        if let Some(hook) = hook {
            hook(end);
        }
        h.log_position = pos.0;
        h.total_len = total as u32;
        h.topic_len = req.topic.len() as u16;
        idx.apply(req.topic, &h, req.body);
        Ok(Appended {
            base_offset: QueueOffset(base_offset),
            count: req.message_count,
            position: pos,
            end,
            duplicate: false,
        })
    }

    /// Resolves once everything below `end` is durable: written, then covered by a completed
    /// fdatasync. Cancel-safe: dropping it only drops the wait.
    pub async fn wait_durable(&self, end: LogPosition) -> Result<(), StorageError> {
        let log = &self.inner.log;
        let Some(target) = log.request_sync(end)? else {
            return Ok(());
        };
        log.flusher_wake.notify_all();
        log.durable_changed
            .wait_until(|| {
                let m = log.marks();
                m.durable >= target || m.poisoned
            })
            .await;
        if log.marks().durable >= target {
            Ok(())
        } else {
            Err(log.poisoned_error().unwrap_or(StorageError::Closed))
        }
    }

    /// Whole records starting at the one containing `offset`, up to `max_bytes` (at least one
    /// record), never past the visible watermark. `offset == end` gives an empty batch. Every
    /// record's CRC is checked: for readers that copy records on (retries, transactions).
    pub async fn read(
        &self,
        topic: &str,
        queue_id: u32,
        offset: QueueOffset,
        max_bytes: u32,
    ) -> Result<ReadBatch, StorageError> {
        self.read_checked(topic, queue_id, offset, max_bytes, true)
            .await
    }

    /// [`Self::read`] for a consumer's fetch: CRCs are checked as `fetch_verify` says (see
    /// [`FetchVerify`]); record framing and positions always are.
    pub async fn fetch(
        &self,
        topic: &str,
        queue_id: u32,
        offset: QueueOffset,
        max_bytes: u32,
    ) -> Result<ReadBatch, StorageError> {
        let crc = match self.inner.fetch_verify {
            FetchVerify::Always => true,
            FetchVerify::Once => !self.log_checked(),
        };
        self.read_checked(topic, queue_id, offset, max_bytes, crc)
            .await
    }

    /// Whether every record of the log has had its CRC checked once since the open: the open
    /// scanned what it did not take from the snapshot, and the background check the rest
    /// without finding a corrupt record. Appends check (or build) what they add.
    fn log_checked(&self) -> bool {
        matches!(
            *self.inner.check.borrow(),
            BackgroundCheck::NotNeeded | BackgroundCheck::Clean { .. }
        )
    }

    async fn read_checked(
        &self,
        topic: &str,
        queue_id: u32,
        offset: QueueOffset,
        max_bytes: u32,
        crc: bool,
    ) -> Result<ReadBatch, StorageError> {
        let visible = self.inner.log.marks().visible.0;
        let (ranges, min, end) = {
            let idx = self.inner.idx.borrow();
            let Some(q) = idx.queue(topic, queue_id) else {
                if offset.0 == 0 {
                    return Ok(ReadBatch::empty(
                        QueueOffset(0),
                        QueueOffset(0),
                        QueueOffset(0),
                    ));
                }
                return Err(StorageError::OffsetOutOfRange {
                    requested: offset.0,
                    min: 0,
                    end: 0,
                });
            };
            let (min, end) = (q.min_offset(), q.visible_end(visible));
            if offset.0 < min || offset.0 > end {
                return Err(StorageError::OffsetOutOfRange {
                    requested: offset.0,
                    min,
                    end,
                });
            }
            let nvis = q.visible_count(visible);
            let mut ranges: Vec<(u64, u32, u64)> = Vec::new(); // (position, len, end_offset)
            let mut total = 0u64;
            for e in &q.entries[q.find(offset.0)..nvis] {
                if !ranges.is_empty() && total + u64::from(e.size) > u64::from(max_bytes) {
                    break;
                }
                total += u64::from(e.size);
                match ranges.last_mut() {
                    Some(r)
                        if r.0 + u64::from(r.1) == e.position
                            && self.same_segment(r.0, e.position) =>
                    {
                        r.1 += e.size;
                        r.2 = e.end_offset();
                    }
                    _ => ranges.push((e.position, e.size, e.end_offset())),
                }
            }
            (ranges, min, end)
        };
        // The queue's records are interleaved with other queues' in the log, so one fetch is
        // often many ranges: read them all at once (one io_uring submission, the disk works
        // on them together) rather than one after the other, each a device round trip.
        let reads = ranges
            .iter()
            .map(|&(pos, len, _)| self.inner.log.read_range(LogPosition(pos), len));
        let read = futures::future::try_join_all(reads).await?;
        // Checked in the read buffers, then copied once into the response's body.
        let mut out = Vec::with_capacity(read.iter().map(|b| b.len()).sum());
        let mut next = offset.0;
        for ((pos, _, end_off), bytes) in ranges.into_iter().zip(read) {
            let mut at = 0usize;
            let mut p = pos;
            while at < bytes.len() {
                let parsed = if crc {
                    RecordView::parse_at(&bytes[at..], p).map(|v| v.bytes.len())
                } else {
                    RecordView::frame_at(&bytes[at..], p)
                };
                let len = parsed.map_err(|e| StorageError::Corrupt {
                    position: p,
                    detail: e.to_string(),
                })?;
                at += len;
                p += len as u64;
            }
            out.extend_from_slice(&bytes);
            next = end_off;
        }
        Ok(ReadBatch {
            records: Bytes::from(out),
            next_offset: QueueOffset(next),
            min_offset: QueueOffset(min),
            end_offset: QueueOffset(end),
        })
    }

    fn same_segment(&self, a: u64, b: u64) -> bool {
        let log = &self.inner.log;
        let seg_of = |p: u64| log.segment_of(LogPosition(p)).map(|(base, _)| base);
        seg_of(a) == seg_of(b)
    }

    fn visible_end(&self, topic: &str, queue_id: u32) -> u64 {
        let visible = self.inner.log.marks().visible.0;
        self.inner
            .idx
            .borrow()
            .queue(topic, queue_id)
            .map_or(0, |q| q.visible_end(visible))
    }

    /// Resolves when the queue's visible end offset is beyond `offset` (or the log is poisoned
    /// or closed). Cancel-safe.
    pub async fn wait_visible_beyond(&self, topic: &str, queue_id: u32, offset: QueueOffset) {
        let log = &self.inner.log;
        log.durable_changed
            .wait_until(|| {
                if log.marks().stopped() {
                    return true;
                }
                self.visible_end(topic, queue_id) > offset.0
            })
            .await
    }

    pub fn queue_stats(&self, topic: &str, queue_id: u32) -> QueueStats {
        let visible = self.inner.log.marks().visible.0;
        let idx = self.inner.idx.borrow();
        match idx.queue(topic, queue_id) {
            None => QueueStats::default(),
            Some(q) => QueueStats {
                min_offset: QueueOffset(q.min_offset()),
                visible_end_offset: QueueOffset(q.visible_end(visible)),
                written_end_offset: QueueOffset(q.next_offset),
                bytes: q.bytes,
                records: q.entries.len() as u64,
            },
        }
    }

    /// Where the log begins: the base of its oldest segment (0 until retention drops one).
    pub fn first_position(&self) -> LogPosition {
        self.inner.log.first_segment_base()
    }

    pub fn watermarks(&self) -> Watermarks {
        let m = self.inner.log.marks();
        Watermarks {
            appended: m.appended,
            written: m.written,
            durable: m.durable,
            visible: m.visible,
        }
    }

    /// The one announcement of each append, besides the in-memory tail feed: a replication
    /// layer hears every new log end here (for the age of the lag) instead of each caller
    /// remembering to tell it. `None` removes the hook.
    pub fn set_append_hook(&self, hook: Option<AppendHook>) {
        *self.inner.append_hook.borrow_mut() = hook;
    }

    /// The hook set by [`ShardStore::set_append_hook`] (carried over when a store is reopened).
    pub fn append_hook(&self) -> Option<AppendHook> {
        self.inner.append_hook.borrow().clone()
    }

    /// Caps the visible watermark (for a replication layer); `None` removes the cap.
    pub fn set_visible_cap(&self, cap: Option<LogPosition>) {
        self.inner.log.set_visible_cap(cap);
        self.inner.log.durable_changed.notify_all();
    }

    pub fn metrics(&self) -> StorageMetrics {
        let m = self.inner.log.marks();
        let c = self.inner.log.counters();
        StorageMetrics {
            appends: c.appends,
            fsyncs: c.fsyncs,
            flush_cycles: c.flush_cycles,
            writes: c.writes,
            written_bytes: c.written_bytes,
            unflushed_bytes: m.appended.bytes_since(m.durable),
            unflushed_hwm_bytes: c.unflushed_hwm_bytes,
            flush_latency_sum_us: c.flush_latency_sum_us,
            flush_latency_count: c.flush_latency_count,
            fsync_latency_us: c.fsync_latency_us,
            group_commit_bytes: c.group_commit_bytes,
            group_commit_records: c.group_commit_records,
            poisoned: m.poisoned,
            quarantined_records: self.inner.quarantined,
            checkpoints: self.inner.checkpoints.get(),
            segments_recycled: c.segments_recycled,
        }
    }

    /// Log positions of visible records of `topic` holding `key` (may include rare hash false
    /// positives: check the key in the record).
    pub fn lookup_key(&self, topic: &str, key: &[u8]) -> Vec<LogPosition> {
        let visible = self.inner.log.marks().visible.0;
        self.inner
            .idx
            .borrow()
            .keys
            .lookup(topic.as_bytes(), key)
            .iter()
            .filter(|&&p| p < visible)
            .map(|&p| LogPosition(p))
            .collect()
    }

    /// Deletes every segment that ends at or below `position` and the durable watermark (never
    /// the active one), or keeps
    /// it for reuse (`recycle_segments`), and drops their index entries. Returns how many
    /// segments were dropped.
    pub fn drop_segments_before(&self, position: LogPosition) -> Result<u64, StorageError> {
        let log = &self.inner.log;
        // Never a segment with writes or an fdatasync still to come: removing it would fail
        // them and poison the log.
        let position = position.min(log.marks().durable);
        let victims = log.sealed_segments_before(position);
        let count = victims.len() as u64;
        if count > 0 {
            // The consume-queue files keep the dropped records' entries: a queue whose every
            // record goes must find where its offsets go on there after a restart.
            self.inner.persist_indexes(log.marks().durable.0);
        }
        let mut first_kept = 0;
        for s in victims {
            log.forget_segment(s.base);
            first_kept = s.end();
            if let Some(s) = log.recycle(s) {
                log.backend
                    .remove(&s.path)
                    .map_err(|e| StorageError::io("remove segment", &s.path, e))?;
            }
        }
        if count > 0 {
            let mut idx = self.inner.idx.borrow_mut();
            for qs in idx.topics.values_mut() {
                for q in qs.values_mut() {
                    q.prune_below(first_kept);
                }
            }
            idx.keys.prune_below(first_kept);
        }
        Ok(count)
    }

    /// Retention by age: deletes the oldest sealed segments whose file was last modified more
    /// than `retention_hours` before `now` (a prefix of the log only: it stops at the first
    /// segment still young). Returns how many were removed. Reads file metadata with `std::fs`
    /// (a few stat calls, once a minute from the retention task).
    pub fn drop_expired_segments(&self, now: SystemTime) -> Result<u64, StorageError> {
        let hours = self.inner.log.cfg.retention_hours;
        if hours == 0 {
            return Ok(0);
        }
        let keep = Duration::from_secs(hours * 3600);
        let log = &self.inner.log;
        let mut through = None;
        for seg in log.sealed_segments_before(LogPosition(u64::MAX)) {
            let modified = std::fs::metadata(&seg.path)
                .and_then(|m| m.modified())
                .map_err(|e| StorageError::io("stat segment", &seg.path, e))?;
            if now.duration_since(modified).unwrap_or_default() <= keep {
                break;
            }
            through = Some(seg.end());
        }
        let Some(end) = through else { return Ok(0) };
        let n = self.drop_segments_before(LogPosition(end))?;
        log::info!(
            "storage: retention: removed {n} segments of {} last written more than {hours} h ago \
             (the log now starts at {end})",
            self.inner.dir.display()
        );
        Ok(n)
    }

    /// Retention by size: deletes the oldest sealed segments while all segments together
    /// (sealed and active, `segment_bytes` each) take more than `retention_bytes`. Returns how
    /// many were removed.
    pub fn drop_oversize_segments(&self) -> Result<u64, StorageError> {
        let cfg = &self.inner.log.cfg;
        if cfg.retention_bytes == 0 {
            return Ok(0);
        }
        let sealed = self.inner.log.sealed_segments_before(LogPosition(u64::MAX));
        let total = (sealed.len() as u64 + 1) * cfg.segment_bytes;
        let over = total.saturating_sub(cfg.retention_bytes);
        let n = over.div_ceil(cfg.segment_bytes) as usize;
        let Some(last) = sealed.get(n.min(sealed.len()).wrapping_sub(1)) else {
            return Ok(0);
        };
        let end = last.end();
        let removed = self.drop_segments_before(LogPosition(end))?;
        log::info!(
            "storage: retention: removed {removed} segments of {} to keep the log within \
             retention_bytes {} (the log now starts at {end})",
            self.inner.dir.display(),
            cfg.retention_bytes
        );
        Ok(removed)
    }

    /// Forced deletion (only with `force_clean`): deletes the oldest sealed segment, expired
    /// or not, because the disk is used at `used` (above `disk_force_clean_ratio`), and logs
    /// every queue whose oldest messages went with it. Returns how many were removed (0 or 1).
    pub fn drop_for_space(&self, used: f64) -> Result<u64, StorageError> {
        let sealed = self.inner.log.sealed_segments_before(LogPosition(u64::MAX));
        let Some(oldest) = sealed.first() else {
            log::warn!(
                "storage: disk usage {:.1} % is above disk_force_clean_ratio but {} has no \
                 sealed segment left to delete",
                used * 100.0,
                self.inner.dir.display()
            );
            return Ok(0);
        };
        let before = self.queue_mins();
        let removed = self.drop_segments_before(LogPosition(oldest.end()))?;
        let cut: Vec<String> = self
            .queue_mins()
            .into_iter()
            .filter_map(|(q, min)| {
                let was = before.get(&q).copied().unwrap_or(0);
                (min > was).then(|| format!("{}/{} {was}..{min}", q.0, q.1))
            })
            .collect();
        log::warn!(
            "storage: forced deletion: removed segment {}..{} of {} before it expired, because \
             disk usage {:.1} % is above disk_force_clean_ratio {:.1} %; messages dropped \
             (queue first..new first offset): {}",
            oldest.base,
            oldest.end(),
            self.inner.dir.display(),
            used * 100.0,
            self.inner.log.cfg.disk_force_clean_ratio * 100.0,
            if cut.is_empty() {
                "none".to_string()
            } else {
                cut.join(", ")
            }
        );
        Ok(removed)
    }

    /// The oldest offset of every queue.
    fn queue_mins(&self) -> HashMap<(String, u32), u64> {
        let idx = self.inner.idx.borrow();
        idx.topics
            .iter()
            .flat_map(|(topic, qs)| {
                qs.iter()
                    .map(move |(q, state)| ((topic.clone(), *q), state.min_offset()))
            })
            .collect()
    }

    /// Flushes everything, stops the flusher and persists the indexes.
    pub async fn close(&self) -> Result<(), StorageError> {
        let log = &self.inner.log;
        log.begin_close();
        log.flusher_wake.notify_all();
        let handle = self.inner.flusher.borrow_mut().take();
        if log.join_flusher(handle).await? {
            log.changed
                .wait_until(|| log.marks().inflight_writes == 0)
                .await;
        }
        // A segment preparation under way gives up and removes its partial file.
        log.wait_no_preparation().await;
        if let Some(e) = log.poisoned_error() {
            return Err(e);
        }
        let m = log.marks();
        let (durable, record_end) = (m.durable.0, m.durable_record_end.0);
        self.inner.persist_indexes(durable);
        // Writes that still wait (for space) no longer matter to this close: end the
        // checkpoint task even if they never finish.
        self.inner.checkpointer_stop.set(true);
        log.durable_changed.notify_all();
        let handle = self.inner.checkpointer.borrow_mut().take();
        if let Some(h) = handle {
            h.await;
        }
        // A clean stop leaves a checkpoint covering the whole log, and with no write left its
        // reservation at the log's last written block: the next open reads nothing past it
        // (a recycled segment holds its previous life there, which a scan would take for a
        // torn tail and zero).
        let ckpt = &self.inner.checkpoint;
        let m = log.marks();
        let reserved = if m.inflight_writes == 0 {
            align_up(m.appended.0).min(ckpt.reserved())
        } else {
            ckpt.reserved()
        };
        if record_end > ckpt.position() || reserved < ckpt.reserved() {
            match ckpt.store(record_end.max(ckpt.position()), reserved).await {
                Ok(()) => self.inner.checkpoints.set(self.inner.checkpoints.get() + 1),
                // An older checkpoint is always safe (recovery only treats more of the tail as
                // maybe torn): a full disk does not make the close unclean.
                Err(e) if is_disk_full(&e) => {
                    log::warn!("storage: final checkpoint not written, the disk is full: {e}")
                }
                Err(e) => return Err(StorageError::io("write checkpoint", ckpt.path.clone(), e)),
            }
        }
        // ... and an index snapshot at the log end, so the next open scans nothing.
        while self.inner.snapshot.get().writing {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        self.inner.write_snapshot(ckpt.position(), true).await;
        Ok(())
    }

    /// How the background check of the records below the index snapshot stands (an open
    /// from a snapshot does not scan them; see `index/snapshot.rs`).
    pub fn background_check(&self) -> BackgroundCheck {
        self.inner.check.borrow().clone()
    }

    /// Resolves when the background check is no longer running.
    pub async fn wait_background_check(&self) {
        while *self.inner.check.borrow() == BackgroundCheck::Running {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The durable checkpoint written last (a record end; see `checkpoint.rs`).
    pub fn checkpoint_position(&self) -> LogPosition {
        LogPosition(self.inner.checkpoint.position())
    }

    /// TEST ONLY: injects a fault into this store's durability path, so a test can prove that
    /// the crash drills catch it. Never call this in a broker.
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: StorageFault) {
        match fault {
            StorageFault::SkipFdatasyncs(n) => self.inner.log.inject_skipped_syncs(n),
        }
    }

    /// Resolves once the next segment is prepared (zero-written) in the background, so the
    /// next roll does not wait. Preparing writes a whole segment, which competes with the log
    /// for the disk: a broker may wait for it at start before taking traffic.
    pub async fn wait_spare_segment(&self) {
        let log = &self.inner.log;
        log.changed
            .wait_until(|| {
                let m = log.marks();
                m.has_spare || m.stopped()
            })
            .await
    }

    /// The storage directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

/// An index snapshot is written at least this often while the log grows (and at close), ...
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);
/// ... and also when the log grew this much since the last one, so that the scan after a
/// crash stays short under heavy load (about 1 s at the scan's ~250 MB/s here).
pub const SNAPSHOT_EVERY_BYTES: u64 = 256 << 20;

#[derive(Clone, Copy, Default)]
struct SnapshotState {
    /// Position of the last snapshot written (or found at open).
    position: u64,
    at: Option<Instant>,
    writing: bool,
    /// Corruption was found below a snapshot: none is written again until an open has
    /// scanned the whole log (so the next open finds the corruption and refuses).
    off: bool,
}

/// The background check after an open from an index snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackgroundCheck {
    /// The open scanned the whole log (no snapshot): nothing to check.
    NotNeeded,
    /// Reading the records below the snapshot (the key index is incomplete until it ends).
    Running,
    /// Every record below the snapshot checked out.
    Clean { records: u64 },
    /// A record below the durable checkpoint is corrupt: logged as an error; reads of it get
    /// CORRUPT; the snapshot was removed, so the next open scans the whole log and (in strict
    /// mode) refuses with the same line. The text names file, byte and what to run.
    Corrupt(String),
    /// The check failed to read the log (an I/O error, logged).
    Failed(String),
}

impl<B: StorageBackend> Inner<B> {
    /// Writes an index snapshot at `position` (a record end at or below the checkpoint whose
    /// consume-queue entries are in their files) on a blocking thread. A failure is logged
    /// and costs only a longer scan at the next open.
    /// `clean_close`: written by `close` at the log end. Returns whether it was written.
    async fn write_snapshot(&self, position: u64, clean_close: bool) -> bool {
        let mut st = self.snapshot.get();
        if st.off || st.writing || position == 0 {
            return false;
        }
        let mut snap = IndexSnapshot::take(&self.idx.borrow(), position);
        snap.clean_close = clean_close;
        let files = snap.queue_files(&self.dir);
        let bytes = snap.encode();
        let dir = self.dir.clone();
        st.writing = true;
        self.snapshot.set(st);
        let res = glommio::executor()
            .spawn_blocking(move || write_snapshot(&dir, &bytes, &files))
            .await;
        let mut st = self.snapshot.get();
        st.writing = false;
        let written = res.is_ok() && !st.off;
        match res {
            Ok(()) if !st.off => {
                st.position = position;
                st.at = Some(Instant::now());
            }
            Ok(()) => {
                // Corruption was found while it was written: take it back.
                if let Err(e) = remove_snapshot(&self.dir) {
                    log::error!(
                        "storage: removing the index snapshot in {}: {e}",
                        self.dir.display()
                    );
                }
            }
            Err(e) => log::warn!(
                "storage: writing the index snapshot in {}: {e} (the next open scans more)",
                self.dir.display()
            ),
        }
        self.snapshot.set(st);
        written
    }

    /// After a checkpoint at `position`: starts a snapshot there when the last one is old or
    /// far behind (see [`SNAPSHOT_INTERVAL`], [`SNAPSHOT_EVERY_BYTES`]).
    fn snapshot_in_background(self: Rc<Self>, position: u64) {
        let st = self.snapshot.get();
        let due = position > st.position
            && (position - st.position >= SNAPSHOT_EVERY_BYTES
                || st.at.map_or(true, |t| t.elapsed() >= SNAPSHOT_INTERVAL));
        if !due || st.writing || st.off {
            return;
        }
        glommio::spawn_local_into(
            async move {
                self.write_snapshot(position, false).await;
            },
            background_queue(),
        )
        .map(|t| t.detach())
        .map_or_else(
            |e| log::warn!("storage: cannot start an index snapshot: {e}"),
            |_| (),
        );
    }

    fn persist_indexes(&self, durable: u64) {
        let mut idx = self.idx.borrow_mut();
        for (topic, qs) in idx.topics.iter_mut() {
            for (qid, q) in qs.iter_mut() {
                if let Err(e) = q.persist(&cq_path(&self.dir, topic, *qid), durable) {
                    log::warn!("storage: persisting consume queue {topic}/{qid}: {e}");
                }
            }
        }
    }
}

/// Faults [`ShardStore::inject_fault`] can inject (tests only).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// The next `n` flush cycles advance `durable` (and so ack) without an fdatasync.
    SkipFdatasyncs(u32),
}

/// Writes the durable checkpoint lazily: after the durable watermark moved, at most once per
/// [`CHECKPOINT_INTERVAL_MS`], never on the ack path (acks wait for the log's fdatasync only).
/// A failed checkpoint write poisons the log like any failed fdatasync.
///
/// `checkpointed(position)` runs after each checkpoint (it may start an index snapshot there).
///
/// `persist_indexes(durable)` appends the consume-queue entries that became durable to their
/// files first. It used to run after every fdatasync inside the flush leader, whose blocking
/// `std::fs` writes then delayed the acks of that very sync; here it runs once per interval,
/// batched, after the acks were released.
/// How a checkpoint slot write went.
enum Stored {
    Yes,
    /// The disk is full: not written, the log is not poisoned.
    NoSpace,
    /// Any other error: the log is poisoned.
    Failed,
}

async fn run_checkpointer<B: StorageBackend>(
    log: Rc<CommitLog<B>>,
    ckpt: Rc<Checkpoint<B::File>>,
    count: Rc<Cell<u64>>,
    stop: Rc<Cell<bool>>,
    persist_indexes: impl Fn(u64),
    checkpointed: impl Fn(u64),
) {
    let interval = Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    // Runs until the log is poisoned, or closing with no write left, or `close` says so after
    // its flush: the final flush of a close may still need reservations (`close` writes the
    // last slot itself).
    let done = || {
        let m = log.marks();
        m.poisoned || stop.get() || (m.closing && m.inflight_writes == 0)
    };
    // Small segments (tests) get a quarter of a segment, so that they exercise it.
    let reservation = WRITE_RESERVATION_BYTES.min(log.cfg.segment_bytes / 4);
    let reserve = || log.wants_reservation(reservation / 2);
    let due = || {
        let m = log.marks();
        !m.closing && m.durable_record_end.0 > ckpt.position()
    };
    // One slot write at a time: a reservation keeps the checkpointed position, a checkpoint
    // keeps the reservation.
    let store = |position: u64, reserved: u64| {
        let (log, ckpt) = (log.clone(), ckpt.clone());
        async move {
            match ckpt.store(position, reserved).await {
                Ok(()) => Stored::Yes,
                Err(e) if is_disk_full(&e) => {
                    log::warn!("storage: the durable checkpoint waits for space: {e}");
                    Stored::NoSpace
                }
                Err(e) => {
                    log.poison(format!(
                        "writing the durable checkpoint {}: {e}",
                        ckpt.path.display()
                    ));
                    Stored::Failed
                }
            }
        }
    };
    let mut quiet_until = Instant::now();
    loop {
        let wake = || done() || reserve() || (due() && Instant::now() >= quiet_until);
        let quiet = quiet_until.saturating_duration_since(Instant::now());
        // `durable_changed` is also notified on every write completion, poison and close
        // (`CommitLog::notify_all`), so it covers the end of a close's last write too.
        futures_lite::future::or(
            futures_lite::future::or(
                log.durable_changed.wait_until(wake),
                log.reserve_wanted.wait_until(wake),
            ),
            async {
                // Wakes to write a checkpoint that came due during the quiet time.
                glommio::timer::sleep(quiet).await;
                log.durable_changed.wait_until(wake).await
            },
        )
        .await;
        if done() {
            break;
        }
        if reserve() {
            let limit = log.marks().appended.0 + reservation;
            match store(ckpt.position(), limit).await {
                Stored::Yes => log.set_write_limit(limit),
                // The waiting write could not proceed anyway; try again shortly.
                Stored::NoSpace => glommio::timer::sleep(interval).await,
                Stored::Failed => break,
            }
            continue;
        }
        if !due() || Instant::now() < quiet_until {
            continue;
        }
        let m = log.marks();
        let (pos, durable) = (m.durable_record_end.0, m.durable.0);
        persist_indexes(durable);
        match store(pos, ckpt.reserved()).await {
            Stored::Yes => {
                count.set(count.get() + 1);
                checkpointed(pos);
            }
            // A full disk delays the checkpoint (an older one is always safe); the next
            // interval tries again.
            Stored::NoSpace => {}
            Stored::Failed => break,
        }
        quiet_until = Instant::now() + interval;
    }
}

/// The index snapshot in `dir` with the indexes restored from it and the queue files read,
/// when it can be used for `opened` (see `index/snapshot.rs`); `None` (with a line saying
/// why, unless there is none) when the whole log must be scanned.
#[allow(clippy::type_complexity)]
fn restore_snapshot<B: StorageBackend>(
    dir: &Path,
    opened: &OpenedLog<B>,
) -> Option<(Indexes, HashMap<PathBuf, Vec<CqEntry>>, ScanStart)> {
    let why = match read_snapshot(dir) {
        Ok(None) => return None,
        Err(e) => format!("cannot read it: {e}"),
        Ok(Some(bytes)) => match IndexSnapshot::decode(&bytes) {
            Err(e) => e,
            Ok(s) if s.position > opened.checkpoint() => format!(
                "its position {} is past the durable checkpoint {}",
                s.position,
                opened.checkpoint()
            ),
            Ok(s) if s.position < opened.start() || s.position > opened.end() => format!(
                "its position {} is outside the log ({}..{})",
                s.position,
                opened.start(),
                opened.end()
            ),
            Ok(s) => {
                let start = ScanStart {
                    position: s.position,
                    clean_close: s.clean_close && s.position == opened.checkpoint(),
                };
                match s.restore(dir, opened.start()) {
                    Ok((idx, files)) => return Some((idx, files, start)),
                    Err(e) => e,
                }
            }
        },
    };
    log::warn!(
        "storage: not using the index snapshot in {} ({why}); scanning the whole log",
        dir.display()
    );
    None
}

/// How often retention by age looks at segment ages while the disk is below
/// `disk_clean_ratio`.
const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How often the retention task looks at the disk and the log's size.
const RETENTION_TICK: Duration = Duration::from_secs(1);

/// Retention while the store is open: by age every minute, or every second while the disk is
/// used above `disk_clean_ratio` ([`ShardStore::drop_expired_segments`]); by size every second
/// ([`ShardStore::drop_oversize_segments`]); and forced deletion, when the operator turned it
/// on ([`ShardStore::drop_for_space`]). A failure is logged and tried again next time.
async fn run_retention<B: StorageBackend>(inner: Weak<Inner<B>>) {
    let mut last_age_check = Instant::now();
    loop {
        glommio::timer::sleep(RETENTION_TICK).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.log.marks().stopped() {
            return;
        }
        let store = ShardStore { inner };
        let cfg = &store.inner.log.cfg;
        let used = crate::storage::space::fs_space(&store.inner.dir)
            .map(|s| s.used_ratio())
            .ok();
        let crowded = used.is_some_and(|u| u > cfg.disk_clean_ratio);
        if crowded || last_age_check.elapsed() >= RETENTION_CHECK_INTERVAL {
            last_age_check = Instant::now();
            if let Err(e) = store.drop_expired_segments(SystemTime::now()) {
                log::warn!("storage: retention: {e}");
            }
        }
        if let Err(e) = store.drop_oversize_segments() {
            log::warn!("storage: retention by size: {e}");
        }
        if let Some(used) = used.filter(|u| cfg.force_clean && *u > cfg.disk_force_clean_ratio) {
            if let Err(e) = store.drop_for_space(used) {
                log::warn!("storage: forced deletion: {e}");
            }
        }
    }
}

/// A low-share task queue for background work (the check, snapshots), so that it never
/// delays the shard's requests.
fn background_queue() -> glommio::TaskQueueHandle {
    thread_local! {
        static QUEUE: glommio::TaskQueueHandle = glommio::executor().create_task_queue(
            glommio::Shares::Static(50),
            glommio::Latency::NotImportant,
            "storage-background",
        );
    }
    QUEUE.with(|q| *q)
}

/// Reads the records below the snapshot position `to` that the open did not scan: checks
/// them and rebuilds their key-index entries. On corruption: an error line, the snapshot
/// removed and no further snapshots (the next open scans all and refuses in strict mode).
async fn run_background_check<B: StorageBackend>(
    inner: Weak<Inner<B>>,
    segs: Vec<Rc<Segment<B::File>>>,
    to: u64,
    checkpoint: u64,
) {
    let started = Instant::now();
    let outcome = scrub(segs, to, checkpoint, |v| {
        let Some(inner) = inner.upgrade() else {
            return false;
        };
        if inner.log.marks().stopped() {
            return false;
        }
        inner
            .idx
            .borrow_mut()
            .index_keys(v.topic, &v.header, v.body);
        true
    })
    .await;
    let Some(inner) = inner.upgrade() else { return };
    let state = match outcome {
        Ok(ScrubOutcome::Clean { records }) => {
            log::info!(
                "storage: background check of {}: {records} records below the index snapshot \
                 checked in {:.1} s",
                inner.dir.display(),
                started.elapsed().as_secs_f64()
            );
            BackgroundCheck::Clean { records }
        }
        Ok(ScrubOutcome::Stopped) => return,
        Ok(ScrubOutcome::Corrupt(e)) => {
            let mut st = inner.snapshot.get();
            st.off = true;
            inner.snapshot.set(st);
            if !st.writing {
                if let Err(e) = remove_snapshot(&inner.dir) {
                    log::error!(
                        "storage: removing the index snapshot in {}: {e}",
                        inner.dir.display()
                    );
                }
            }
            let line = match e {
                StorageError::CorruptDurable {
                    path,
                    file_offset,
                    position,
                    checkpoint,
                    detail,
                } => format!(
                    "corrupt data in {} at byte {file_offset} (log position {position}), below \
                     the durable checkpoint {checkpoint}, found by the background check after a \
                     start from the index snapshot: {detail}; reads of it get CORRUPT and the \
                     next start refuses. To quarantine exactly the bad record and keep \
                     everything after it, stop the broker and run `ringmq admin repair \
                     --data-dir <DATA_DIR>`, or start with `ringmq broker --recovery \
                     skip-corrupt`",
                    path.display()
                ),
                other => other.to_string(),
            };
            log::error!("storage: {line}");
            BackgroundCheck::Corrupt(line)
        }
        Err(e) => {
            log::error!("storage: background check of {}: {e}", inner.dir.display());
            BackgroundCheck::Failed(e.to_string())
        }
    };
    *inner.check.borrow_mut() = state;
}

/// Makes every consume-queue file match the log (the log is the truth) from `log_start` (the
/// first segment's base) on. A file's entries of records below it (dropped by retention) are
/// kept: they are all that is left of where the queue's offsets go on when retention dropped
/// every record of it (without them a restart gave such a queue offset 0 again).
fn reconcile_index_files(
    dir: &Path,
    log_start: u64,
    idx: &mut Indexes,
    report: &mut RecoveryReport,
    mut already_read: HashMap<PathBuf, Vec<CqEntry>>,
) -> Result<(), StorageError> {
    let cq_dir = dir.join("consumequeue");
    let dropped = |f: &[CqEntry]| {
        f.iter()
            .take_while(|e| e.end_position() <= log_start)
            .count()
    };
    // Files of queues the log no longer has anything for: a queue retention emptied goes on
    // after its last dropped record; anything else there is ahead of the log.
    if let Ok(topics) = std::fs::read_dir(&cq_dir) {
        for t in topics.flatten() {
            let topic = t.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                let Ok(qid) = f.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if idx.queue(&topic, qid).is_none() {
                    let path = f.path();
                    let entries = match already_read.get(&path) {
                        Some(e) => Some(e.clone()),
                        None => read_cq_file(&path)
                            .map_err(|e| StorageError::io("read index", &path, e))?,
                    }
                    .unwrap_or_default();
                    let n = dropped(&entries);
                    if n > 0 {
                        idx.queue_mut(&topic, qid).next_offset = entries[n - 1].end_offset();
                        already_read.insert(path, entries);
                        continue;
                    }
                    let n = f.metadata().map_or(0, |m| m.len())
                        / crate::storage::index::consume_queue::CQ_ENTRY_BYTES as u64;
                    if decide(Observation::IndexAhead, RecoveryMode::Strict)
                        == Action::TruncateIndex
                    {
                        rewrite_cq_file(&f.path(), 0, &[])
                            .map_err(|e| StorageError::io("truncate index", f.path(), e))?;
                        report.index_entries_truncated += n;
                    }
                }
            }
        }
    }
    for (topic, qs) in idx.topics.iter_mut() {
        for (qid, q) in qs.iter_mut() {
            let path = cq_path(dir, topic, *qid);
            let file = match already_read.remove(&path) {
                Some(f) => Some(f),
                None => {
                    read_cq_file(&path).map_err(|e| StorageError::io("read index", &path, e))?
                }
            };
            let mut keep = 0usize;
            let skip = file.as_deref().map_or(0, dropped);
            let mut observations = Vec::new();
            match &file {
                None => observations.push(Observation::IndexMissing),
                Some(f) => {
                    keep = f[skip..]
                        .iter()
                        .zip(&q.entries)
                        .take_while(|(a, b)| a == b)
                        .count();
                    if f.len() - skip > keep {
                        observations.push(Observation::IndexAhead);
                    }
                    if q.entries.len() > keep {
                        observations.push(Observation::IndexBehind);
                    }
                    if observations.is_empty() {
                        observations.push(Observation::IndexConsistent);
                    }
                }
            }
            let mut rewrite = false;
            for o in observations {
                match decide(o, RecoveryMode::Strict) {
                    Action::TruncateIndex => {
                        report.index_entries_truncated +=
                            (file.as_ref().map_or(0, |f| f.len()) - skip - keep) as u64;
                        rewrite = true;
                    }
                    Action::ExtendIndex => {
                        report.index_entries_rebuilt += (q.entries.len() - keep) as u64;
                        rewrite = true;
                    }
                    Action::RebuildIndex => {
                        report.index_files_rebuilt += 1;
                        report.index_entries_rebuilt += q.entries.len() as u64;
                        rewrite = true;
                    }
                    Action::Keep => {}
                    a => unreachable!("index reconciliation got log action {a:?}"),
                }
            }
            if rewrite {
                rewrite_cq_file(&path, skip + keep, &q.entries[keep..])
                    .map_err(|e| StorageError::io("rewrite index", &path, e))?;
            }
            q.persisted = q.entries.len();
        }
    }
    Ok(())
}
