//! CommitLog segments: files named by the 20-digit zero-padded log position of their first
//! byte, each `segment_bytes` long. Position space is global; a segment covers
//! `[base, base + bytes)`. A record never spans two segments: when it does not fit, the rest of
//! the segment stays zero and the log continues at the next segment's base.
//!
//! A new segment is *prepared* off the hot path by writing zeros to all of it (and syncing),
//! so the write path only overwrites already-written blocks: fdatasync into fallocated but
//! unwritten extents costs 2x, appending past EOF 1.5x (NOTES.md).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::storage::backend::StorageBackend;

/// Width of a segment file name.
const NAME_DIGITS: usize = 20;

/// One segment file.
pub(crate) struct Segment<F> {
    pub base: u64,
    pub bytes: u64,
    pub file: F,
    pub path: PathBuf,
}

/// A shared segment of a log on backend `B` (the log, its chunks and recovery hold it).
pub(crate) type Seg<B> = Rc<Segment<<B as StorageBackend>::File>>;

impl<F> Segment<F> {
    pub fn end(&self) -> u64 {
        self.base + self.bytes
    }
}

/// `00000000000001048576` for base 1048576.
pub(crate) fn segment_name(base: u64) -> String {
    format!("{base:0NAME_DIGITS$}")
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_name(base))
}

/// The base of a segment file name, or None for any other file.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    if name.len() != NAME_DIGITS || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_others() {
        assert_eq!(segment_name(1048576), "00000000000001048576");
        assert_eq!(parse_segment_name("00000000000001048576"), Some(1048576));
        assert_eq!(parse_segment_name("00000000000001048576.tmp"), None);
        assert_eq!(parse_segment_name(".dma-probe"), None);
        assert_eq!(parse_segment_name("0000000000000104857x"), None);
    }
}
