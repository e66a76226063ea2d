//! Errors of the storage layer. Bad input is reported, never panics.

use std::io;
use std::path::PathBuf;

use crate::format::record::RecordError;
use crate::storage::space::is_disk_full;

/// Everything that can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A system call on a file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An earlier write or fdatasync failed. After that, nothing more is accepted and nothing
    /// beyond the last successful fdatasync is reported durable: the data on disk past it is
    /// unknown. The store must be reopened (recovery decides what survived).
    #[error("commit log is poisoned by an earlier I/O failure ({cause}); reopen the store")]
    Poisoned { cause: String },
    /// The record (header + topic + body) is larger than the configured maximum or a segment.
    #[error("record of {size} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge { size: u64, max: u64 },
    /// A read asked for a queue offset outside `[min, end]`.
    #[error("offset {requested} is out of range [{min}, {end}]")]
    OffsetOutOfRange { requested: u64, min: u64, end: u64 },
    /// An idempotent producer skipped sequence numbers or resent a batch that no longer matches.
    #[error("producer {producer_id}: out-of-order sequence, expected {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: u64,
        expected: u32,
        got: u32,
    },
    /// An idempotent producer's batch is ahead of the next expected sequence: an earlier batch
    /// has not arrived (lost with a connection, or refused). Retriable: the producer re-sends
    /// from its earliest unacknowledged batch.
    #[error("producer {producer_id}: sequence gap, expected {expected}, got {got}; re-send from the earliest unacknowledged batch")]
    SequenceGap {
        producer_id: u64,
        expected: u32,
        got: u32,
    },
    /// An idempotent producer used an epoch older than the one already seen.
    #[error("producer {producer_id}: epoch {epoch} is fenced by epoch {current_epoch}")]
    ProducerFenced {
        producer_id: u64,
        epoch: u16,
        current_epoch: u16,
    },
    /// Stored bytes failed validation where they must be valid (a read of visible data).
    #[error("corrupt record at log position {position}: {detail}")]
    Corrupt { position: u64, detail: String },
    /// Bytes below the durable checkpoint (acknowledged as durable once) are bad: media
    /// corruption, not a torn write. The shard refuses to open rather than drop them.
    #[error(
        "corrupt data in {} at byte {file_offset} (log position {position}), below the durable \
         checkpoint {checkpoint}: {detail}; the shard refuses to open so that nothing acknowledged \
         is dropped. To quarantine exactly the bad record and keep everything after it, run \
         `ringmq admin repair --data-dir <DATA_DIR>` or start with `ringmq broker --recovery \
         skip-corrupt`",
        path.display()
    )]
    CorruptDurable {
        path: PathBuf,
        file_offset: u64,
        position: u64,
        checkpoint: u64,
        detail: String,
    },
    /// A record failed to parse.
    #[error("bad record: {0}")]
    Record(#[from] RecordError),
    /// The caller passed something invalid (empty topic, zero message count, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The configuration is invalid; every problem is listed.
    #[error("invalid storage config: {}", .0.join("; "))]
    Config(Vec<String>),
    /// A replicated record does not continue this log where it claims to (its position or its
    /// queue offsets disagree): the histories diverged and the replica must resynchronise.
    #[error("replicated record at log position {position} does not fit this log: {detail}")]
    Diverged { position: u64, detail: String },
    /// The file system holding the log is full (ENOSPC or EDQUOT from the device, or not enough
    /// free space to prepare the next segment), or its usage is above `disk_reject_ratio`.
    /// Nothing is stored by the refused operation and nothing stored before is harmed; writes
    /// resume by themselves once space is freed (retriable: DISK_FULL on the wire).
    #[error("disk full: {reason}")]
    DiskFull { reason: String },
    /// The store was closed.
    #[error("store is closed")]
    Closed,
}

impl StorageError {
    /// A failed system call on `path`. A full disk is its own variant ([`StorageError::DiskFull`]),
    /// so every caller (segment preparation, a checkpoint, recovery at open) reports it the
    /// same way and the broker can answer a retriable DISK_FULL.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            return StorageError::DiskFull {
                reason: format!("{op} {}: {source}", path.display()),
            };
        }
        StorageError::Io { op, path, source }
    }
}
