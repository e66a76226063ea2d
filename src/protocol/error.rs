//! Errors of the wire layer.
//!
//! Two types live here:
//! - [`WireError`]: what went wrong decoding or interpreting a frame, on either side. Structured,
//!   so a caller can log exact numbers and, where the preamble was intact, still answer the
//!   sender ([`WireError::request_id`], [`WireError::code`]).
//! - [`ErrorCode`]: the stable numeric status a broker puts in a response preamble. Numbers are a
//!   public contract: a code is never renumbered and a retired number is never reused (list it in
//!   the retired comment below instead).

use std::fmt;

/// Declares [`ErrorCode`] from one row per code: `number => Variant "NAME" retriable|final`,
/// the row's doc comment becoming the variant's. Everything else about a code (`ALL`,
/// `as_u16`, `from_u16`, `name`, `is_retriable`, `Display`) is generated from the rows, so a
/// new code is one row. Rows are in numeric order; that is checked at compile time.
macro_rules! error_codes {
    (
        $(#[$enum_doc:meta])*
        pub enum ErrorCode {
            $( $(#[$doc:meta])* $num:literal => $code:ident $name:literal $retry:ident, )*
        }
    ) => {
        $(#[$enum_doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $code = $num, )*
            /// A number this build does not know, kept as received. The discriminant is a
            /// placeholder: use [`ErrorCode::as_u16`], which returns the carried value.
            Unknown(u16) = u16::MAX,
        }

        impl ErrorCode {
            /// Every known code, in numeric order. Used by tests to pin the numbers.
            pub const ALL: [ErrorCode; [$($num),*].len()] = [$(ErrorCode::$code),*];

            /// The number sent on the wire.
            pub const fn as_u16(self) -> u16 {
                match self {
                    $( ErrorCode::$code => $num, )*
                    ErrorCode::Unknown(n) => n,
                }
            }

            /// Maps a received number; never fails: unknown numbers become
            /// [`ErrorCode::Unknown`].
            pub const fn from_u16(n: u16) -> ErrorCode {
                match n {
                    $( $num => ErrorCode::$code, )*
                    n => ErrorCode::Unknown(n),
                }
            }

            /// Whether a client may resend the same request (with the same producer sequence,
            /// so an idempotent producer is not stored twice) and expect it can succeed.
            pub const fn is_retriable(self) -> bool {
                match self {
                    $( ErrorCode::$code => error_codes!(@retriable $retry), )*
                    ErrorCode::Unknown(_) => false,
                }
            }

            /// The SCREAMING_SNAKE name used in logs and by `Display`.
            pub const fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$code => $name, )*
                    ErrorCode::Unknown(_) => "UNKNOWN",
                }
            }
        }

        // A row out of order would make `ALL` lie about being sorted; a repeated number is
        // already refused by the enum's explicit discriminants.
        const _: () = {
            let all = ErrorCode::ALL;
            let mut i = 1;
            while i < all.len() {
                assert!(all[i - 1].as_u16() < all[i].as_u16(), "error codes out of order");
                i += 1;
            }
        };
    };
    (@retriable retriable) => { true };
    (@retriable final) => { false };
}

error_codes! {
    /// Stable numeric status carried in the `status` field of a response preamble.
    ///
    /// Numbers are grouped by decade: 1–9 framing, 20s metadata, 30s broker resources, 40s
    /// data, 50s replication, 60s lifecycle, 70s idempotent producers, 80s consumer groups. `0` is success and only
    /// ever appears in successful responses.
    ///
    /// Retired numbers (never reuse): none yet.
    ///
    /// A number this build does not know (a newer peer) becomes [`ErrorCode::Unknown`] carrying
    /// the raw value; it is never sent by this build and it is not retriable.
    pub enum ErrorCode {
        /// Success.
        0 => Ok "OK" final,
        /// The frame could not be parsed (bad magic, reserved bits set, inconsistent flags ...).
        1 => MalformedFrame "MALFORMED_FRAME" final,
        /// The preamble's version is not one this broker speaks.
        2 => UnsupportedVersion "UNSUPPORTED_VERSION" final,
        /// The CRC over header and body did not match.
        3 => CrcMismatch "CRC_MISMATCH" final,
        /// Header or body length over the broker's limits.
        4 => FrameTooLarge "FRAME_TOO_LARGE" final,
        /// The opcode is not one this broker knows.
        5 => UnknownOpcode "UNKNOWN_OPCODE" final,
        /// The FlatBuffers header failed verification or lacks a required field.
        6 => BadHeader "BAD_HEADER" final,
        /// A bug or an unexpected state in the broker.
        7 => Internal "INTERNAL" final,
        /// The topic does not exist.
        20 => TopicNotFound "TOPIC_NOT_FOUND" final,
        /// CreateTopic for a topic that already exists with a different queue count.
        21 => TopicExists "TOPIC_EXISTS" final,
        /// The topic name breaks the rule in [`validate_topic_name`](super::validate_topic_name):
        /// empty, too long, or with forbidden characters.
        22 => InvalidTopic "INVALID_TOPIC" final,
        /// The queue id is outside the topic's queues.
        23 => QueueNotFound "QUEUE_NOT_FOUND" final,
        /// A request field is out of range.
        24 => InvalidArgument "INVALID_ARGUMENT" final,
        /// The consumer group does not exist (it is created by its first join or by
        /// `ringmq admin group create`).
        25 => GroupNotFound "GROUP_NOT_FOUND" final,
        /// Flow control: the shard's in-flight budget is exhausted. Retry later.
        30 => SystemBusy "SYSTEM_BUSY" retriable,
        /// SYNC_FLUSH: the batch was written but the fdatasync did not complete before the
        /// deadline. It may be stored; an idempotent producer can retry safely.
        31 => FlushDiskTimeout "FLUSH_DISK_TIMEOUT" retriable,
        /// The storage layer failed (for example a poisoned segment after an fdatasync error).
        32 => StorageError "STORAGE_ERROR" final,
        /// Disk usage over the reject ratio; writes resume once retention frees space.
        33 => DiskFull "DISK_FULL" retriable,
        /// A bounded table is full (consumer groups, members, committed offsets); the message
        /// names the bound.
        34 => LimitExceeded "LIMIT_EXCEEDED" final,
        /// Fetch offset outside `[min_offset, end_offset]`.
        40 => OffsetOutOfRange "OFFSET_OUT_OF_RANGE" final,
        /// Idempotent producer: the sequence number is not the next one expected.
        41 => OutOfOrderSequence "OUT_OF_ORDER_SEQUENCE" final,
        /// A message or batch over the broker's size limits.
        42 => MessageTooLarge "MESSAGE_TOO_LARGE" final,
        /// The produce body is not a valid message batch (see `crate::format::batch`).
        43 => InvalidBatch "INVALID_BATCH" final,
        /// SYNC_MASTER: the slave did not acknowledge before the deadline. Stored on the master.
        50 => FlushSlaveTimeout "FLUSH_SLAVE_TIMEOUT" retriable,
        /// SYNC_MASTER: no slave is connected. Stored on the master.
        51 => SlaveNotAvailable "SLAVE_NOT_AVAILABLE" retriable,
        /// A write reached a broker that is not (or no longer) the master.
        52 => NotMaster "NOT_MASTER" final,
        /// A follow request was refused (shard count or segment size mismatch, or the
        /// follower's epoch is newer: the master is fenced). Retrying the same request cannot
        /// help: the configuration or the roles must change first.
        53 => ReplicationRefused "REPLICATION_REFUSED" final,
        /// The broker is shutting down; retry on another broker or after restart.
        60 => ShuttingDown "SHUTTING_DOWN" retriable,
        /// Idempotent producer: the batch is ahead of the next expected sequence (an earlier
        /// batch has not arrived). Retriable: re-send every unacknowledged batch of the queue,
        /// in sequence order, from the earliest.
        70 => SequenceGap "SEQUENCE_GAP" retriable,
        /// Idempotent producer: the batch's producer epoch is older than one the broker has
        /// seen for this producer and queue; a newer incarnation took over. Not retriable.
        71 => ProducerFenced "PRODUCER_FENCED" final,
        /// Consumer group: the request names an older generation, or a queue the member does
        /// not hold in this one (a rebalance happened). Join again for the new assignment.
        80 => StaleGeneration "STALE_GENERATION" final,
        /// Consumer group: the member id is not (or no longer) in the group: it left or its
        /// session timed out. Join again.
        81 => UnknownMember "UNKNOWN_MEMBER" final,
        /// Transactions: no half message with this offset and transaction id (a wrong handle,
        /// or one resolved so long ago that the broker no longer remembers how).
        90 => TransactionNotFound "TRANSACTION_NOT_FOUND" final,
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Unknown(n) => write!(f, "UNKNOWN({n})"),
            code => f.write_str(code.name()),
        }
    }
}

/// An error status received from the broker: the response preamble's `status` and the UTF-8
/// message in its body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RemoteError {
    /// The status from the response preamble (never [`ErrorCode::Ok`]).
    pub code: ErrorCode,
    /// Human-readable detail from the response body (lossily decoded if not UTF-8).
    pub message: String,
}

impl RemoteError {
    /// Whether resending the request may succeed; see [`ErrorCode::is_retriable`].
    pub fn is_retriable(&self) -> bool {
        self.code.is_retriable()
    }
}

/// Something wrong with a frame or its header.
///
/// Variants with a `request_id` were detected after the preamble parsed (magic and version
/// good), so the caller can answer that request with [`WireError::code`] before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not the RingMQ magic: not our protocol, or a desynchronised
    /// stream. Nothing else in the buffer can be trusted.
    #[error("bad magic {found:#010x}, expected {expected:#010x}", expected = super::preamble::MAGIC)]
    BadMagic { found: u32 },

    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {found}, this build speaks {supported}", supported = super::preamble::VERSION)]
    UnsupportedVersion { found: u8 },

    /// The reserved preamble field is not zero.
    #[error("request {request_id}: reserved preamble field is {found:#06x}, must be 0")]
    ReservedNotZero { request_id: u64, found: u16 },

    /// Flag bits this version does not define, or RESPONSE and ONEWAY together.
    #[error("request {request_id}: invalid flags {flags:#04x}")]
    InvalidFlags { request_id: u64, flags: u8 },

    /// A request (RESPONSE flag clear) with a non-zero status.
    #[error("request {request_id}: status {status} set on a request")]
    StatusInRequest { request_id: u64, status: u16 },

    /// Header length over [`MAX_HEADER_BYTES`](super::limits::MAX_HEADER_BYTES); detected from
    /// the preamble alone.
    #[error("request {request_id}: header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge { request_id: u64, len: u32, max: u32 },

    /// Body length over [`MAX_BODY_BYTES`](super::limits::MAX_BODY_BYTES); detected from the
    /// preamble alone.
    #[error("request {request_id}: body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { request_id: u64, len: u32, max: u32 },

    /// The CRC32 over header and body does not match the preamble.
    #[error("request {request_id}: crc mismatch, preamble says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch {
        request_id: u64,
        expected: u32,
        actual: u32,
    },

    /// An opcode this build does not know.
    #[error("request {request_id}: unknown opcode {opcode}")]
    UnknownOpcode { request_id: u64, opcode: u16 },

    /// The FlatBuffers header failed verification or does not fit the opcode.
    #[error("request {request_id}: bad header for opcode {opcode}: {reason}")]
    BadHeader {
        request_id: u64,
        opcode: u16,
        reason: String,
    },

    /// A request where a response was expected, or the other way round.
    #[error("request {request_id}: expected a {expected} frame")]
    WrongDirection {
        request_id: u64,
        expected: &'static str,
    },

    /// A response whose opcode is not the one of the request it answers, or a replication
    /// stream frame of the other kind (a ReplAck where a ReplData was expected).
    #[error("request {request_id}: opcode {found}, expected {expected}")]
    OpcodeMismatch {
        request_id: u64,
        expected: u16,
        found: u16,
    },

    /// A replication stream opcode (ReplData, ReplAck) read as an ordinary request or
    /// response. Those frames only follow a ReplFollow handshake and are read with
    /// `ReplData::from_frame` / `ReplAck::from_frame`; on any other connection they mean a
    /// confused or hostile peer.
    #[error("request {request_id}: opcode {opcode} is only valid on a replication stream")]
    ReplicationStreamOnly { request_id: u64, opcode: u16 },

    /// The broker answered with an error status.
    #[error("request {request_id}: broker error {error}")]
    Remote { request_id: u64, error: RemoteError },
}

impl WireError {
    /// The request id from the preamble, when it was read before the error was found.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            WireError::BadMagic { .. } | WireError::UnsupportedVersion { .. } => None,
            WireError::ReservedNotZero { request_id, .. }
            | WireError::InvalidFlags { request_id, .. }
            | WireError::StatusInRequest { request_id, .. }
            | WireError::HeaderTooLarge { request_id, .. }
            | WireError::BodyTooLarge { request_id, .. }
            | WireError::CrcMismatch { request_id, .. }
            | WireError::UnknownOpcode { request_id, .. }
            | WireError::BadHeader { request_id, .. }
            | WireError::WrongDirection { request_id, .. }
            | WireError::OpcodeMismatch { request_id, .. }
            | WireError::ReplicationStreamOnly { request_id, .. }
            | WireError::Remote { request_id, .. } => Some(*request_id),
        }
    }

    /// The status a broker sends back for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::BadMagic { .. }
            | WireError::ReservedNotZero { .. }
            | WireError::InvalidFlags { .. }
            | WireError::StatusInRequest { .. }
            | WireError::WrongDirection { .. }
            | WireError::OpcodeMismatch { .. }
            | WireError::ReplicationStreamOnly { .. } => ErrorCode::MalformedFrame,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::HeaderTooLarge { .. } | WireError::BodyTooLarge { .. } => {
                ErrorCode::FrameTooLarge
            }
            WireError::CrcMismatch { .. } => ErrorCode::CrcMismatch,
            WireError::UnknownOpcode { .. } => ErrorCode::UnknownOpcode,
            WireError::BadHeader { .. } => ErrorCode::BadHeader,
            WireError::Remote { error, .. } => error.code,
        }
    }

    /// The broker's error, if this is one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            WireError::Remote { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_numbers_are_pinned() {
        let expected: [u16; 33] = [
            0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34, 40, 41, 42, 43, 50,
            51, 52, 53, 60, 70, 71, 80, 81, 90,
        ];
        let got: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.as_u16()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn every_number_round_trips_and_unknown_numbers_are_kept() {
        for n in 0..=u16::MAX {
            assert_eq!(ErrorCode::from_u16(n).as_u16(), n);
        }
        assert_eq!(ErrorCode::from_u16(8), ErrorCode::Unknown(8));
        assert_eq!(ErrorCode::from_u16(999).to_string(), "UNKNOWN(999)");
        assert!(!ErrorCode::Unknown(999).is_retriable());
    }

    #[test]
    fn retriable_codes_are_exactly_the_transient_ones() {
        let retriable: Vec<ErrorCode> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.is_retriable())
            .collect();
        assert_eq!(
            retriable,
            [
                ErrorCode::SystemBusy,
                ErrorCode::FlushDiskTimeout,
                ErrorCode::DiskFull,
                ErrorCode::FlushSlaveTimeout,
                ErrorCode::SlaveNotAvailable,
                ErrorCode::ShuttingDown,
                ErrorCode::SequenceGap,
            ]
        );
    }

    #[test]
    fn display_is_the_screaming_snake_name() {
        assert_eq!(
            ErrorCode::FlushSlaveTimeout.to_string(),
            "FLUSH_SLAVE_TIMEOUT"
        );
        assert_eq!(ErrorCode::Ok.to_string(), "OK");
        let e = RemoteError {
            code: ErrorCode::TopicNotFound,
            message: "no topic t".into(),
        };
        assert_eq!(e.to_string(), "TOPIC_NOT_FOUND: no topic t");
    }

    #[test]
    fn errors_after_the_preamble_carry_the_request_id() {
        let e = WireError::CrcMismatch {
            request_id: 7,
            expected: 1,
            actual: 2,
        };
        assert_eq!(e.request_id(), Some(7));
        assert_eq!(e.code(), ErrorCode::CrcMismatch);
        assert_eq!(WireError::BadMagic { found: 0 }.request_id(), None);
    }
}
