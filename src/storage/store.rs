//! `ShardStore`: one shard's storage — the CommitLog, its flusher, the consume queues, the key
//! index and the idempotent-producer table — behind the API the server calls. Everything runs
//! inside one glommio executor; state is `Rc<RefCell<_>>` and no borrow is held across `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::format::record::{RecordHeader, RecordView, FLAG_IDEMPOTENT, HEADER_BYTES};
use crate::storage::append_order::AppendOrder;
use crate::storage::backend::{DmaBackend, StorageBackend};
use crate::storage::checkpoint::{Checkpoint, CHECKPOINT_INTERVAL_MS};
use crate::storage::commitlog::CommitLog;
use crate::storage::error::StorageError;
use crate::storage::flush::run_flusher;
use crate::storage::index::consume_queue::{
    cq_path, read_cq_file, rewrite_cq_file, CqEntry, QueueIndex,
};
use crate::storage::index::key_index::KeyIndex;
use crate::storage::index::producer::{BatchMeta, ProducerTable, SeqCheck};
use crate::storage::index::scan_body;
use crate::storage::recovery::{decide, recover_log, Action, Observation, RecoveryReport};
use crate::storage::signal::Signal;
use crate::storage::tail_feed::TailFeed;
use crate::storage::{
    AppendRequest, Appended, LogPosition, QueueOffset, QueueStats, ReadBatch, RecoveryMode,
    StorageConfig, StorageMetrics, Watermarks,
};

#[derive(Default)]
pub(super) struct Indexes {
    topics: HashMap<String, HashMap<u32, QueueIndex>>,
    next_uid: u32,
    keys: KeyIndex,
    producers: ProducerTable,
}

impl Indexes {
    pub(super) fn queue_mut(&mut self, topic: &str, queue_id: u32) -> &mut QueueIndex {
        if !self.topics.contains_key(topic) {
            self.topics.insert(topic.to_string(), HashMap::new());
        }
        let uid = &mut self.next_uid;
        self.topics
            .get_mut(topic)
            .expect("inserted")
            .entry(queue_id)
            .or_insert_with(|| {
                *uid += 1;
                QueueIndex::new(*uid)
            })
    }

    fn queue(&self, topic: &str, queue_id: u32) -> Option<&QueueIndex> {
        self.topics.get(topic)?.get(&queue_id)
    }

    pub(super) fn apply(&mut self, topic: &str, h: &RecordHeader, body: &[u8]) {
        if h.is_gap() {
            self.apply_gap(topic, h);
            return;
        }
        let pos = h.log_position;
        let keys = &mut self.keys;
        let tag_hash = scan_body(body, |k| keys.insert(topic.as_bytes(), k, pos));
        let q = self.queue_mut(topic, h.queue_id);
        let uid = q.uid;
        q.push(CqEntry {
            position: pos,
            size: h.total_len,
            base_offset: h.base_queue_offset,
            count: h.message_count,
            tag_hash,
        });
        if let Some((pid, epoch, seq)) = h.producer() {
            self.producers.record(
                pid,
                uid,
                epoch,
                BatchMeta {
                    base_seq: seq,
                    count: h.message_count,
                    base_offset: h.base_queue_offset,
                    position: pos,
                    end: pos + u64::from(h.total_len),
                },
            );
        }
    }
}

impl Indexes {
    /// A gap record (a quarantined corrupt record) holds no messages and gets no index entry.
    /// When it repeats the lost record's header and that record continued its queue exactly,
    /// the queue's next offset moves past it, so a lost last record of a queue is never given
    /// to new messages (offsets are not reused). Anything less plausible is ignored: the
    /// fields were read from a record that failed its CRC.
    fn apply_gap(&mut self, topic: &str, h: &RecordHeader) {
        let Some(q) = self
            .topics
            .get_mut(topic)
            .and_then(|qs| qs.get_mut(&h.queue_id))
        else {
            return;
        };
        if h.message_count > 0 && q.next_offset == h.base_queue_offset {
            q.next_offset = h.base_queue_offset + u64::from(h.message_count);
        }
    }
}

pub(super) struct Inner<B: StorageBackend> {
    pub(super) log: Rc<CommitLog<B>>,
    dir: PathBuf,
    pub(super) idx: RefCell<Indexes>,
    flusher: RefCell<Option<glommio::task::JoinHandle<()>>>,
    checkpoint: Rc<Checkpoint<B::File>>,
    checkpointer: RefCell<Option<glommio::task::JoinHandle<()>>>,
    checkpoints: Rc<Cell<u64>>,
    /// Records quarantined at open.
    quarantined: u64,
    /// Recently appended records kept in memory for a replication stream (see `stream.rs`).
    pub(super) feed: RefCell<TailFeed>,
    /// Notified after every append.
    pub(super) appended: Signal,
    /// Told the end of every append (see [`ShardStore::set_append_hook`]).
    append_hook: RefCell<Option<AppendHook>>,
    /// Appends in arrival order (see `AppendOrder`: producer sequences depend on it).
    order: AppendOrder,
}

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
        let log_dir = dir.join("commitlog");
        let mut idx = Indexes::default();
        let rec = recover_log(&backend, &log_dir, &cfg, limit, |v: &RecordView<'_>| {
            idx.apply(v.topic, &v.header, v.body)
        })
        .await?;
        let mut rec = rec;
        let mut report = std::mem::take(&mut rec.report);
        let checkpoint = Rc::new(
            rec.checkpoint
                .take()
                .expect("recovery opens the checkpoint"),
        );
        reconcile_index_files(dir, &mut idx, &mut report)?;
        report.producers = idx.producers.len() as u64;
        let log = CommitLog::new(backend, log_dir, cfg, rec);
        log.ensure_spare();
        let checkpoints = Rc::new(Cell::new(0));
        let inner = Rc::new(Inner {
            log: log.clone(),
            dir: dir.to_path_buf(),
            idx: RefCell::new(idx),
            flusher: RefCell::new(None),
            checkpoint,
            checkpointer: RefCell::new(None),
            checkpoints,
            quarantined: report.quarantined.len() as u64,
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
            move |durable| {
                if let Some(inner) = weak.upgrade() {
                    inner.persist_indexes(durable);
                }
            },
        ))
        .detach();
        *inner.checkpointer.borrow_mut() = Some(checkpointer);
        log::info!("storage: opened {}: {report}", dir.display());
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
    /// record), never past the visible watermark. `offset == end` gives an empty batch.
    pub async fn read(
        &self,
        topic: &str,
        queue_id: u32,
        offset: QueueOffset,
        max_bytes: u32,
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
        let mut out = Vec::new();
        let mut next = offset.0;
        for (pos, len, end_off) in ranges {
            let bytes = self.inner.log.read_range(LogPosition(pos), len).await?;
            let mut at = 0usize;
            let mut p = pos;
            while at < bytes.len() {
                let v =
                    RecordView::parse_at(&bytes[at..], p).map_err(|e| StorageError::Corrupt {
                        position: p,
                        detail: e.to_string(),
                    })?;
                at += v.bytes.len();
                p += v.bytes.len() as u64;
            }
            if out.is_empty() {
                out = bytes;
            } else {
                out.extend_from_slice(&bytes);
            }
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

    /// Deletes every segment that ends at or below `position` (never the active one) and drops
    /// their index entries. Returns how many segments were removed.
    pub fn drop_segments_before(&self, position: LogPosition) -> Result<u64, StorageError> {
        let log = &self.inner.log;
        let victims = log.sealed_segments_before(position);
        let mut first_kept = 0;
        for s in &victims {
            log.backend
                .remove(&s.path)
                .map_err(|e| StorageError::io("remove segment", &s.path, e))?;
            log.forget_segment(s.base);
            first_kept = s.end();
        }
        if !victims.is_empty() {
            let mut idx = self.inner.idx.borrow_mut();
            for qs in idx.topics.values_mut() {
                for q in qs.values_mut() {
                    q.prune_below(first_kept);
                }
            }
            idx.keys.prune_below(first_kept);
        }
        Ok(victims.len() as u64)
    }

    /// Flushes everything, stops the flusher and persists the indexes.
    pub async fn close(&self) -> Result<(), StorageError> {
        let log = &self.inner.log;
        log.begin_close();
        log.flusher_wake.notify_all();
        let handle = self.inner.flusher.borrow_mut().take();
        if let Some(h) = handle {
            h.await;
        }
        log.changed
            .wait_until(|| log.marks().inflight_writes == 0)
            .await;
        if let Some(e) = log.poisoned_error() {
            return Err(e);
        }
        let m = log.marks();
        let (durable, record_end) = (m.durable.0, m.durable_record_end.0);
        self.inner.persist_indexes(durable);
        let handle = self.inner.checkpointer.borrow_mut().take();
        if let Some(h) = handle {
            h.await;
        }
        // A clean stop leaves a checkpoint covering the whole log.
        let ckpt = &self.inner.checkpoint;
        if record_end > ckpt.position() {
            ckpt.store(record_end)
                .await
                .map_err(|e| StorageError::io("write checkpoint", ckpt.path.clone(), e))?;
            self.inner.checkpoints.set(self.inner.checkpoints.get() + 1);
        }
        Ok(())
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

impl<B: StorageBackend> Inner<B> {
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
/// `persist_indexes(durable)` appends the consume-queue entries that became durable to their
/// files first. It used to run after every fdatasync inside the flush leader, whose blocking
/// `std::fs` writes then delayed the acks of that very sync; here it runs once per interval,
/// batched, after the acks were released.
async fn run_checkpointer<B: StorageBackend>(
    log: Rc<CommitLog<B>>,
    ckpt: Rc<Checkpoint<B::File>>,
    count: Rc<Cell<u64>>,
    persist_indexes: impl Fn(u64),
) {
    let interval = Duration::from_millis(CHECKPOINT_INTERVAL_MS);
    let stop = || log.marks().stopped();
    loop {
        log.durable_changed
            .wait_until(|| stop() || log.marks().durable_record_end.0 > ckpt.position())
            .await;
        if stop() {
            break;
        }
        let m = log.marks();
        let (pos, durable) = (m.durable_record_end.0, m.durable.0);
        persist_indexes(durable);
        if let Err(e) = ckpt.store(pos).await {
            log.poison(format!(
                "writing the durable checkpoint {}: {e}",
                ckpt.path.display()
            ));
            break;
        }
        count.set(count.get() + 1);
        futures_lite::future::or(glommio::timer::sleep(interval), async {
            log.durable_changed.wait_until(stop).await
        })
        .await;
    }
}

/// Makes every consume-queue file match the log (the log is the truth).
fn reconcile_index_files(
    dir: &Path,
    idx: &mut Indexes,
    report: &mut RecoveryReport,
) -> Result<(), StorageError> {
    let cq_dir = dir.join("consumequeue");
    // Files of queues the log no longer has anything for are ahead of it.
    if let Ok(topics) = std::fs::read_dir(&cq_dir) {
        for t in topics.flatten() {
            let topic = t.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                let Ok(qid) = f.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if idx.queue(&topic, qid).is_none() {
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
            let file = read_cq_file(&path).map_err(|e| StorageError::io("read index", &path, e))?;
            let mut keep = 0usize;
            let mut observations = Vec::new();
            match &file {
                None => observations.push(Observation::IndexMissing),
                Some(f) => {
                    keep = f.iter().zip(&q.entries).take_while(|(a, b)| a == b).count();
                    if f.len() > keep {
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
                            (file.as_ref().map_or(0, |f| f.len()) - keep) as u64;
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
                rewrite_cq_file(&path, keep, &q.entries[keep..])
                    .map_err(|e| StorageError::io("rewrite index", &path, e))?;
            }
            q.persisted = q.entries.len();
        }
    }
    Ok(())
}
