//! The frame: a fixed 32-byte preamble, a FlatBuffers header and a raw body.
//!
//! ```text
//!  0               4       5       6               8
//!  +---------------+-------+-------+---------------+
//!  | magic u32     | ver u8|flags u8| opcode u16   |
//!  +---------------+-------+-------+---------------+
//!  8                                               16
//!  +-----------------------------------------------+
//!  | request_id u64                                |
//!  +-----------------------------------------------+
//!  16              20              24              28      30      32
//!  +---------------+---------------+---------------+-------+-------+
//!  | header_len u32| body_len u32  | crc32 u32     |status |reserv.|
//!  +---------------+---------------+---------------+-------+-------+
//!  32                     32 + header_len               + body_len
//!  +----------------------+------------------------------+
//!  | header (FlatBuffers) | body (raw, e.g. a batch)     |
//!  +----------------------+------------------------------+
//! ```
//!
//! All integers are little-endian. `magic` is `b"RQMW"`. `flags`: bit 0 RESPONSE, bit 1 ONEWAY
//! (a request the sender wants no answer to), other bits must be 0, and RESPONSE with ONEWAY is
//! invalid. `crc32` is CRC-32 (crc32fast, IEEE) over the header bytes then the body bytes; the
//! preamble itself is checked structurally (magic, version, reserved, limits), not by the CRC.
//! `status` is an [`ErrorCode`](super::ErrorCode) in responses and 0 in requests. `reserved`
//! must be 0.
//!
//! # Decoding contract
//! - `Ok(None)` means "need more bytes" and leaves the buffer as it is.
//! - The preamble is validated as soon as its bytes are in: the magic after 4 bytes, the version
//!   after 5, everything else after 32, including header and body lengths against
//!   [`MAX_HEADER_BYTES`] and [`MAX_BODY_BYTES`]. So a frame announcing 4 GiB fails before a
//!   single byte of it is awaited or allocated.
//! - The CRC is checked once the whole frame is in.
//! - On error the buffer is left as it is: the stream is no longer trusted (a length may be what
//!   was corrupted), so the caller answers if [`WireError::request_id`] allows and closes.
//! - On success the frame's bytes are split off the front of the buffer; header and body are
//!   zero-copy views of them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::WireError;
use super::limits::{
    MAX_BODY_BYTES, MAX_HEADER_BYTES, PARTIAL_FRAME_RESERVE_BYTES, PREAMBLE_BYTES,
};
use super::preamble::{FLAGS_AT, MAGIC, MAGIC_AT, VERSION, VERSION_AT};

/// The flags byte of a preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrameFlags(u8);

impl FrameFlags {
    /// No flags: a request that expects a response.
    pub const EMPTY: FrameFlags = FrameFlags(0);
    /// The frame answers a request.
    pub const RESPONSE: FrameFlags = FrameFlags(0b01);
    /// A request the sender wants no response to.
    pub const ONEWAY: FrameFlags = FrameFlags(0b10);
    const KNOWN_BITS: u8 = 0b11;

    /// The raw byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Accepts only defined bits and never RESPONSE together with ONEWAY.
    pub const fn from_bits(bits: u8) -> Option<FrameFlags> {
        if bits & !Self::KNOWN_BITS != 0 || bits == Self::KNOWN_BITS {
            None
        } else {
            Some(FrameFlags(bits))
        }
    }

    /// Whether the RESPONSE bit is set.
    pub const fn is_response(self) -> bool {
        self.0 & Self::RESPONSE.0 != 0
    }

    /// Whether the ONEWAY bit is set.
    pub const fn is_oneway(self) -> bool {
        self.0 & Self::ONEWAY.0 != 0
    }
}

/// One decoded (or to-be-encoded) frame. `header` and `body` are views into the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Raw opcode; see [`Opcode`](super::Opcode). Kept raw so a frame with an unknown opcode can
    /// still be answered.
    pub opcode: u16,
    pub flags: FrameFlags,
    /// Chosen by the client, echoed in the response, so a connection can pipeline.
    pub request_id: u64,
    /// [`ErrorCode`](super::ErrorCode) number in a response; 0 in a request.
    pub status: u16,
    /// FlatBuffers header (may be empty for error responses and field-less requests).
    pub header: Bytes,
    /// Raw body: a message batch for Produce and Fetch, an error message for error responses.
    pub body: Bytes,
}

/// The preamble's fields after validation.
#[derive(Debug, Clone, Copy)]
struct Preamble {
    opcode: u16,
    flags: FrameFlags,
    request_id: u64,
    header_len: u32,
    body_len: u32,
    crc32: u32,
    status: u16,
}

impl Preamble {
    fn frame_len(&self) -> usize {
        PREAMBLE_BYTES + self.header_len as usize + self.body_len as usize
    }
}

/// Validates as much of the preamble as `buf` holds. `Ok(None)`: fewer than 32 bytes and no
/// error in those present.
fn parse_preamble(buf: &[u8]) -> Result<Option<Preamble>, WireError> {
    if let Some(magic) = buf.get(MAGIC_AT..VERSION_AT) {
        let magic = u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]);
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
    }
    if let Some(&version) = buf.get(VERSION_AT) {
        if version != VERSION {
            return Err(WireError::UnsupportedVersion { found: version });
        }
    }
    if buf.len() < PREAMBLE_BYTES {
        return Ok(None);
    }
    let mut p = &buf[FLAGS_AT..PREAMBLE_BYTES];
    let flags_raw = p.get_u8();
    let opcode = p.get_u16_le();
    let request_id = p.get_u64_le();
    let header_len = p.get_u32_le();
    let body_len = p.get_u32_le();
    let crc32 = p.get_u32_le();
    let status = p.get_u16_le();
    let reserved = p.get_u16_le();
    debug_assert!(p.is_empty());

    if reserved != 0 {
        return Err(WireError::ReservedNotZero {
            request_id,
            found: reserved,
        });
    }
    let flags = FrameFlags::from_bits(flags_raw).ok_or(WireError::InvalidFlags {
        request_id,
        flags: flags_raw,
    })?;
    if !flags.is_response() && status != 0 {
        return Err(WireError::StatusInRequest { request_id, status });
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(WireError::HeaderTooLarge {
            request_id,
            len: header_len,
            max: MAX_HEADER_BYTES,
        });
    }
    if body_len > MAX_BODY_BYTES {
        return Err(WireError::BodyTooLarge {
            request_id,
            len: body_len,
            max: MAX_BODY_BYTES,
        });
    }
    Ok(Some(Preamble {
        opcode,
        flags,
        request_id,
        header_len,
        body_len,
        crc32,
        status,
    }))
}

/// Checks the CRC of a complete frame held in `frame[..p.frame_len()]`.
fn check_crc(p: &Preamble, frame: &[u8]) -> Result<(), WireError> {
    let actual = crc32fast::hash(&frame[PREAMBLE_BYTES..p.frame_len()]);
    if actual != p.crc32 {
        return Err(WireError::CrcMismatch {
            request_id: p.request_id,
            expected: p.crc32,
            actual,
        });
    }
    Ok(())
}

impl Frame {
    /// Decodes one frame from the front of `buf`, zero-copy. See the module doc for the
    /// contract. Once the preamble is accepted, reserves room for more of the frame so the next
    /// socket read can land in place, but only in step with what has arrived (see
    /// [`PARTIAL_FRAME_RESERVE_BYTES`]): the announced length is a claim, not yet bytes.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(p) = parse_preamble(buf)? else {
            return Ok(None);
        };
        let frame_len = p.frame_len();
        if buf.len() < frame_len {
            let missing = frame_len - buf.len();
            buf.reserve(missing.min(buf.len().max(PARTIAL_FRAME_RESERVE_BYTES)));
            return Ok(None);
        }
        check_crc(&p, buf)?;
        let mut bytes = buf.split_to(frame_len).freeze();
        bytes.advance(PREAMBLE_BYTES);
        let header = bytes.split_to(p.header_len as usize);
        Ok(Some(Frame {
            opcode: p.opcode,
            flags: p.flags,
            request_id: p.request_id,
            status: p.status,
            header,
            body: bytes,
        }))
    }

    /// The length of the frame at the front of `buf` as its preamble announces it (within the
    /// wire limits), once the preamble is there. For a reader that trusts its peer enough to
    /// make room for the whole frame at once (the client, of its broker's answers).
    pub fn announced_len(buf: &[u8]) -> Option<usize> {
        parse_preamble(buf).ok().flatten().map(|p| p.frame_len())
    }

    /// Like [`Frame::decode`] over a borrowed slice: returns the frame (header and body copied)
    /// and how many bytes it used. Handy for tests and for callers without a `BytesMut`.
    pub fn decode_slice(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        let Some(p) = parse_preamble(buf)? else {
            return Ok(None);
        };
        let frame_len = p.frame_len();
        if buf.len() < frame_len {
            return Ok(None);
        }
        check_crc(&p, buf)?;
        let header_end = PREAMBLE_BYTES + p.header_len as usize;
        let frame = Frame {
            opcode: p.opcode,
            flags: p.flags,
            request_id: p.request_id,
            status: p.status,
            header: Bytes::copy_from_slice(&buf[PREAMBLE_BYTES..header_end]),
            body: Bytes::copy_from_slice(&buf[header_end..frame_len]),
        };
        Ok(Some((frame, frame_len)))
    }

    /// Bytes [`Frame::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        PREAMBLE_BYTES + self.header.len() + self.body.len()
    }

    /// Whether a peer would accept this frame's lengths. [`Frame::encode`] does not check them:
    /// handlers build bodies within [`MAX_BODY_BYTES`] (a fetch caps its `max_bytes`), and this
    /// is for callers that build frames from outside input.
    pub fn check_limits(&self) -> Result<(), WireError> {
        let request_id = self.request_id;
        let header_len = u32::try_from(self.header.len()).unwrap_or(u32::MAX);
        if header_len > MAX_HEADER_BYTES {
            return Err(WireError::HeaderTooLarge {
                request_id,
                len: header_len,
                max: MAX_HEADER_BYTES,
            });
        }
        let body_len = u32::try_from(self.body.len()).unwrap_or(u32::MAX);
        if body_len > MAX_BODY_BYTES {
            return Err(WireError::BodyTooLarge {
                request_id,
                len: body_len,
                max: MAX_BODY_BYTES,
            });
        }
        Ok(())
    }

    /// Appends the encoded frame to `out`. The frame must be within the limits (see
    /// [`Frame::check_limits`]); that is asserted in debug builds.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        self.encode_head(out);
        out.put_slice(&self.body);
    }

    /// [`Frame::encode`] without the body: the preamble (its CRC covers the body too) and the
    /// header. The body follows as it is, for a writer that sends it without copying it.
    pub fn encode_head(&self, out: &mut BytesMut) {
        debug_assert!(self.check_limits().is_ok(), "frame over the wire limits");
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.header);
        crc.update(&self.body);

        out.reserve(PREAMBLE_BYTES + self.header.len());
        out.put_u32_le(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.flags.bits());
        out.put_u16_le(self.opcode);
        out.put_u64_le(self.request_id);
        // Lengths fit: the limits are far below u32::MAX (asserted above).
        out.put_u32_le(self.header.len() as u32);
        out.put_u32_le(self.body.len() as u32);
        out.put_u32_le(crc.finalize());
        out.put_u16_le(self.status);
        out.put_u16_le(0);
        out.put_slice(&self.header);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame {
            opcode: 10,
            flags: FrameFlags::EMPTY,
            request_id: 0x0102_0304_0506_0708,
            status: 0,
            header: Bytes::from_static(b"header"),
            body: Bytes::from_static(b"the body"),
        }
    }

    fn encoded(f: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        f.encode(&mut out);
        out
    }

    #[test]
    fn preamble_layout_matches_the_diagram() {
        let b = encoded(&sample());
        assert_eq!(&b[0..4], b"RQMW");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 0);
        assert_eq!(&b[6..8], &10u16.to_le_bytes());
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[16..20], &6u32.to_le_bytes());
        assert_eq!(&b[20..24], &8u32.to_le_bytes());
        assert_eq!(
            &b[24..28],
            &crc32fast::hash(b"headerthe body").to_le_bytes()
        );
        assert_eq!(&b[28..32], &[0, 0, 0, 0]);
        assert_eq!(&b[32..], b"headerthe body");
        assert_eq!(b.len(), sample().encoded_len());
    }

    #[test]
    fn decode_takes_exactly_one_frame_and_leaves_the_next() {
        let mut b = encoded(&sample());
        let mut second = sample();
        second.request_id = 2;
        second.encode(&mut b);
        let f = Frame::decode(&mut b).unwrap().unwrap();
        assert_eq!(f, sample());
        assert_eq!(b.len(), second.encoded_len());
        assert_eq!(Frame::decode(&mut b).unwrap().unwrap(), second);
        assert!(b.is_empty());
        assert_eq!(Frame::decode(&mut b).unwrap(), None);
    }

    #[test]
    fn bad_magic_fails_after_four_bytes() {
        let mut b = BytesMut::from(&b"GET "[..]);
        assert!(matches!(
            Frame::decode(&mut b),
            Err(WireError::BadMagic { .. })
        ));
        let mut b = BytesMut::from(&b"RQM"[..]);
        assert_eq!(Frame::decode(&mut b).unwrap(), None);
    }

    #[test]
    fn flags_with_undefined_bits_or_response_and_oneway_are_rejected() {
        assert_eq!(FrameFlags::from_bits(0b11), None);
        assert_eq!(FrameFlags::from_bits(0b100), None);
        assert!(FrameFlags::from_bits(0b10).unwrap().is_oneway());
        let mut b = encoded(&sample());
        b[5] = 0x80;
        assert_eq!(
            Frame::decode(&mut b),
            Err(WireError::InvalidFlags {
                request_id: sample().request_id,
                flags: 0x80
            })
        );
    }

    #[test]
    fn a_request_with_a_status_is_rejected() {
        let mut b = encoded(&sample());
        b[28] = 3;
        assert!(matches!(
            Frame::decode(&mut b),
            Err(WireError::StatusInRequest { status: 3, .. })
        ));
    }

    #[test]
    fn a_partial_frame_reserves_room_for_the_rest() {
        let full = encoded(&sample());
        let mut b = BytesMut::from(&full[..PREAMBLE_BYTES]);
        assert_eq!(Frame::decode(&mut b).unwrap(), None);
        assert!(b.capacity() >= full.len());
        assert_eq!(b.len(), PREAMBLE_BYTES);
    }

    #[test]
    fn a_preamble_announcing_a_large_body_reserves_only_in_step_with_arrivals() {
        let mut big = sample();
        big.body = Bytes::from(vec![7u8; MAX_BODY_BYTES as usize]);
        let full = encoded(&big);
        let mut b = BytesMut::from(&full[..PREAMBLE_BYTES]);
        assert_eq!(Frame::decode(&mut b).unwrap(), None);
        assert!(
            b.capacity() <= 2 * PARTIAL_FRAME_RESERVE_BYTES,
            "32 bytes in made the buffer reserve {} bytes",
            b.capacity()
        );
        // As bytes arrive the reservation follows them, and the frame still decodes.
        let mut at = PREAMBLE_BYTES;
        while at < full.len() {
            let n = (full.len() - at).min(b.capacity() - b.len()).max(1);
            b.extend_from_slice(&full[at..at + n]);
            at += n;
            if at < full.len() {
                assert_eq!(Frame::decode(&mut b).unwrap(), None);
                assert!(
                    b.capacity() <= 4 * b.len() + 2 * PARTIAL_FRAME_RESERVE_BYTES,
                    "{} bytes in, {} reserved",
                    b.len(),
                    b.capacity()
                );
            }
        }
        assert_eq!(Frame::decode(&mut b).unwrap().unwrap(), big);
    }
}
