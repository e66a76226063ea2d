//! The CommitLog record format. Pure: no I/O, no glommio, so the client library and the bench
//! parse fetch responses (the server sends whole records) with the same code as storage.
//!
//! # Byte layout (all integers little-endian)
//!
//! ```text
//!  0               4               8               12      14      16
//!  +---------------+---------------+---------------+-------+-------+
//!  | magic+version | total_len     | crc32         |topic_l| flags |
//!  +---------------+---------------+---------------+-------+-------+
//! 16               20                              28
//!  +---------------+-------------------------------+---------------+
//!  | queue_id u32  | base_queue_offset u64         | msg_count u32 |
//!  +---------------+-------------------------------+---------------+
//! 32                               40
//!  +-------------------------------+-------------------------------+
//!  | store_timestamp_ms u64        | producer_id u64               |
//!  +-------------------------------+-------------------------------+
//! 48      50      52               56                              64
//!  +-------+-------+---------------+-------------------------------+
//!  |p_epoch|reservd| base_sequence | log_position u64              |
//!  +-------+-------+---------------+-------------------------------+
//! 64
//!  +--------------------+----------------------------------------+
//!  | topic (topic_len)  | body: the message batch as sent        |
//!  +--------------------+----------------------------------------+
//!                                                     total_len ^
//! ```
//!
//! - `magic+version`: [`RECORD_MAGIC`]; the low byte is the format version.
//! - `total_len`: header + topic + body. Records are packed back to back; there is no padding
//!   inside a segment, and a record never spans two segments.
//! - `crc32` (crc32fast / IEEE): every byte after the crc field (offset 12) through the end of
//!   the body, so it covers the header fields too.
//! - `flags`: bit 0 = the producer fields are meaningful (idempotent producer); bit 1 = a gap
//!   record (recovery quarantined the corrupt record that was here, see [`FLAG_GAP`]).
//! - `log_position`: the record's own position in the shard's log. A record is only valid at
//!   that position, so stale bytes in a recycled or re-prepared segment are never mistaken for
//!   a record at another place.
//! - Never `usize` on disk; all sizes are u16/u32/u64.

use std::fmt;

/// Magic number and version (low byte) of a record: "RMQ" + version 1.
pub const RECORD_MAGIC: u32 = 0x524D_5101;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 64;
/// Upper bound on `total_len` accepted by the parser, whatever the broker config says: a
/// garbage length must not make a reader allocate or wait for gigabytes.
pub const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;
/// Offset of the first byte covered by the CRC.
const CRC_START: usize = 12;

// The diagram above: the last field (`log_position`, 8 bytes at 56) ends the 64-byte header,
// and the CRC covers everything after the crc field (4 bytes at 8).
const _: () = assert!(HEADER_BYTES == 64);
const _: () = assert!(56 + 8 == HEADER_BYTES);
const _: () = assert!(8 + 4 == CRC_START);
/// `flags` bit: the producer id/epoch/sequence fields are set.
pub const FLAG_IDEMPOTENT: u16 = 1;
/// `flags` bit: a gap record written by recovery in place of a quarantined corrupt record. It
/// holds no messages and gets no consume-queue entry; `queue_id`, `base_queue_offset` and
/// `message_count` (and the topic) repeat the lost record's header when that header was still
/// readable, else they are zero.
pub const FLAG_GAP: u16 = 2;

/// The fixed header of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordHeader {
    pub total_len: u32,
    pub crc32: u32,
    pub topic_len: u16,
    pub flags: u16,
    pub queue_id: u32,
    pub base_queue_offset: u64,
    pub message_count: u32,
    pub store_timestamp_ms: u64,
    pub producer_id: u64,
    pub producer_epoch: u16,
    pub base_sequence: u32,
    pub log_position: u64,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("need {need} bytes, have {have}")]
    UnexpectedEof { need: u64, have: u64 },
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("bad total length {total_len} (topic length {topic_len})")]
    BadLength { total_len: u32, topic_len: u16 },
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("record claims position {found}, found at {expected}")]
    WrongPosition { expected: u64, found: u64 },
    #[error("topic is not UTF-8")]
    TopicNotUtf8,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl RecordHeader {
    /// Encodes the header into 64 bytes. `crc32` is written as stored in `self`.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.total_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.crc32.to_le_bytes());
        b[12..14].copy_from_slice(&self.topic_len.to_le_bytes());
        b[14..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.queue_id.to_le_bytes());
        b[20..28].copy_from_slice(&self.base_queue_offset.to_le_bytes());
        b[28..32].copy_from_slice(&self.message_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.store_timestamp_ms.to_le_bytes());
        b[40..48].copy_from_slice(&self.producer_id.to_le_bytes());
        b[48..50].copy_from_slice(&self.producer_epoch.to_le_bytes());
        // 50..52 reserved, zero
        b[52..56].copy_from_slice(&self.base_sequence.to_le_bytes());
        b[56..64].copy_from_slice(&self.log_position.to_le_bytes());
        b
    }

    /// Decodes and bounds-checks a header (magic, length); does not check the CRC.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, RecordError> {
        if b.len() < HEADER_BYTES {
            return Err(RecordError::UnexpectedEof {
                need: HEADER_BYTES as u64,
                have: b.len() as u64,
            });
        }
        let magic = u32_at(b, 0);
        if magic != RECORD_MAGIC {
            return Err(RecordError::BadMagic { found: magic });
        }
        let h = RecordHeader {
            total_len: u32_at(b, 4),
            crc32: u32_at(b, 8),
            topic_len: u16_at(b, 12),
            flags: u16_at(b, 14),
            queue_id: u32_at(b, 16),
            base_queue_offset: u64_at(b, 20),
            message_count: u32_at(b, 28),
            store_timestamp_ms: u64_at(b, 32),
            producer_id: u64_at(b, 40),
            producer_epoch: u16_at(b, 48),
            base_sequence: u32_at(b, 52),
            log_position: u64_at(b, 56),
        };
        let min = HEADER_BYTES as u64 + u64::from(h.topic_len);
        if u64::from(h.total_len) < min || h.total_len > MAX_RECORD_BYTES {
            return Err(RecordError::BadLength {
                total_len: h.total_len,
                topic_len: h.topic_len,
            });
        }
        Ok(h)
    }

    /// Length of the body in bytes.
    pub fn body_len(&self) -> u32 {
        self.total_len - HEADER_BYTES as u32 - u32::from(self.topic_len)
    }

    /// A gap record left by recovery (see [`FLAG_GAP`]).
    pub fn is_gap(&self) -> bool {
        self.flags & FLAG_GAP != 0
    }

    /// The producer fields, if the record came from an idempotent producer.
    pub fn producer(&self) -> Option<(u64, u16, u32)> {
        (self.flags & FLAG_IDEMPOTENT != 0).then_some((
            self.producer_id,
            self.producer_epoch,
            self.base_sequence,
        ))
    }
}

/// Computes the CRC of a record from its parts without concatenating them: `header` is the
/// encoded header (its crc field is ignored).
pub fn record_crc(header: &[u8; HEADER_BYTES], topic: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[CRC_START..]);
    h.update(topic);
    h.update(body);
    h.finalize()
}

/// Builds the encoded header of a record with its CRC filled in.
pub fn build_header(mut h: RecordHeader, topic: &[u8], body: &[u8]) -> [u8; HEADER_BYTES] {
    h.total_len = (HEADER_BYTES + topic.len() + body.len()) as u32;
    h.topic_len = topic.len() as u16;
    h.crc32 = 0;
    let mut enc = h.encode();
    let crc = record_crc(&enc, topic, body);
    enc[8..12].copy_from_slice(&crc.to_le_bytes());
    enc
}

/// Encodes a whole record into a new vector (tests and tools; the log encodes in place).
pub fn encode_record(h: RecordHeader, topic: &str, body: &[u8]) -> Vec<u8> {
    let header = build_header(h, topic.as_bytes(), body);
    let mut v = Vec::with_capacity(HEADER_BYTES + topic.len() + body.len());
    v.extend_from_slice(&header);
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(body);
    v
}

/// A validated record borrowed from a byte slice.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub header: RecordHeader,
    pub topic: &'a str,
    pub body: &'a [u8],
    /// The whole record (header + topic + body).
    pub bytes: &'a [u8],
}

impl fmt::Debug for RecordView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordView")
            .field("header", &self.header)
            .field("topic", &self.topic)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl<'a> RecordView<'a> {
    /// Parses the record at the start of `b`, checking magic, length bounds and CRC.
    pub fn parse(b: &'a [u8]) -> Result<RecordView<'a>, RecordError> {
        let header = RecordHeader::decode(b)?;
        let total = header.total_len as usize;
        if b.len() < total {
            return Err(RecordError::UnexpectedEof {
                need: total as u64,
                have: b.len() as u64,
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&b[CRC_START..total]);
        let computed = hasher.finalize();
        if computed != header.crc32 {
            return Err(RecordError::CrcMismatch {
                stored: header.crc32,
                computed,
            });
        }
        let topic_end = HEADER_BYTES + header.topic_len as usize;
        let topic = std::str::from_utf8(&b[HEADER_BYTES..topic_end])
            .map_err(|_| RecordError::TopicNotUtf8)?;
        Ok(RecordView {
            header,
            topic,
            body: &b[topic_end..total],
            bytes: &b[..total],
        })
    }

    /// Like [`RecordView::parse`], and also checks that the record claims position `expected`.
    pub fn parse_at(b: &'a [u8], expected: u64) -> Result<RecordView<'a>, RecordError> {
        let v = Self::parse(b)?;
        check_position(&v.header, expected)?;
        Ok(v)
    }

    /// The length of the record at the start of `b` that claims position `expected`, from its
    /// header alone: magic, length and position are checked, the CRC is not (a reader that
    /// knows the bytes were checked before, or leaves that to its own reader).
    pub fn frame_at(b: &[u8], expected: u64) -> Result<usize, RecordError> {
        let header = RecordHeader::decode(b)?;
        check_position(&header, expected)?;
        let total = header.total_len as usize;
        if b.len() < total {
            return Err(RecordError::UnexpectedEof {
                need: total as u64,
                have: b.len() as u64,
            });
        }
        Ok(total)
    }

    /// Queue offset one past the last message of this record.
    pub fn end_offset(&self) -> u64 {
        self.header.base_queue_offset + u64::from(self.header.message_count)
    }
}

fn check_position(header: &RecordHeader, expected: u64) -> Result<(), RecordError> {
    if header.log_position != expected {
        return Err(RecordError::WrongPosition {
            expected,
            found: header.log_position,
        });
    }
    Ok(())
}

/// Iterates over records concatenated back to back (a fetch response). Yields an error once and
/// then stops if the bytes do not parse.
pub struct RecordIter<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> RecordIter<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        RecordIter {
            rest: b,
            failed: false,
        }
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordView<'a>, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        match RecordView::parse(self.rest) {
            Ok(v) => {
                self.rest = &self.rest[v.bytes.len()..];
                Some(Ok(v))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pos: u64) -> Vec<u8> {
        let h = RecordHeader {
            queue_id: 3,
            base_queue_offset: 10,
            message_count: 2,
            store_timestamp_ms: 7,
            log_position: pos,
            ..Default::default()
        };
        encode_record(h, "orders", b"hello world")
    }

    #[test]
    fn encoded_record_parses_back() {
        let b = sample(128);
        let v = RecordView::parse_at(&b, 128).unwrap();
        assert_eq!(v.topic, "orders");
        assert_eq!(v.body, b"hello world");
        assert_eq!(v.header.queue_id, 3);
        assert_eq!(v.end_offset(), 12);
        assert_eq!(v.header.body_len(), 11);
    }

    #[test]
    fn frame_at_checks_the_header_and_leaves_the_crc_alone() {
        let mut b = sample(128);
        assert_eq!(RecordView::frame_at(&b, 128).unwrap(), b.len());
        let body_byte = b.len() - 1;
        b[body_byte] ^= 0x01;
        assert_eq!(RecordView::frame_at(&b, 128).unwrap(), b.len());
        assert!(RecordView::parse_at(&b, 128).is_err());
        assert!(matches!(
            RecordView::frame_at(&b, 64),
            Err(RecordError::WrongPosition {
                expected: 64,
                found: 128
            })
        ));
        assert!(RecordView::frame_at(&b[..b.len() - 1], 128).is_err());
        b[0] ^= 0x01;
        assert!(RecordView::frame_at(&b, 128).is_err(), "bad magic");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let b = sample(0);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(
                RecordView::parse_at(&c, 0).is_err(),
                "flip at {i} not detected"
            );
        }
    }

    #[test]
    fn truncated_and_zero_inputs_are_errors_not_panics() {
        let b = sample(0);
        for n in 0..b.len() {
            assert!(RecordView::parse(&b[..n]).is_err());
        }
        assert!(matches!(
            RecordView::parse(&[0u8; 100]),
            Err(RecordError::BadMagic { found: 0 })
        ));
    }

    #[test]
    fn wrong_position_is_rejected() {
        let b = sample(4096);
        assert!(matches!(
            RecordView::parse_at(&b, 0),
            Err(RecordError::WrongPosition { .. })
        ));
    }

    #[test]
    fn iterator_walks_concatenated_records() {
        let mut b = sample(0);
        b.extend(sample(100));
        let all: Vec<_> = RecordIter::new(&b).collect();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|r| r.is_ok()));
        b.push(1);
        let all: Vec<_> = RecordIter::new(&b).collect();
        assert_eq!(all.len(), 3);
        assert!(all[2].is_err());
    }
}
