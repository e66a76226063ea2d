//! The fixed 32-byte frame preamble: its constants and where each field sits (the diagram is
//! in `frame.rs`). The offsets are derived from the field widths in wire order and pinned
//! to the diagram at compile time, so a change to one without the other does not build.

use std::mem::size_of;

use super::limits::PREAMBLE_BYTES;

/// `b"RQMW"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RQMW");

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;

/// Byte offsets of the preamble's fields, each one the previous plus its width.
pub(super) const MAGIC_AT: usize = 0;
pub(super) const VERSION_AT: usize = MAGIC_AT + size_of::<u32>();
pub(super) const FLAGS_AT: usize = VERSION_AT + size_of::<u8>();
const OPCODE_AT: usize = FLAGS_AT + size_of::<u8>();
const REQUEST_ID_AT: usize = OPCODE_AT + size_of::<u16>();
const HEADER_LEN_AT: usize = REQUEST_ID_AT + size_of::<u64>();
const BODY_LEN_AT: usize = HEADER_LEN_AT + size_of::<u32>();
const CRC_AT: usize = BODY_LEN_AT + size_of::<u32>();
const STATUS_AT: usize = CRC_AT + size_of::<u32>();
const RESERVED_AT: usize = STATUS_AT + size_of::<u16>();
const END: usize = RESERVED_AT + size_of::<u16>();

// The diagram in `frame.rs` and docs/design.md is a public contract: these are its numbers.
const _: () = assert!(
    END == PREAMBLE_BYTES,
    "the preamble's fields must fill 32 bytes"
);
const _: () = assert!(VERSION_AT == 4 && FLAGS_AT == 5 && OPCODE_AT == 6);
const _: () = assert!(REQUEST_ID_AT == 8 && HEADER_LEN_AT == 16 && BODY_LEN_AT == 20);
const _: () = assert!(CRC_AT == 24 && STATUS_AT == 28 && RESERVED_AT == 30);
// Header and body lengths travel as u32, so the largest frame's lengths must fit one.
const _: () = assert!(super::limits::MAX_FRAME_BYTES as u64 <= u32::MAX as u64);
