//! The producer's local spool: an append-only directory of fsync'd segment files holding the
//! batches a producer could not get acked, until a drain re-sends them.
//!
//! # Contract
//! - An append returns only after the record's bytes are written and `fdatasync`ed (and, for
//!   a new segment file, the directory too): a [`SpoolReceipt`] is never a promise of bytes
//!   still in memory. A failed write or sync poisons the spool: every later call fails with
//!   [`ClientError::Spool`], as the broker's segments do after an fdatasync error.
//! - Bounded: entries (with the space reserved for live sends that may fall back to the spool)
//!   never take the files past `max_bytes`; past it an append fails with
//!   [`ClientError::SpoolFull`]. Progress markers (`Assign`, `Acked`) are always written, even
//!   over the bound: they are small, and refusing them would stop the drain that frees space.
//! - Exactly-once through the broker's de-dup: an entry carries the producer id, epoch, queue
//!   and base sequence it is (or was) sent with. An entry spooled before any queue was known is
//!   given them at drain time by an `Assign` marker, fsync'd before its first send, so a drain
//!   after a crash re-sends it with the same ones. An `Acked` marker ends an entry; a segment
//!   file is deleted once every entry in it and in every older segment is acked (markers only
//!   name entries of their own or older segments, so no live marker is ever deleted).
//! - The identity (`identity` file: producer id and the highest epoch any run of this spool
//!   may have used) is replaced with tmp + fsync + rename + directory fsync. Each run takes a
//!   new epoch, so its fresh sequences (from 0) are never confused with an older run's.
//!
//! # Recovery at open (a decision table over each segment's records)
//! | what is read | in the newest segment | in an older segment |
//! |---|---|---|
//! | a whole record with a good CRC | applied | applied |
//! | a short head or body (torn append) | logged, truncated there | refuse to open: corruption |
//! | a CRC mismatch or an undecodable record | logged, truncated there | refuse to open: corruption |
//!
//! Only the newest segment is ever appended to, and an older one was fsync'd whole before the
//! next was created, so a bad record in it is not a torn write. Nothing past a bad record is
//! trusted or re-sent.
//!
//! # Byte layout (all integers little-endian)
//! ```text
//! record  = len: u32 (bytes of `payload`) | crc: u32 (CRC32 of `payload`) | payload
//! payload = kind: u8 | fields
//! kind 1 Entry : id u64 | count u32 | selector u8 (0 round robin, 1 key, 2 queue)
//!                | selector_queue u32 | key_len u32 | key | topic_len u16 | topic
//!                | assigned u8 | producer_id u64 | epoch u16 | queue u32 | base_sequence u32
//!                | body_len u32 | body (the message batch as the producer sends it)
//! kind 2 Assign: id u64 | producer_id u64 | epoch u16 | queue u32 | base_sequence u32
//! kind 3 Acked : n u32 | n × id u64
//! identity = "RMQSPOOL" | version u32 (1) | producer_id u64 | epoch u16 | crc u32 (of the rest)
//! ```
//! Segment files are named `<20-digit segment number>.spool`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::client::ClientError;

/// Default bound on the spool's files.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
/// Default segment file size: small enough that acked entries free space soon.
pub const DEFAULT_SPOOL_SEGMENT_BYTES: u64 = 16 << 20;
/// The record head: len + crc.
const HEAD_BYTES: usize = 8;
/// Fixed bytes of an Entry payload besides key, topic and body.
const ENTRY_FIXED_BYTES: usize = 1 + 8 + 4 + 1 + 4 + 4 + 2 + 1 + 8 + 2 + 4 + 4 + 4;
/// An `Acked` marker names at most this many entries (a longer list is split).
const ACKED_PER_MARKER: usize = 4096;
const IDENTITY_MAGIC: &[u8; 8] = b"RMQSPOOL";
const IDENTITY_VERSION: u32 = 1;
const IDENTITY_FILE: &str = "identity";
const SEGMENT_SUFFIX: &str = ".spool";

const KIND_ENTRY: u8 = 1;
const KIND_ASSIGN: u8 = 2;
const KIND_ACKED: u8 = 3;

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The spool directory (created if missing). One producer at a time per directory.
    pub dir: PathBuf,
    /// Bound on the spool's files. Default 256 MiB.
    pub max_bytes: u64,
    /// A segment file is closed and a new one started past this size. Default 16 MiB.
    pub segment_bytes: u64,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            segment_bytes: DEFAULT_SPOOL_SEGMENT_BYTES,
        }
    }
}

/// How a spooled entry's queue is chosen, kept until the drain can choose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolSelector {
    RoundRobin,
    Key(Bytes),
    Queue(u32),
}

/// What an entry is sent with; the same on every re-send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub producer_id: u64,
    pub epoch: u16,
    pub queue: u32,
    pub base_sequence: u32,
}

/// A spooled batch, read back for a drain.
#[derive(Debug, Clone)]
pub struct SpoolEntry {
    pub id: u64,
    pub topic: String,
    pub selector: SpoolSelector,
    pub count: u32,
    pub body: Bytes,
    pub assignment: Option<Assignment>,
}

/// Proof that a batch is in the spool, on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolReceipt {
    /// The entry's id in the spool (increasing in spool order).
    pub entry: u64,
    /// Messages in the entry.
    pub count: u32,
}

/// A pending entry's metadata; the body stays on disk until the drain reads it.
#[derive(Debug, Clone)]
pub struct PendingEntry {
    pub id: u64,
    pub topic: String,
    pub selector: SpoolSelector,
    pub count: u32,
    pub assignment: Option<Assignment>,
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: File,
    bytes: u64,
    /// Entries in this segment not yet acked.
    unacked: u64,
}

struct State {
    producer_id: u64,
    epoch: u16,
    segments: BTreeMap<u64, Segment>,
    pending: BTreeMap<u64, PendingEntry>,
    next_id: u64,
    next_segment: u64,
    used_bytes: u64,
    reserved_bytes: u64,
    poisoned: Option<String>,
}

/// An open spool directory. Thread-safe; appends are serialized (each with its own fsync).
pub struct Spool {
    config: SpoolConfig,
    state: Mutex<State>,
    /// `<dir>/lock`, flock'ed for as long as the spool is open: a second producer on the same
    /// directory would re-use this one's identity and sequences, and the broker's de-dup would
    /// then drop one producer's batches as the other's duplicates.
    _lock: std::fs::File,
}

/// Takes `<dir>/lock` (an exclusive, non-blocking flock), or says who holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, ClientError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| spool_err(dir, "cannot open the lock file", e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            ClientError::Spool(format!(
                "the spool {} is in use by another producer (it holds {}); one producer per \
                 spool directory",
                dir.display(),
                path.display()
            ))
        } else {
            spool_err(dir, "cannot lock", e)
        });
    }
    Ok(f)
}

fn spool_err(dir: &Path, what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Spool(format!("{what} in {}: {e}", dir.display()))
}

impl Spool {
    /// Opens (or creates) the spool in `config.dir`, replaying its segments; a torn or corrupt
    /// tail of the newest segment is logged and truncated (see the module doc).
    pub fn open(config: &SpoolConfig) -> Result<Spool, ClientError> {
        let dir = &config.dir;
        if config.segment_bytes == 0 || config.max_bytes == 0 {
            return Err(ClientError::InvalidArgument(
                "spool max_bytes and segment_bytes must be above 0".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| spool_err(dir, "cannot create the spool", e))?;
        let lock = lock_dir(dir)?;
        let (producer_id, epoch) = match read_identity(dir)? {
            Some(id) => id,
            None => {
                let id = (random_id() | 1, 0);
                write_identity(dir, id.0, id.1)?;
                id
            }
        };
        let mut numbers: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| spool_err(dir, "cannot list", e))? {
            let entry = entry.map_err(|e| spool_err(dir, "cannot list", e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(SEGMENT_SUFFIX) {
                if let Ok(n) = n.parse::<u64>() {
                    numbers.push(n);
                }
            }
        }
        numbers.sort_unstable();
        let mut st = State {
            producer_id,
            epoch,
            segments: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_id: 1,
            next_segment: numbers.last().map_or(1, |n| n + 1),
            used_bytes: 0,
            reserved_bytes: 0,
            poisoned: None,
        };
        let newest = numbers.last().copied();
        for n in numbers {
            let path = segment_path(dir, n);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| spool_err(dir, &format!("cannot open {}", path.display()), e))?;
            let bytes = replay_segment(&mut st, n, &file, &path, Some(n) == newest)?;
            st.used_bytes += bytes;
            st.segments.insert(
                n,
                Segment {
                    file,
                    bytes,
                    unacked: 0,
                },
            );
        }
        for p in st.pending.values() {
            if let Some(s) = st.segments.get_mut(&p.segment) {
                s.unacked += 1;
            }
        }
        let spool = Spool {
            config: config.clone(),
            state: Mutex::new(st),
            _lock: lock,
        };
        {
            let mut st = spool.state.lock().expect("spool lock");
            spool.collect(&mut st)?;
            if !st.pending.is_empty() {
                log::info!(
                    "spool {}: {} entr(ies) pending from an earlier run",
                    dir.display(),
                    st.pending.len()
                );
            }
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// The spool's producer id and the highest epoch recorded.
    pub fn identity(&self) -> (u64, u16) {
        let st = self.state.lock().expect("spool lock");
        (st.producer_id, st.epoch)
    }

    /// Starts a run: takes the next epoch (persisted before it is returned), and a new
    /// producer id once the epochs of this one are used up. Returns (producer id, epoch).
    pub fn begin_run(&self) -> Result<(u64, u16), ClientError> {
        let mut st = self.state.lock().expect("spool lock");
        let (pid, epoch) = if st.epoch == u16::MAX {
            // The entries pending carry their own producer id, so they still de-dup.
            (random_id() | 1, 0)
        } else {
            (st.producer_id, st.epoch + 1)
        };
        write_identity(&self.config.dir, pid, epoch)?;
        st.producer_id = pid;
        st.epoch = epoch;
        Ok((pid, epoch))
    }

    /// Records that `epoch` is in use (a lane took a new epoch), so a later run takes a
    /// newer one.
    pub fn note_epoch(&self, epoch: u16) -> Result<(), ClientError> {
        let mut st = self.state.lock().expect("spool lock");
        if epoch > st.epoch {
            write_identity(&self.config.dir, st.producer_id, epoch)?;
            st.epoch = epoch;
        }
        Ok(())
    }

    /// Entries not yet acked.
    pub fn pending_count(&self) -> usize {
        self.state.lock().expect("spool lock").pending.len()
    }

    /// Bytes of the spool's files.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().expect("spool lock").used_bytes
    }

    /// The pending entries' metadata, in spool order.
    pub fn pending(&self) -> Vec<PendingEntry> {
        let st = self.state.lock().expect("spool lock");
        st.pending.values().cloned().collect()
    }

    /// The bytes an entry of this shape takes in the spool.
    pub fn entry_bytes(topic: &str, selector: &SpoolSelector, body_len: usize) -> u64 {
        let key = match selector {
            SpoolSelector::Key(k) => k.len(),
            _ => 0,
        };
        (HEAD_BYTES + ENTRY_FIXED_BYTES + key + topic.len() + body_len) as u64
    }

    /// Reserves room for an entry of `bytes` (a live send that may fall back to the spool),
    /// so that falling back cannot fail for space; [`Spool::release`] or an append with it
    /// gives it back.
    pub fn reserve(&self, bytes: u64) -> Result<(), ClientError> {
        let mut st = self.state.lock().expect("spool lock");
        self.check_usable(&st)?;
        self.check_room(&st, bytes)?;
        st.reserved_bytes += bytes;
        Ok(())
    }

    pub fn release(&self, bytes: u64) {
        let mut st = self.state.lock().expect("spool lock");
        st.reserved_bytes = st.reserved_bytes.saturating_sub(bytes);
    }

    /// Appends one entry (fsync'd before it returns). `reserved`: bytes reserved for it by
    /// [`Spool::reserve`] (0 if none).
    pub fn append(
        &self,
        topic: &str,
        selector: &SpoolSelector,
        count: u32,
        body: &[u8],
        assignment: Option<Assignment>,
        reserved: u64,
    ) -> Result<SpoolReceipt, ClientError> {
        let mut st = self.state.lock().expect("spool lock");
        st.reserved_bytes = st.reserved_bytes.saturating_sub(reserved);
        self.check_usable(&st)?;
        if topic.len() > u16::MAX as usize {
            return Err(ClientError::InvalidArgument("topic name too long".into()));
        }
        let bytes = Self::entry_bytes(topic, selector, body.len());
        if bytes > self.config.segment_bytes {
            return Err(ClientError::InvalidArgument(format!(
                "a batch of {bytes} bytes does not fit a spool segment ({} bytes)",
                self.config.segment_bytes
            )));
        }
        self.check_room(&st, bytes)?;
        let id = st.next_id;
        let mut payload = BytesMut::with_capacity(bytes as usize);
        payload.put_u8(KIND_ENTRY);
        payload.put_u64_le(id);
        payload.put_u32_le(count);
        let (sel, sel_queue, key): (u8, u32, &[u8]) = match selector {
            SpoolSelector::RoundRobin => (0, 0, &[]),
            SpoolSelector::Key(k) => (1, 0, k),
            SpoolSelector::Queue(q) => (2, *q, &[]),
        };
        payload.put_u8(sel);
        payload.put_u32_le(sel_queue);
        payload.put_u32_le(key.len() as u32);
        payload.put_slice(key);
        payload.put_u16_le(topic.len() as u16);
        payload.put_slice(topic.as_bytes());
        let a = assignment.unwrap_or(Assignment {
            producer_id: 0,
            epoch: 0,
            queue: 0,
            base_sequence: 0,
        });
        payload.put_u8(u8::from(assignment.is_some()));
        payload.put_u64_le(a.producer_id);
        payload.put_u16_le(a.epoch);
        payload.put_u32_le(a.queue);
        payload.put_u32_le(a.base_sequence);
        payload.put_u32_le(body.len() as u32);
        payload.put_slice(body);
        let (segment, offset) = self.write_record(&mut st, &payload)?;
        st.next_id += 1;
        st.segments
            .get_mut(&segment)
            .expect("written segment")
            .unacked += 1;
        st.pending.insert(
            id,
            PendingEntry {
                id,
                topic: topic.to_string(),
                selector: selector.clone(),
                count,
                assignment,
                segment,
                offset,
                len: payload.len() as u32,
            },
        );
        Ok(SpoolReceipt { entry: id, count })
    }

    /// Reads a pending entry back (with its body).
    pub fn read(&self, id: u64) -> Result<SpoolEntry, ClientError> {
        let st = self.state.lock().expect("spool lock");
        let p = st
            .pending
            .get(&id)
            .ok_or_else(|| ClientError::Spool(format!("entry {id} is not pending")))?;
        let seg = st
            .segments
            .get(&p.segment)
            .expect("pending entry's segment");
        let mut buf = vec![0u8; p.len as usize];
        seg.file
            .read_exact_at(&mut buf, p.offset + HEAD_BYTES as u64)
            .map_err(|e| spool_err(&self.config.dir, &format!("cannot read entry {id}"), e))?;
        match decode(&buf) {
            Some(Record::Entry(mut e)) if e.id == id => {
                e.assignment = p.assignment;
                Ok(e)
            }
            _ => Err(ClientError::Spool(format!(
                "entry {id} in segment {} of {} changed on disk",
                p.segment,
                self.config.dir.display()
            ))),
        }
    }

    /// Records the queue and sequence each entry will be sent with, in one fsync'd marker
    /// per entry before any of them is sent.
    pub fn record_assign(&self, assigned: &[(u64, Assignment)]) -> Result<(), ClientError> {
        if assigned.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock().expect("spool lock");
        self.check_usable(&st)?;
        let mut buf = BytesMut::new();
        for (id, a) in assigned {
            let mut p = BytesMut::with_capacity(32);
            p.put_u8(KIND_ASSIGN);
            p.put_u64_le(*id);
            p.put_u64_le(a.producer_id);
            p.put_u16_le(a.epoch);
            p.put_u32_le(a.queue);
            p.put_u32_le(a.base_sequence);
            put_record(&mut buf, &p);
        }
        self.write_bytes(&mut st, &buf)?;
        for (id, a) in assigned {
            if let Some(p) = st.pending.get_mut(id) {
                p.assignment = Some(*a);
            }
        }
        Ok(())
    }

    /// Records that the broker acked these entries, and deletes the segments that no longer
    /// hold anything pending.
    pub fn record_acked(&self, ids: &[u64]) -> Result<(), ClientError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock().expect("spool lock");
        self.check_usable(&st)?;
        let mut buf = BytesMut::new();
        for chunk in ids.chunks(ACKED_PER_MARKER) {
            let mut p = BytesMut::with_capacity(5 + 8 * chunk.len());
            p.put_u8(KIND_ACKED);
            p.put_u32_le(chunk.len() as u32);
            for id in chunk {
                p.put_u64_le(*id);
            }
            put_record(&mut buf, &p);
        }
        self.write_bytes(&mut st, &buf)?;
        for id in ids {
            if let Some(p) = st.pending.remove(id) {
                if let Some(s) = st.segments.get_mut(&p.segment) {
                    s.unacked -= 1;
                }
            }
        }
        self.collect(&mut st)
    }

    fn check_usable(&self, st: &State) -> Result<(), ClientError> {
        match &st.poisoned {
            Some(why) => Err(ClientError::Spool(format!(
                "the spool in {} failed earlier and takes no more writes: {why}",
                self.config.dir.display()
            ))),
            None => Ok(()),
        }
    }

    fn check_room(&self, st: &State, bytes: u64) -> Result<(), ClientError> {
        if st.used_bytes + st.reserved_bytes + bytes > self.config.max_bytes {
            return Err(ClientError::SpoolFull {
                dir: self.config.dir.display().to_string(),
                max_bytes: self.config.max_bytes,
                used_bytes: st.used_bytes + st.reserved_bytes,
                entries: st.pending.len() as u64,
            });
        }
        Ok(())
    }

    /// Writes one record; returns (segment, offset of its head).
    fn write_record(&self, st: &mut State, payload: &[u8]) -> Result<(u64, u64), ClientError> {
        let mut buf = BytesMut::with_capacity(HEAD_BYTES + payload.len());
        put_record(&mut buf, payload);
        self.write_bytes(st, &buf)
    }

    /// Writes whole records into the newest segment (a new one when they would take it past
    /// `segment_bytes`) and fdatasyncs. Returns (segment, offset of the first byte).
    fn write_bytes(&self, st: &mut State, buf: &[u8]) -> Result<(u64, u64), ClientError> {
        let dir = &self.config.dir;
        let need_new = match st.segments.last_key_value() {
            None => true,
            Some((_, s)) => s.bytes > 0 && s.bytes + buf.len() as u64 > self.config.segment_bytes,
        };
        if need_new {
            let n = st.next_segment;
            let path = segment_path(dir, n);
            let created = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|f| sync_dir(dir).map(|_| f));
            let file = match created {
                Ok(f) => f,
                Err(e) => {
                    let e = spool_err(dir, &format!("cannot create {}", path.display()), e);
                    st.poisoned = Some(e.to_string());
                    return Err(e);
                }
            };
            st.next_segment += 1;
            st.segments.insert(
                n,
                Segment {
                    file,
                    bytes: 0,
                    unacked: 0,
                },
            );
        }
        let (&n, seg) = st.segments.last_key_value().expect("a segment");
        let offset = seg.bytes;
        let written = seg
            .file
            .write_all_at(buf, offset)
            .and_then(|_| seg.file.sync_data());
        if let Err(e) = written {
            // Whether the bytes are on disk is unknown: refuse to go on (as the broker does
            // after an fdatasync error) rather than ack from a page cache that may be gone.
            let e = spool_err(dir, &format!("cannot write segment {n}"), e);
            st.poisoned = Some(e.to_string());
            return Err(e);
        }
        let seg = st.segments.get_mut(&n).expect("a segment");
        seg.bytes += buf.len() as u64;
        st.used_bytes += buf.len() as u64;
        Ok((n, offset))
    }

    /// Deletes the oldest segments while nothing in them (or before them) is pending; all of
    /// them once nothing is pending at all.
    fn collect(&self, st: &mut State) -> Result<(), ClientError> {
        let dir = &self.config.dir;
        let everything = st.pending.is_empty();
        let newest = st.segments.last_key_value().map(|(n, _)| *n);
        let mut removed = Vec::new();
        for (&n, s) in &st.segments {
            if s.unacked > 0 || (!everything && Some(n) == newest) {
                break;
            }
            removed.push(n);
        }
        for n in removed {
            let seg = st.segments.remove(&n).expect("segment");
            st.used_bytes -= seg.bytes;
            drop(seg);
            let path = segment_path(dir, n);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    let e = spool_err(dir, &format!("cannot delete {}", path.display()), e);
                    st.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// A random producer id (std's SipHash keys are random per process; the producer module has
/// the same trick, not imported here so the two modules stay layered).
fn random_id() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}{SEGMENT_SUFFIX}"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn put_record(buf: &mut BytesMut, payload: &[u8]) {
    buf.put_u32_le(payload.len() as u32);
    buf.put_u32_le(crc32fast::hash(payload));
    buf.put_slice(payload);
}

enum Record {
    Entry(SpoolEntry),
    Assign(u64, Assignment),
    Acked(Vec<u64>),
}

/// Decodes a payload whose CRC matched; `None` when it is not a well-formed record.
fn decode(mut p: &[u8]) -> Option<Record> {
    fn need(p: &[u8], n: usize) -> Option<()> {
        (p.remaining() >= n).then_some(())
    }
    need(p, 1)?;
    match p.get_u8() {
        KIND_ENTRY => {
            need(p, 8 + 4 + 1 + 4 + 4)?;
            let id = p.get_u64_le();
            let count = p.get_u32_le();
            let sel = p.get_u8();
            let sel_queue = p.get_u32_le();
            let key_len = p.get_u32_le() as usize;
            need(p, key_len)?;
            let key = Bytes::copy_from_slice(&p[..key_len]);
            p.advance(key_len);
            need(p, 2)?;
            let topic_len = p.get_u16_le() as usize;
            need(p, topic_len)?;
            let topic = std::str::from_utf8(&p[..topic_len]).ok()?.to_string();
            p.advance(topic_len);
            need(p, 1 + 8 + 2 + 4 + 4 + 4)?;
            let assigned = p.get_u8();
            let a = Assignment {
                producer_id: p.get_u64_le(),
                epoch: p.get_u16_le(),
                queue: p.get_u32_le(),
                base_sequence: p.get_u32_le(),
            };
            let body_len = p.get_u32_le() as usize;
            if p.remaining() != body_len {
                return None;
            }
            let selector = match sel {
                0 => SpoolSelector::RoundRobin,
                1 => SpoolSelector::Key(key),
                2 => SpoolSelector::Queue(sel_queue),
                _ => return None,
            };
            Some(Record::Entry(SpoolEntry {
                id,
                topic,
                selector,
                count,
                body: Bytes::copy_from_slice(p),
                assignment: match assigned {
                    0 => None,
                    1 => Some(a),
                    _ => return None,
                },
            }))
        }
        KIND_ASSIGN => {
            if p.remaining() != 8 + 8 + 2 + 4 + 4 {
                return None;
            }
            let id = p.get_u64_le();
            Some(Record::Assign(
                id,
                Assignment {
                    producer_id: p.get_u64_le(),
                    epoch: p.get_u16_le(),
                    queue: p.get_u32_le(),
                    base_sequence: p.get_u32_le(),
                },
            ))
        }
        KIND_ACKED => {
            need(p, 4)?;
            let n = p.get_u32_le() as usize;
            if p.remaining() != n * 8 {
                return None;
            }
            Some(Record::Acked((0..n).map(|_| p.get_u64_le()).collect()))
        }
        _ => None,
    }
}

/// Applies the records of segment `n` to `st`; returns the segment's good length. A bad
/// record in the newest segment is a torn tail: logged and truncated. In an older one it is
/// corruption: refused.
fn replay_segment(
    st: &mut State,
    n: u64,
    file: &File,
    path: &Path,
    newest: bool,
) -> Result<u64, ClientError> {
    let len = file
        .metadata()
        .map_err(|e| ClientError::Spool(format!("cannot stat {}: {e}", path.display())))?
        .len();
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, 0)
        .map_err(|e| ClientError::Spool(format!("cannot read {}: {e}", path.display())))?;
    let mut pos = 0usize;
    let bad = loop {
        let rest = &data[pos..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < HEAD_BYTES {
            break Some("a short record head (torn append)");
        }
        let plen = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if plen == 0 || rest.len() - HEAD_BYTES < plen {
            break Some("a short record (torn append)");
        }
        let payload = &rest[HEAD_BYTES..HEAD_BYTES + plen];
        if crc32fast::hash(payload) != crc {
            break Some("a CRC mismatch");
        }
        let Some(record) = decode(payload) else {
            break Some("an undecodable record");
        };
        match record {
            Record::Entry(e) => {
                st.next_id = st.next_id.max(e.id + 1);
                st.pending.insert(
                    e.id,
                    PendingEntry {
                        id: e.id,
                        topic: e.topic,
                        selector: e.selector,
                        count: e.count,
                        assignment: e.assignment,
                        segment: n,
                        offset: pos as u64,
                        len: plen as u32,
                    },
                );
            }
            Record::Assign(id, a) => {
                if let Some(p) = st.pending.get_mut(&id) {
                    p.assignment = Some(a);
                }
            }
            Record::Acked(ids) => {
                for id in ids {
                    st.pending.remove(&id);
                }
            }
        }
        pos += HEAD_BYTES + plen;
    };
    if let Some(why) = bad {
        if !newest {
            return Err(ClientError::Spool(format!(
                "{} is corrupt at byte {pos}: {why}; it is not the newest segment, so this \
                 is not a torn append. Move the spool aside to start over",
                path.display()
            )));
        }
        log::warn!(
            "spool {}: {why} at byte {pos}; truncating the {} byte(s) from there (nothing \
             past it is re-sent)",
            path.display(),
            len - pos as u64
        );
        file.set_len(pos as u64)
            .and_then(|_| file.sync_all())
            .map_err(|e| ClientError::Spool(format!("cannot truncate {}: {e}", path.display())))?;
    }
    Ok(pos as u64)
}

fn read_identity(dir: &Path) -> Result<Option<(u64, u16)>, ClientError> {
    let path = dir.join(IDENTITY_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(spool_err(dir, "cannot read the identity", e)),
    };
    let bad = || {
        ClientError::Spool(format!(
            "{} is not a spool identity (or is damaged): the producer id of the entries \
             cannot be known, so they cannot be re-sent exactly once",
            path.display()
        ))
    };
    if data.len() != 8 + 4 + 8 + 2 + 4 || &data[..8] != IDENTITY_MAGIC {
        return Err(bad());
    }
    let mut p = &data[8..];
    let version = p.get_u32_le();
    let pid = p.get_u64_le();
    let epoch = p.get_u16_le();
    let crc = p.get_u32_le();
    if version != IDENTITY_VERSION || crc != crc32fast::hash(&data[8..data.len() - 4]) {
        return Err(bad());
    }
    Ok(Some((pid, epoch)))
}

fn write_identity(dir: &Path, producer_id: u64, epoch: u16) -> Result<(), ClientError> {
    let mut buf = BytesMut::with_capacity(26);
    buf.put_slice(IDENTITY_MAGIC);
    buf.put_u32_le(IDENTITY_VERSION);
    buf.put_u64_le(producer_id);
    buf.put_u16_le(epoch);
    let crc = crc32fast::hash(&buf[8..]);
    buf.put_u32_le(crc);
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let done = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(IDENTITY_FILE))?;
        sync_dir(dir)
    })();
    done.map_err(|e| spool_err(dir, "cannot write the identity", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> SpoolConfig {
        SpoolConfig::new(dir)
    }

    fn newest_segment(dir: &Path) -> PathBuf {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "spool"))
            .collect();
        v.sort();
        v.pop().unwrap()
    }

    #[test]
    fn one_producer_at_a_time_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Spool::open(&config(tmp.path())).unwrap();
        let Err(e) = Spool::open(&config(tmp.path())) else {
            panic!("a second open of a spool in use must be refused");
        };
        assert!(e.to_string().contains("in use by another producer"), "{e}");
        drop(first);
        Spool::open(&config(tmp.path())).expect("free again once the first is closed");
    }

    #[test]
    fn entries_and_markers_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(&config(tmp.path())).unwrap();
        let (pid, e0) = s.identity();
        let a = s
            .append("t", &SpoolSelector::RoundRobin, 1, b"one", None, 0)
            .unwrap();
        let b = s
            .append("t", &SpoolSelector::Key("k".into()), 2, b"two", None, 0)
            .unwrap();
        let asg = Assignment {
            producer_id: pid,
            epoch: 3,
            queue: 1,
            base_sequence: 7,
        };
        s.record_assign(&[(b.entry, asg)]).unwrap();
        s.record_acked(&[a.entry]).unwrap();
        drop(s);
        let s = Spool::open(&config(tmp.path())).unwrap();
        assert_eq!(s.identity(), (pid, e0));
        let pending = s.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].assignment, Some(asg));
        let e = s.read(b.entry).unwrap();
        assert_eq!(&e.body[..], b"two");
        assert_eq!(e.selector, SpoolSelector::Key("k".into()));
        s.record_acked(&[b.entry]).unwrap();
        assert_eq!(s.used_bytes(), 0, "nothing pending: every segment deleted");
    }

    #[test]
    fn begin_run_takes_a_new_persisted_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(&config(tmp.path())).unwrap();
        let (pid, e1) = s.begin_run().unwrap();
        drop(s);
        let s = Spool::open(&config(tmp.path())).unwrap();
        let (pid2, e2) = s.begin_run().unwrap();
        assert_eq!(pid, pid2);
        assert!(e2 > e1);
    }

    #[test]
    fn torn_and_corrupt_tails_are_truncated_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(&config(tmp.path())).unwrap();
        for i in 0..3u8 {
            s.append("t", &SpoolSelector::RoundRobin, 1, &[i; 10], None, 0)
                .unwrap();
        }
        drop(s);
        let seg = newest_segment(tmp.path());
        // A torn append: half a record's head at the end.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0]).unwrap();
        drop(f);
        let s = Spool::open(&config(tmp.path())).unwrap();
        assert_eq!(s.pending_count(), 3);
        drop(s);
        // A flipped byte in the last record's body.
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xff], len - 2).unwrap();
        drop(f);
        let s = Spool::open(&config(tmp.path())).unwrap();
        assert_eq!(s.pending_count(), 2, "the corrupt entry is dropped");
        assert!(std::fs::metadata(&seg).unwrap().len() < len);
        // Appends go on after the truncation point.
        s.append("t", &SpoolSelector::RoundRobin, 1, b"x", None, 0)
            .unwrap();
        drop(s);
        assert_eq!(Spool::open(&config(tmp.path())).unwrap().pending_count(), 3);
    }

    #[test]
    fn a_bad_record_in_an_older_segment_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.segment_bytes = 100;
        let s = Spool::open(&cfg).unwrap();
        for i in 0..4u8 {
            s.append("t", &SpoolSelector::RoundRobin, 1, &[i; 40], None, 0)
                .unwrap();
        }
        drop(s);
        let first = segment_path(tmp.path(), 1);
        let f = OpenOptions::new().write(true).open(&first).unwrap();
        f.write_all_at(&[0xff], 20).unwrap();
        drop(f);
        let err = Spool::open(&cfg).err().expect("refused");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn a_full_spool_says_so_and_reservations_count() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.max_bytes = 400;
        let s = Spool::open(&cfg).unwrap();
        s.append("t", &SpoolSelector::RoundRobin, 1, &[0; 100], None, 0)
            .unwrap();
        s.reserve(Spool::entry_bytes("t", &SpoolSelector::RoundRobin, 100))
            .unwrap();
        let err = s
            .append("t", &SpoolSelector::RoundRobin, 1, &[0; 100], None, 0)
            .unwrap_err();
        assert!(matches!(err, ClientError::SpoolFull { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("400") && text.contains(&*tmp.path().to_string_lossy()));
    }
}
