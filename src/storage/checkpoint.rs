//! The durable checkpoint: how far the log is known to have been durable, so that recovery can
//! tell a torn tail (bytes past the checkpoint, never acknowledged as durable: truncate) from
//! corruption of bytes that were once durable (before it: refuse, or quarantine on request).
//!
//! # File `<shard>/commitlog/checkpoint`: two 4 KiB slots
//! ```text
//! 0        4        8                16               24               32       36
//! +--------+--------+----------------+----------------+----------------+--------+-- zeros
//! | magic  | version| sequence u64   | position u64   | reserved u64   | crc32  |   to 4096
//! +--------+--------+----------------+----------------+----------------+--------+
//! ```
//! - `position`: a record boundary below which every byte was covered by a completed
//!   fdatasync when the slot was written.
//! - `reserved` (version 2): the log writer never writes at or past this position before a
//!   slot with a larger one is durable, so every byte at or past it is zero (segments are
//!   prepared zero-filled and recovery zeroes what it truncates). Recovery therefore reads
//!   only up to it when checking that nothing follows the log end: after a crash that is at
//!   most [`WRITE_RESERVATION_BYTES`] instead of the rest of the active segment and the whole
//!   spare (up to 2 GiB with the default segment, most of an open's time).
//! - `crc32` over the bytes before it. A slot that does not check out is ignored. A version 1
//!   slot (28 bytes, no `reserved`) is read as "reserved: unknown" (everything is read).
//! - Writes alternate between slot 0 (bytes 0..4096) and slot 1 (4096..8192), each followed by
//!   an fdatasync; the valid slot with the higher `sequence` wins.
//!
//! **Why two slots overwritten in place and not tmp + fsync + rename:** an in-place block write
//! goes through the same O_DIRECT io_uring path as the log (it never blocks the executor; a
//! rename needs a blocking directory fsync), it costs one write and one fdatasync, no inode or
//! directory change, and a crash that tears the slot being written leaves the other slot, the
//! previous checkpoint, intact. An older checkpoint is always safe: it only makes recovery
//! treat more of the tail as "maybe torn".
//!
//! The checkpoint is written lazily by its own task after the flusher advanced the durable
//! watermark (at most every [`CHECKPOINT_INTERVAL_MS`]), never on the ack path: an ack waits for
//! the log's fdatasync only. On close a final checkpoint covers the whole log.

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};

use crate::storage::backend::{BackendFile, IoBuf, StorageBackend, BLOCK_BYTES};

/// Name of the checkpoint file inside the commit-log directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// Minimum time between two lazy checkpoint writes. Bounds the extra fdatasyncs (one per
/// interval at most) and so how much acknowledged data a crash can leave past the checkpoint.
pub const CHECKPOINT_INTERVAL_MS: u64 = 100;

/// How far past the log end the writer may write before the checkpoint task must record a
/// new reservation (see `reserved` above; at most a quarter segment). A new one is recorded when less than half is left,
/// so the writer practically never waits; recovery after a crash reads at most this much of
/// zeros after the log end.
pub const WRITE_RESERVATION_BYTES: u64 = 64 << 20;

const MAGIC: u32 = 0x524D_5143; // "CQMR" little-endian: RingMQ checkpoint
const VERSION: u32 = 2;
const SLOT_BYTES: u64 = BLOCK_BYTES;
const SLOTS: u64 = 2;
const ENCODED_BYTES: usize = 36;
const V1_BYTES: usize = 28;

/// One decoded slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSlot {
    pub sequence: u64,
    pub position: u64,
    /// Nothing was written at or past this (`u64::MAX`: unknown, a version 1 slot).
    pub reserved: u64,
}

impl CheckpointSlot {
    pub fn encode(&self) -> [u8; ENCODED_BYTES] {
        let mut b = [0u8; ENCODED_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..24].copy_from_slice(&self.position.to_le_bytes());
        b[24..32].copy_from_slice(&self.reserved.to_le_bytes());
        let crc = crc32fast::hash(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` for anything but a whole, valid slot (zeros, torn, garbage).
    pub fn decode(b: &[u8]) -> Option<CheckpointSlot> {
        if b.len() < V1_BYTES {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
        if u32_at(0) != MAGIC {
            return None;
        }
        let reserved = match u32_at(4) {
            1 if u32_at(24) == crc32fast::hash(&b[0..24]) => u64::MAX,
            2 if b.len() >= ENCODED_BYTES && u32_at(32) == crc32fast::hash(&b[0..32]) => u64_at(24),
            _ => return None,
        };
        Some(CheckpointSlot {
            sequence: u64_at(8),
            position: u64_at(16),
            reserved,
        })
    }
}

/// The open checkpoint file.
pub(crate) struct Checkpoint<F: BackendFile> {
    file: F,
    pub path: PathBuf,
    /// Sequence of the last slot written (or loaded).
    sequence: Cell<u64>,
    /// Position of the last slot written (or loaded).
    position: Cell<u64>,
    /// Reservation of the last slot written (or loaded).
    reserved: Cell<u64>,
}

impl<F: BackendFile> Checkpoint<F> {
    /// Opens (creating when missing) the checkpoint in `dir`; returns it and the checkpointed
    /// position (0 when there is none yet: nothing is known durable).
    pub async fn open<B: StorageBackend<File = F>>(
        backend: &B,
        dir: &Path,
    ) -> io::Result<Checkpoint<F>> {
        let path = dir.join(CHECKPOINT_FILE);
        let file = match backend.open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                backend.create_zeroed(&path, SLOT_BYTES * SLOTS).await?;
                backend.open(&path).await?
            }
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_into(0, (SLOT_BYTES * SLOTS) as usize, &mut bytes)
            .await?;
        let best = (0..SLOTS as usize)
            .filter_map(|i| {
                let at = i * SLOT_BYTES as usize;
                bytes.get(at..).and_then(CheckpointSlot::decode)
            })
            .max_by_key(|s| s.sequence);
        // No valid slot: nothing is known durable, and nothing is known about where the
        // writer wrote.
        let (sequence, position, reserved) =
            best.map_or((0, 0, u64::MAX), |s| (s.sequence, s.position, s.reserved));
        Ok(Checkpoint {
            file,
            path,
            sequence: Cell::new(sequence),
            position: Cell::new(position),
            reserved: Cell::new(reserved),
        })
    }

    /// The checkpointed position.
    pub fn position(&self) -> u64 {
        self.position.get()
    }

    /// The write reservation of the newest slot (`u64::MAX`: unknown).
    pub fn reserved(&self) -> u64 {
        self.reserved.get()
    }

    /// Durably records `position` and the write reservation `reserved` (write + fdatasync of
    /// the slot not holding the newest checkpoint). Callers must not run two of these at once.
    pub async fn store(&self, position: u64, reserved: u64) -> io::Result<()> {
        let slot = CheckpointSlot {
            sequence: self.sequence.get() + 1,
            position,
            reserved,
        };
        let mut buf = self.file.alloc_buf(SLOT_BYTES as usize);
        buf.bytes_mut()[..ENCODED_BYTES].copy_from_slice(&slot.encode());
        let at = (slot.sequence % SLOTS) * SLOT_BYTES;
        self.file.write_at(buf, at).await?;
        self.file.sync().await?;
        self.sequence.set(slot.sequence);
        self.position.set(position);
        self.reserved.set(reserved);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_round_trips_and_any_damage_invalidates_it() {
        let s = CheckpointSlot {
            sequence: 7,
            position: 123_456,
            reserved: 999_999,
        };
        let b = s.encode();
        assert_eq!(CheckpointSlot::decode(&b), Some(s));
        for i in 0..b.len() {
            let mut c = b;
            c[i] ^= 0x01;
            assert_eq!(CheckpointSlot::decode(&c), None, "flip at {i}");
        }
        assert_eq!(CheckpointSlot::decode(&[0u8; 64]), None);
        assert_eq!(CheckpointSlot::decode(&b[..10]), None);
    }
}
