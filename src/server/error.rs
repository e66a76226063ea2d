//! The server's error type: a stable wire code plus a message for the client.
//!
//! Every lower-layer error (storage, topics, mesh, wire) is mapped here, in one place, so the
//! codes a client sees are decided deliberately.

use crate::protocol::{self, ErrorCode, Frame, WireError};
use crate::shard::mesh::MeshError;
use crate::shard::topics::TopicError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    pub code: ErrorCode,
    pub message: String,
}

impl HandlerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> HandlerError {
        HandlerError {
            code,
            message: message.into(),
        }
    }

    pub fn to_frame(&self, opcode: u16, request_id: u64) -> Frame {
        protocol::error_frame(opcode, request_id, self.code, &self.message)
    }
}

impl From<WireError> for HandlerError {
    fn from(e: WireError) -> Self {
        HandlerError::new(e.code(), e.to_string())
    }
}

impl From<TopicError> for HandlerError {
    fn from(e: TopicError) -> Self {
        let code = match e {
            TopicError::InvalidName { .. } => ErrorCode::InvalidTopic,
            TopicError::InvalidQueueCount { .. } => ErrorCode::InvalidArgument,
            TopicError::Exists { .. } => ErrorCode::TopicExists,
            TopicError::Io { .. } | TopicError::Corrupt { .. } => ErrorCode::Internal,
        };
        HandlerError::new(code, e.to_string())
    }
}

impl From<MeshError> for HandlerError {
    fn from(e: MeshError) -> Self {
        HandlerError::new(ErrorCode::ShuttingDown, e.to_string())
    }
}

impl From<StorageError> for HandlerError {
    fn from(e: StorageError) -> Self {
        HandlerError::new(storage_code(&e), e.to_string())
    }
}

fn storage_code(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
        StorageError::SequenceGap { .. } => ErrorCode::SequenceGap,
        StorageError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
        StorageError::RecordTooLarge { .. } => ErrorCode::MessageTooLarge,
        _ => ErrorCode::StorageError,
    }
}
