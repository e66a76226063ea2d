//! The index snapshot: what the indexes held after exactly the records below a log position
//! `P`, so that a restart reads the consume-queue files and this file instead of scanning the
//! whole log, and scans only from `P` (issue 11 item 1: a 4.3 GB log took 17 s to open).
//!
//! # File `<shard>/index.snapshot`
//! ```text
//! magic u32 | version u32 | position u64 | flags u32 (bit 0: clean close) | next_uid u32
//! | queues u32 | producers u32
//! queues × ( topic_len u16 | topic | queue_id u32 | uid u32 | next_offset u64 | count u64
//!            | first CqEntry (28 B) | last CqEntry (28 B) )          zeros when count = 0
//! producers × ( producer_id u64 | queue_uid u32 | epoch u16 | batches u16
//!               | batches × (base_seq u32 | count u32 | base_offset u64 | position u64 | end u64) )
//! crc32 u32 over everything before it
//! ```
//! all little-endian. Written as `index.snapshot.tmp` + fsync + rename + directory fsync, on a
//! blocking thread (never on the shard's executor), after the consume-queue files it relies on
//! were fsynced: the queue files are otherwise never synced (losing them only costs a rebuild),
//! but a snapshot trusts their first `count` entries.
//!
//! # When it is used
//! Only when every check holds, else the whole log is scanned as before (and a line says why):
//! the file decodes and its CRC matches; `P` is at or below the durable checkpoint (so every
//! record below `P` was durable); `P` lies inside the log; each queue file still holds the
//! snapshot's `count` entries, starting with `first` and ending with `last`. The key index is
//! not in the snapshot: a background check rebuilds it from the records below `P` while the
//! shard serves, verifying their CRCs (see `ShardStore::background_check`).
//!
//! # What "after exactly the records below P" means
//! The in-memory indexes already hold records appended past `P` (not yet checkpointed). The
//! snapshot leaves them out, so that the scan from `P` applies each record once:
//! - a queue keeps its entries that start below `P`; its next offset is the first later
//!   entry's base offset (that record got the offset that was next at its append);
//! - a producer window keeps its batches that end at or below `P`. That is the state after the
//!   records below `P`: a later batch either evicted the oldest ones (re-applying it evicts the
//!   same ones again) or started a newer epoch, which had cleared the window (so no batch below
//!   `P` is left, and the producer is left out).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::storage::backend::sync_dir;
use crate::storage::index::consume_queue::{cq_path, read_cq_file, CqEntry, CQ_ENTRY_BYTES};
use crate::storage::index::producer::BatchMeta;
use crate::storage::index::{consume_queue::QueueIndex, Indexes};

/// Name of the snapshot file inside a shard's storage directory.
pub const SNAPSHOT_FILE: &str = "index.snapshot";

const MAGIC: u32 = 0x534E_4D52; // "RMNS" little-endian
const VERSION: u32 = 1;

/// One queue in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueSnap {
    pub topic: String,
    pub queue_id: u32,
    pub uid: u32,
    pub next_offset: u64,
    pub count: u64,
    pub first: Option<CqEntry>,
    pub last: Option<CqEntry>,
}

/// One idempotent producer's window on one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProducerSnap {
    pub producer_id: u64,
    pub queue_uid: u32,
    pub epoch: u16,
    pub batches: Vec<BatchMeta>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexSnapshot {
    /// A record boundary: the snapshot holds exactly the records below it.
    pub position: u64,
    /// Written by a clean close at the log end (see `recovery.rs`: the open then skips
    /// reading the zeros after the log end).
    pub clean_close: bool,
    pub next_uid: u32,
    pub queues: Vec<QueueSnap>,
    pub producers: Vec<ProducerSnap>,
}

impl IndexSnapshot {
    /// The state of `idx` after exactly the records below `position` (see the module doc).
    pub fn take(idx: &Indexes, position: u64) -> IndexSnapshot {
        let mut queues = Vec::new();
        for (topic, qs) in &idx.topics {
            for (&queue_id, q) in qs {
                let count = q.entries.partition_point(|e| e.position < position);
                let next_offset = q
                    .entries
                    .get(count)
                    .map_or(q.next_offset, |e| e.base_offset);
                if count == 0 && next_offset == 0 {
                    continue;
                }
                queues.push(QueueSnap {
                    topic: topic.clone(),
                    queue_id,
                    uid: q.uid,
                    next_offset,
                    count: count as u64,
                    first: q.entries[..count].first().copied(),
                    last: q.entries[..count].last().copied(),
                });
            }
        }
        let producers = idx
            .producers
            .states()
            .filter_map(|(producer_id, queue_uid, epoch, batches)| {
                let kept: Vec<BatchMeta> = batches
                    .iter()
                    .filter(|b| b.end <= position)
                    .copied()
                    .collect();
                (!kept.is_empty()).then_some(ProducerSnap {
                    producer_id,
                    queue_uid,
                    epoch,
                    batches: kept,
                })
            })
            .collect();
        IndexSnapshot {
            position,
            clean_close: false,
            next_uid: idx.next_uid,
            queues,
            producers,
        }
    }

    /// Consume-queue files this snapshot relies on (to be fsynced before it is written).
    pub fn queue_files(&self, dir: &Path) -> Vec<PathBuf> {
        self.queues
            .iter()
            .filter(|q| q.count > 0)
            .map(|q| cq_path(dir, &q.topic, q.queue_id))
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.queues.len() * 96 + self.producers.len() * 64);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.position.to_le_bytes());
        b.extend_from_slice(&u32::from(self.clean_close).to_le_bytes());
        b.extend_from_slice(&self.next_uid.to_le_bytes());
        b.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        for q in &self.queues {
            b.extend_from_slice(&(q.topic.len() as u16).to_le_bytes());
            b.extend_from_slice(q.topic.as_bytes());
            b.extend_from_slice(&q.queue_id.to_le_bytes());
            b.extend_from_slice(&q.uid.to_le_bytes());
            b.extend_from_slice(&q.next_offset.to_le_bytes());
            b.extend_from_slice(&q.count.to_le_bytes());
            for e in [q.first, q.last] {
                b.extend_from_slice(&e.map_or([0; CQ_ENTRY_BYTES], |e| e.encode()));
            }
        }
        for p in &self.producers {
            b.extend_from_slice(&p.producer_id.to_le_bytes());
            b.extend_from_slice(&p.queue_uid.to_le_bytes());
            b.extend_from_slice(&p.epoch.to_le_bytes());
            b.extend_from_slice(&(p.batches.len() as u16).to_le_bytes());
            for m in &p.batches {
                b.extend_from_slice(&m.base_seq.to_le_bytes());
                b.extend_from_slice(&m.count.to_le_bytes());
                b.extend_from_slice(&m.base_offset.to_le_bytes());
                b.extend_from_slice(&m.position.to_le_bytes());
                b.extend_from_slice(&m.end.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a snapshot file; any damage is an error (the caller then scans the whole log).
    pub fn decode(b: &[u8]) -> Result<IndexSnapshot, String> {
        if b.len() < 4 {
            return Err("shorter than its checksum".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader { b: body, at: 0 };
        if r.u32()? != MAGIC {
            return Err("not an index snapshot (bad magic)".into());
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("unknown snapshot version {version}"));
        }
        let position = r.u64()?;
        let flags = r.u32()?;
        if flags > 1 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let next_uid = r.u32()?;
        let nq = r.u32()? as usize;
        let np = r.u32()? as usize;
        let mut queues = Vec::with_capacity(nq.min(1 << 16));
        for _ in 0..nq {
            let len = r.u16()? as usize;
            let topic = String::from_utf8(r.take(len)?.to_vec())
                .map_err(|_| "topic name is not UTF-8".to_string())?;
            let queue_id = r.u32()?;
            let uid = r.u32()?;
            let next_offset = r.u64()?;
            let count = r.u64()?;
            let mut entry = || -> Result<CqEntry, String> {
                Ok(CqEntry::decode(
                    r.take(CQ_ENTRY_BYTES)?.try_into().expect("exact length"),
                ))
            };
            let (first, last) = (entry()?, entry()?);
            let (first, last) = if count == 0 {
                (None, None)
            } else {
                (Some(first), Some(last))
            };
            queues.push(QueueSnap {
                topic,
                queue_id,
                uid,
                next_offset,
                count,
                first,
                last,
            });
        }
        let mut producers = Vec::with_capacity(np.min(1 << 16));
        for _ in 0..np {
            let producer_id = r.u64()?;
            let queue_uid = r.u32()?;
            let epoch = r.u16()?;
            let n = r.u16()? as usize;
            let mut batches = Vec::with_capacity(n);
            for _ in 0..n {
                batches.push(BatchMeta {
                    base_seq: r.u32()?,
                    count: r.u32()?,
                    base_offset: r.u64()?,
                    position: r.u64()?,
                    end: r.u64()?,
                });
            }
            producers.push(ProducerSnap {
                producer_id,
                queue_uid,
                epoch,
                batches,
            });
        }
        if r.at != body.len() {
            return Err(format!("{} trailing bytes", body.len() - r.at));
        }
        Ok(IndexSnapshot {
            position,
            clean_close: flags == 1,
            next_uid,
            queues,
            producers,
        })
    }

    /// Rebuilds the indexes (all but the key index) from this snapshot and the consume-queue
    /// files under `dir`. Entries below `log_start` (segments dropped after the snapshot) are
    /// left out. Also returns the queue files as read, so that reconciliation does not read
    /// them again. An error says why the snapshot does not fit the files.
    #[allow(clippy::type_complexity)]
    pub fn restore(
        self,
        dir: &Path,
        log_start: u64,
    ) -> Result<(Indexes, HashMap<PathBuf, Vec<CqEntry>>), String> {
        let mut idx = Indexes {
            next_uid: self.next_uid,
            ..Indexes::default()
        };
        let mut files = HashMap::new();
        for q in self.queues {
            if q.uid > self.next_uid {
                return Err(format!(
                    "queue {}/{} has uid {} past next_uid",
                    q.topic, q.queue_id, q.uid
                ));
            }
            let mut qi = QueueIndex::new(q.uid);
            qi.next_offset = q.next_offset;
            if let (Some(first), Some(last)) = (q.first, q.last) {
                let path = cq_path(dir, &q.topic, q.queue_id);
                let file = read_cq_file(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?
                    .ok_or_else(|| format!("{} is missing", path.display()))?;
                let i0 = file.partition_point(|e| e.position < first.position);
                let n = q.count as usize;
                let fits = file.get(i0) == Some(&first)
                    && i0.checked_add(n).is_some_and(|end| end <= file.len())
                    && file[i0 + n - 1] == last;
                if !fits {
                    return Err(format!(
                        "{} does not hold the {n} entries the snapshot names",
                        path.display()
                    ));
                }
                for e in file[i0..i0 + n].iter().filter(|e| e.position >= log_start) {
                    qi.push(*e);
                }
                qi.next_offset = q.next_offset;
                files.insert(path, file);
            }
            idx.topics
                .entry(q.topic)
                .or_default()
                .insert(q.queue_id, qi);
        }
        for p in self.producers {
            let kept: Vec<BatchMeta> = p
                .batches
                .into_iter()
                .filter(|b| b.position >= log_start)
                .collect();
            idx.producers
                .restore(p.producer_id, p.queue_uid, p.epoch, kept);
        }
        Ok((idx, files))
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| "truncated".to_string())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// Reads `<dir>/index.snapshot`; `None` when there is none.
pub(crate) fn read_snapshot(dir: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `<dir>/index.snapshot` (so that the next open scans the whole log).
pub(crate) fn remove_snapshot(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(SNAPSHOT_FILE)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Blocking: fsyncs `queue_files`, then writes `bytes` as `<dir>/index.snapshot` atomically.
/// Run it on a blocking thread.
pub(crate) fn write_snapshot(dir: &Path, bytes: &[u8], queue_files: &[PathBuf]) -> io::Result<()> {
    for f in queue_files {
        File::open(f)?.sync_data()?;
    }
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IndexSnapshot {
        let e = |p: u64, o: u64| CqEntry {
            position: p,
            size: 100,
            base_offset: o,
            count: 2,
            tag_hash: 7,
        };
        IndexSnapshot {
            position: 4096,
            clean_close: true,
            next_uid: 3,
            queues: vec![
                QueueSnap {
                    topic: "orders".into(),
                    queue_id: 1,
                    uid: 1,
                    next_offset: 4,
                    count: 2,
                    first: Some(e(0, 0)),
                    last: Some(e(100, 2)),
                },
                QueueSnap {
                    topic: "gaps".into(),
                    queue_id: 0,
                    uid: 2,
                    next_offset: 9,
                    count: 0,
                    first: None,
                    last: None,
                },
            ],
            producers: vec![ProducerSnap {
                producer_id: 42,
                queue_uid: 1,
                epoch: 3,
                batches: vec![BatchMeta {
                    base_seq: 10,
                    count: 2,
                    base_offset: 0,
                    position: 0,
                    end: 100,
                }],
            }],
        }
    }

    /// Records of two queues and one idempotent producer whose window overflows and whose
    /// epoch changes: (topic, header) in log order, each 100 bytes.
    fn history() -> Vec<(&'static str, crate::format::record::RecordHeader)> {
        use crate::format::record::{RecordHeader, FLAG_IDEMPOTENT};
        use crate::storage::index::producer::PRODUCER_WINDOW_BATCHES;
        let mut out = Vec::new();
        let mut next = [0u64; 2];
        let mut seq = 0u32;
        for i in 0..(PRODUCER_WINDOW_BATCHES as u32 * 3) {
            let q = (i % 2) as usize;
            let epoch = if i < PRODUCER_WINDOW_BATCHES as u32 * 2 {
                1
            } else {
                2
            };
            if i == PRODUCER_WINDOW_BATCHES as u32 * 2 {
                seq = 0;
            }
            let idem = q == 0;
            let h = RecordHeader {
                total_len: 100,
                crc32: 0,
                topic_len: 1,
                flags: if idem { FLAG_IDEMPOTENT } else { 0 },
                queue_id: q as u32,
                base_queue_offset: next[q],
                message_count: 2,
                store_timestamp_ms: 0,
                producer_id: if idem { 9 } else { 0 },
                producer_epoch: epoch,
                base_sequence: if idem { seq } else { 0 },
                log_position: u64::from(i) * 100,
            };
            if idem {
                seq += 2;
            }
            next[q] += 2;
            out.push(("t", h));
        }
        out
    }

    /// The property the module doc argues: restoring a snapshot at `P` (taken after later
    /// records were applied) and applying the records from `P` on gives the same indexes as
    /// applying every record, for every `P`, window evictions and an epoch change included.
    #[test]
    fn restoring_a_snapshot_and_applying_the_rest_equals_applying_everything() {
        let h = history();
        let end = h.len() as u64 * 100;
        let mut all = Indexes::default();
        for (t, r) in &h {
            all.apply(t, r, b"");
        }
        let dir = tempfile::tempdir().unwrap();
        for (topic, qs) in all.topics.iter_mut() {
            for (qid, q) in qs.iter_mut() {
                q.persist(&cq_path(dir.path(), topic, *qid), end).unwrap();
            }
        }
        // Queue uids are internal (a queue first seen past `P` gets a new one): compare by
        // queue id.
        let normal = |mut s: IndexSnapshot| {
            let ids: HashMap<u32, u32> = s.queues.iter().map(|q| (q.uid, q.queue_id)).collect();
            for q in &mut s.queues {
                q.uid = q.queue_id;
            }
            for p in &mut s.producers {
                p.queue_uid = ids[&p.queue_uid];
            }
            s.next_uid = 0;
            s.queues.sort_by_key(|q| q.queue_id);
            s.producers.sort_by_key(|p| p.queue_uid);
            s
        };
        let want = normal(IndexSnapshot::take(&all, end));
        assert_eq!(want.producers.len(), 1);
        for cut in (0..=h.len()).step_by(5).chain([h.len()]) {
            let p = cut as u64 * 100;
            let snap = IndexSnapshot::decode(&IndexSnapshot::take(&all, p).encode()).unwrap();
            let (mut idx, _) = snap.restore(dir.path(), 0).unwrap();
            for (t, r) in &h[cut..] {
                idx.apply(t, r, b"");
            }
            assert_eq!(normal(IndexSnapshot::take(&idx, end)), want, "cut at {p}");
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_any_damage_is_refused() {
        let s = sample();
        let b = s.encode();
        assert_eq!(IndexSnapshot::decode(&b), Ok(s));
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(IndexSnapshot::decode(&c).is_err(), "flip at {i} accepted");
        }
        for n in 0..b.len() {
            assert!(
                IndexSnapshot::decode(&b[..n]).is_err(),
                "prefix {n} accepted"
            );
        }
    }
}
