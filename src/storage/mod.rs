//! TEMPORARY in-memory stand-in for the storage engine, replaced by the real one on merge.
#![allow(dead_code, clippy::all)]
pub mod record;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FlushMode {
    #[default]
    SyncFlush,
    AsyncFlush,
}
impl std::fmt::Display for FlushMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}",
            match self {
                FlushMode::SyncFlush => "sync_flush",
                FlushMode::AsyncFlush => "async_flush",
            }
        )
    }
}
impl std::str::FromStr for FlushMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync_flush" => Ok(Self::SyncFlush),
            "async_flush" => Ok(Self::AsyncFlush),
            _ => Err(format!("bad flush mode {s}")),
        }
    }
}
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub segment_bytes: u64,
    pub flush_mode: FlushMode,
    pub flush_interval_ms: u64,
    pub flush_bytes: u64,
}
impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_bytes: 1 << 30,
            flush_mode: FlushMode::SyncFlush,
            flush_interval_ms: 500,
            flush_bytes: 4 << 20,
        }
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition(pub u64);
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueOffset(pub u64);
impl std::fmt::Display for QueueOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("offset {requested} out of range {min}..{end}")]
    OffsetOutOfRange { requested: u64, min: u64, end: u64 },
    #[error("out of order")]
    OutOfOrderSequence { expected: u32, got: u32 },
    #[error("too large")]
    RecordTooLarge { size: u64, max: u64 },
    #[error("io")]
    Other,
}
pub struct AppendRequest<'a> {
    pub topic: &'a str,
    pub queue_id: u32,
    pub message_count: u32,
    pub producer: Option<ProducerSeq>,
    pub body: &'a [u8],
}
#[derive(Clone, Copy)]
pub struct ProducerSeq {
    pub producer_id: u64,
    pub epoch: u16,
    pub base_sequence: u32,
}
pub struct Appended {
    pub base_offset: QueueOffset,
    pub count: u32,
    pub position: LogPosition,
    pub end: LogPosition,
    pub duplicate: bool,
}
pub struct ReadBatch {
    pub records: Bytes,
    pub next_offset: QueueOffset,
    pub min_offset: QueueOffset,
    pub end_offset: QueueOffset,
}
pub struct QueueStats {
    pub min_offset: QueueOffset,
    pub end_offset: QueueOffset,
    pub bytes: u64,
}
pub struct RecoveryReport;
impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stub")
    }
}
#[derive(Clone, Default)]
pub struct ShardStore {
    q: Rc<RefCell<HashMap<(String, u32), Vec<(u64, u32, Bytes)>>>>,
    seqs: Rc<RefCell<HashMap<(u64, String, u32), (u32, u64)>>>,
}
impl ShardStore {
    pub async fn open(
        _dir: &Path,
        _cfg: StorageConfig,
    ) -> Result<(ShardStore, RecoveryReport), StorageError> {
        Ok((ShardStore::default(), RecoveryReport))
    }
    pub async fn append(&self, req: AppendRequest<'_>) -> Result<Appended, StorageError> {
        let key = (req.topic.to_string(), req.queue_id);
        if let Some(p) = req.producer {
            let k = (p.producer_id, req.topic.to_string(), req.queue_id);
            if let Some((next, off)) = self.seqs.borrow().get(&k).copied() {
                if p.base_sequence < next {
                    return Ok(Appended {
                        base_offset: QueueOffset(off),
                        count: req.message_count,
                        position: LogPosition(0),
                        end: LogPosition(0),
                        duplicate: true,
                    });
                }
                if p.base_sequence > next {
                    return Err(StorageError::OutOfOrderSequence {
                        expected: next,
                        got: p.base_sequence,
                    });
                }
            }
        }
        let mut q = self.q.borrow_mut();
        let v = q.entry(key).or_default();
        let base = v.last().map(|(b, c, _)| b + *c as u64).unwrap_or(0);
        let h = record::RecordHeader {
            queue_id: req.queue_id,
            base_queue_offset: base,
            message_count: req.message_count,
            ..Default::default()
        };
        v.push((
            base,
            req.message_count,
            Bytes::from(record::encode_record(h, req.topic, req.body)),
        ));
        if let Some(p) = req.producer {
            self.seqs.borrow_mut().insert(
                (p.producer_id, req.topic.to_string(), req.queue_id),
                (p.base_sequence + req.message_count, base),
            );
        }
        Ok(Appended {
            base_offset: QueueOffset(base),
            count: req.message_count,
            position: LogPosition(0),
            end: LogPosition(0),
            duplicate: false,
        })
    }
    pub async fn wait_durable(&self, _end: LogPosition) -> Result<(), StorageError> {
        Ok(())
    }
    pub async fn read(
        &self,
        topic: &str,
        queue_id: u32,
        offset: QueueOffset,
        _max: u32,
    ) -> Result<ReadBatch, StorageError> {
        let s = self.queue_stats(topic, queue_id);
        if offset.0 >= s.end_offset.0 {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset.0,
                min: 0,
                end: s.end_offset.0,
            });
        }
        let q = self.q.borrow();
        let v = &q[&(topic.to_string(), queue_id)];
        let mut out = Vec::new();
        let mut next = offset.0;
        for (b, c, r) in v {
            if b + *c as u64 > offset.0 {
                out.extend_from_slice(r);
                next = b + *c as u64;
            }
        }
        Ok(ReadBatch {
            records: Bytes::from(out),
            next_offset: QueueOffset(next),
            min_offset: QueueOffset(0),
            end_offset: s.end_offset,
        })
    }
    pub async fn wait_visible_beyond(&self, topic: &str, queue_id: u32, offset: QueueOffset) {
        while self.queue_stats(topic, queue_id).end_offset.0 <= offset.0 {
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    pub fn queue_stats(&self, topic: &str, queue_id: u32) -> QueueStats {
        let q = self.q.borrow();
        let end = q
            .get(&(topic.to_string(), queue_id))
            .and_then(|v| v.last().map(|(b, c, _)| b + *c as u64))
            .unwrap_or(0);
        QueueStats {
            min_offset: QueueOffset(0),
            end_offset: QueueOffset(end),
            bytes: 0,
        }
    }
    pub async fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }
}
