//! The log as a stream of raw records, for replication.
//!
//! Master side: [`ShardStore::tail_take`] hands out records appended since the stream caught up,
//! straight from memory (a [`TailFeed`] filled by `append`), so a caught-up replica receives a
//! record while the master's own write and fdatasync are still under way; a replica that is
//! behind reads the log with [`ShardStore::read_log`], in large reads, below `written`.
//!
//! Replica side: [`ShardStore::append_replicated`] appends records exactly as the master wrote
//! them, at the same log positions, after checking their CRCs and that they continue this log.

use bytes::Bytes;

use crate::format::record::{RecordHeader, RecordView, HEADER_BYTES};
use crate::storage::backend::StorageBackend;
use crate::storage::error::StorageError;
use crate::storage::store::ShardStore;
use crate::storage::tail_feed::TailFeed;
use crate::storage::LogPosition;

/// Whole records starting at `position` (empty when nothing is available there yet).
#[derive(Debug, Clone)]
pub struct LogChunk {
    pub position: LogPosition,
    pub bytes: Bytes,
    /// Where the next read starts (past this chunk, or past a segment's unused tail).
    pub next: LogPosition,
}

impl<B: StorageBackend> ShardStore<B> {
    /// Starts keeping appended records in memory for a stream that has sent everything below
    /// `at`, if `at` is the append position now (returns false otherwise: the stream must read
    /// the log first). At most `max_bytes` are kept.
    pub fn tail_feed_start(&self, at: LogPosition, max_bytes: usize) -> bool {
        if self.inner.log.marks().appended != at {
            return false;
        }
        *self.inner.feed.borrow_mut() = TailFeed::starting_at(at.0, max_bytes);
        true
    }

    pub fn tail_feed_stop(&self) {
        *self.inner.feed.borrow_mut() = TailFeed::default();
    }

    /// Whether the feed holds every record from `from` on.
    pub fn tail_feed_covers(&self, from: LogPosition) -> bool {
        self.inner.feed.borrow().covers(from.0)
    }

    /// The next run of records at or after `from` from memory, if the feed covers `from` and has
    /// one.
    pub fn tail_take(&self, from: LogPosition) -> Option<LogChunk> {
        let (position, run) = self.inner.feed.borrow_mut().take(from.0)?;
        let next = position + run.len() as u64;
        Some(LogChunk {
            position: LogPosition(position),
            bytes: run.freeze(),
            next: LogPosition(next),
        })
    }

    /// Resolves once something is appended at or beyond `pos` (or the log is closing).
    pub async fn wait_appended_beyond(&self, pos: LogPosition) {
        let log = &self.inner.log;
        self.inner
            .appended
            .wait_until(|| {
                let m = log.marks();
                m.appended > pos || m.stopped()
            })
            .await
    }

    /// Resolves once bytes beyond `pos` are written to the log files (starting the write of
    /// buffered bytes now rather than at the next flush), or the log is closing.
    pub async fn wait_written_beyond(&self, pos: LogPosition) {
        let log = &self.inner.log;
        if log.marks().written <= pos {
            log.hand_off_partial(false);
        }
        log.changed
            .wait_until(|| {
                let m = log.marks();
                m.written > pos || m.stopped()
            })
            .await
    }

    /// Whole records starting at `from`, read from the log files, at most `max_bytes` (but at
    /// least one record), never past `written`. At the unused tail of a segment the chunk is
    /// empty and `next` is the next segment's start.
    pub async fn read_log(
        &self,
        from: LogPosition,
        max_bytes: usize,
    ) -> Result<LogChunk, StorageError> {
        let log = &self.inner.log;
        if let Some(e) = log.poisoned_error() {
            return Err(e);
        }
        let marks = log.marks();
        let Some((seg_base, seg_end)) = log.segment_of(from) else {
            return Err(StorageError::OffsetOutOfRange {
                requested: from.0,
                min: log.first_segment_base().0,
                end: marks.appended.0,
            });
        };
        let (seg_base, seg_end, written) = (seg_base.0, seg_end.0, marks.written.0);
        debug_assert!(from.0 >= seg_base);
        let empty = |next: u64| LogChunk {
            position: from,
            bytes: Bytes::new(),
            next: LogPosition(next),
        };
        let limit = written.min(seg_end);
        if from.0 >= limit {
            // At the end of a finished segment the stream moves to the next one.
            let next = if from.0 == seg_end { seg_end } else { from.0 };
            return Ok(empty(next));
        }
        let mut len = ((limit - from.0) as usize).min(max_bytes.max(HEADER_BYTES));
        loop {
            let bytes = log.read_range(from, len as u32).await?;
            let mut at = 0usize;
            let mut pos = from.0;
            while at < bytes.len() {
                match RecordView::parse_at(&bytes[at..], pos) {
                    Ok(v) => {
                        at += v.bytes.len();
                        pos += v.bytes.len() as u64;
                    }
                    Err(_) => break,
                }
            }
            if at > 0 {
                return Ok(LogChunk {
                    position: from,
                    bytes: Bytes::copy_from_slice(&bytes[..at]),
                    next: LogPosition(pos),
                });
            }
            // No whole record at `from`: a record longer than this read, or the zero tail of
            // a segment the log has rolled past.
            match RecordHeader::decode(&bytes) {
                Ok(h)
                    if (h.total_len as usize) > len && from.0 + u64::from(h.total_len) <= limit =>
                {
                    len = h.total_len as usize;
                }
                _ if bytes.iter().all(|&b| b == 0) && written >= seg_end => {
                    return Ok(empty(seg_end));
                }
                Ok(_) | Err(_) => {
                    return Err(StorageError::Corrupt {
                        position: from.0,
                        detail: "no valid record where the replication stream continues".into(),
                    })
                }
            }
        }
    }

    /// Appends records a master sent, starting at `position`, exactly as they are (same log
    /// positions, same queue offsets). Checks every CRC, that each record claims the position
    /// it lands on (rolling to the next segment where the master rolled), and that its queue
    /// offsets continue the queue. Returns the new append position and the topics the records
    /// belong to. Nothing of a batch that fails a check is appended from that record on.
    pub async fn append_replicated(
        &self,
        position: LogPosition,
        bytes: &[u8],
    ) -> Result<(LogPosition, Vec<String>), StorageError> {
        let log = &self.inner.log;
        let mut topics: Vec<String> = Vec::new();
        let mut at = 0usize;
        let mut expect = position.0;
        while at < bytes.len() {
            let h = RecordHeader::decode(&bytes[at..])?;
            let claimed = h.log_position;
            let v = RecordView::parse_at(&bytes[at..], claimed)?;
            let total = v.bytes.len() as u64;
            if claimed < expect {
                return Err(StorageError::Diverged {
                    position: claimed,
                    detail: format!("records out of order: expected {expect} or later"),
                });
            }
            log.ensure_room(total).await?;
            let append_pos = log.marks().appended.0;
            if append_pos != claimed {
                return Err(StorageError::Diverged {
                    position: claimed,
                    detail: format!("this log continues at {append_pos}"),
                });
            }
            if h.is_gap() {
                // A range the master's recovery quarantined: copied as is, no messages.
                log.append_encoded(v.bytes);
                self.inner.idx.borrow_mut().apply(v.topic, &h, v.body);
                self.inner.appended.notify_all();
                at += total as usize;
                expect = claimed + total;
                continue;
            }
            {
                let mut idx = self.inner.idx.borrow_mut();
                let q = idx.queue_mut(v.topic, h.queue_id);
                // A log that begins past 0 (retention, or a reset to the master's oldest
                // segment) may not hold a queue's first records: a queue it has never seen
                // starts where the master's record says.
                let unseen = q.entries.is_empty() && q.next_offset == 0;
                if unseen && log.first_segment_base().0 > 0 {
                    q.next_offset = h.base_queue_offset;
                }
                if q.next_offset != h.base_queue_offset {
                    return Err(StorageError::Diverged {
                        position: claimed,
                        detail: format!(
                            "queue {}/{} continues at offset {}, the record starts at {}",
                            v.topic, h.queue_id, q.next_offset, h.base_queue_offset
                        ),
                    });
                }
                log.append_encoded(v.bytes);
                idx.apply(v.topic, &h, v.body);
            }
            if !topics.iter().any(|t| t == v.topic) {
                topics.push(v.topic.to_string());
            }
            self.inner.appended.notify_all();
            at += total as usize;
            expect = claimed + total;
        }
        Ok((log.marks().appended, topics))
    }
}

impl<B: StorageBackend> ShardStore<B> {
    /// Resolves once the append position passes `appended` or the durable one passes
    /// `durable` (or the log is closing): a replica's reason to acknowledge again.
    pub async fn wait_progress_beyond(&self, appended: LogPosition, durable: LogPosition) {
        let log = &self.inner.log;
        let stop = || log.marks().stopped();
        let by_append = self
            .inner
            .appended
            .wait_until(|| stop() || log.marks().appended > appended);
        let by_sync = log
            .durable_changed
            .wait_until(|| stop() || log.marks().durable > durable);
        futures_lite::future::or(by_append, by_sync).await
    }
}
