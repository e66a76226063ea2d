//! The broker layer's error type: a stable wire code plus a message for the client.
//!
//! Every lower-layer error (storage, topics, mesh, wire) is mapped here, in one place, so the
//! codes a client sees are decided deliberately.

use crate::protocol::{self, ErrorCode, Frame, WireError};
use crate::shard::mesh::MeshError;
use crate::shard::topic_writes::TopicWriteError;
use crate::shard::topics::TopicError;
use crate::storage::space::is_disk_full;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ServiceError {
        ServiceError {
            code,
            message: message.into(),
        }
    }

    pub fn to_frame(&self, opcode: u16, request_id: u64) -> Frame {
        protocol::error_frame(opcode, request_id, self.code, &self.message)
    }
}

impl From<WireError> for ServiceError {
    fn from(e: WireError) -> Self {
        ServiceError::new(e.code(), e.to_string())
    }
}

impl From<TopicError> for ServiceError {
    fn from(e: TopicError) -> Self {
        let code = match e {
            TopicError::InvalidName { .. } => ErrorCode::InvalidTopic,
            TopicError::InvalidQueueCount { .. } | TopicError::Shrink { .. } => {
                ErrorCode::InvalidArgument
            }
            TopicError::NotFound { .. } => ErrorCode::TopicNotFound,
            // The name is taken, by a live topic or a deleted one's tombstone.
            TopicError::Exists { .. } | TopicError::Deleted { .. } => ErrorCode::TopicExists,
            // The topic table could not be written for lack of space: retriable, like a
            // produce on a full disk.
            TopicError::Io { ref source, .. } if is_disk_full(source) => ErrorCode::DiskFull,
            TopicError::Io { .. } | TopicError::Corrupt { .. } => ErrorCode::Internal,
        };
        ServiceError::new(code, e.to_string())
    }
}

impl From<TopicWriteError> for ServiceError {
    fn from(e: TopicWriteError) -> Self {
        match e {
            TopicWriteError::Topic(e) => e.into(),
            TopicWriteError::Mesh(e) => e.into(),
            TopicWriteError::Closed(why) => ServiceError::new(
                ErrorCode::ShuttingDown,
                format!("topic writes closed: {why}"),
            ),
        }
    }
}

impl From<MeshError> for ServiceError {
    fn from(e: MeshError) -> Self {
        ServiceError::new(ErrorCode::ShuttingDown, e.to_string())
    }
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        ServiceError::new(storage_code(&e), e.to_string())
    }
}

fn storage_code(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
        StorageError::SequenceGap { .. } => ErrorCode::SequenceGap,
        StorageError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
        StorageError::RecordTooLarge { .. } => ErrorCode::MessageTooLarge,
        // Retriable: nothing of the batch was stored and writes resume once space is freed.
        StorageError::DiskFull { .. } => ErrorCode::DiskFull,
        _ => ErrorCode::StorageError,
    }
}
