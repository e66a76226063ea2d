//! CommitLog segments: files named by the 20-digit zero-padded log position of their first
//! byte, each `segment_bytes` long. Position space is global; a segment covers
//! `[base, base + bytes)`. A record never spans two segments: when it does not fit, the rest of
//! the segment is zero (the roll writes zeros there) and the log continues at the next segment's base.
//!
//! A segment dropped by retention may be *recycled* instead of deleted (see
//! `StorageConfig::recycle_segments`): renamed to become a later segment with its old bytes in
//! it. Nothing of its previous life can pass for a record (each record carries its own log
//! position, the old ones are all from lower positions); recovery reads only up to the write
//! reservation (`checkpoint.rs`), and what it finds there that is not a record is a torn
//! tail it zeroes; and a roll writes zeros over the rest of the segment it leaves, so a
//! sealed segment ends in zeros as a prepared one does.
//!
//! A new segment is otherwise *prepared* off the hot path by writing zeros to all of it (and syncing),
//! so the write path only overwrites already-written blocks: fdatasync into fallocated but
//! unwritten extents costs 2x, appending past EOF 1.5x (NOTES.md). The zeros are written at a
//! pace ([`zeroing_wait`]): every fdatasync of the active segment also flushes the zeros the
//! device caches, and zeroing at full speed made each SYNC_FLUSH ack wait ~17 ms for the first
//! ~10 s of a new broker (issue 16).

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::storage::backend::StorageBackend;

/// A paced zero-write that would wait less than this goes at full speed instead.
const FULL_SPEED_BELOW: Duration = Duration::from_micros(500);

/// How long the preparation of the next segment waits before zeroing its next `chunk` bytes.
/// `room`: bytes left in the active segment; `left`: bytes of the next one still to zero;
/// `rate`: the log's append rate (bytes/s) while this preparation runs; `floor`: the pace when
/// the log is idle or far from its end (bytes/s; 0 means no pacing). The pace is what finishes
/// the next segment by the time half of `room` is used at `rate`, and at least `floor`.
pub(crate) fn zeroing_wait(room: u64, left: u64, rate: f64, floor: u64, chunk: u64) -> Duration {
    if floor == 0 || left == 0 {
        return Duration::ZERO;
    }
    let half_room = room as f64 / 2.0;
    let needed = if half_room < 1.0 {
        f64::INFINITY
    } else {
        left as f64 * rate.max(0.0) / half_room
    };
    let pace = needed.max(floor as f64);
    let wait = Duration::from_secs_f64((chunk as f64 / pace).min(1.0));
    if wait < FULL_SPEED_BELOW {
        Duration::ZERO
    } else {
        wait
    }
}

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
/// Creates the segment file at `path` at full speed, the way `cfg.segment_prepare` says (the
/// first segment of a new or reset log; later ones are prepared ahead, at a pace, by the log).
pub(crate) async fn create_segment<B: StorageBackend>(
    backend: &B,
    path: &Path,
    cfg: &crate::storage::StorageConfig,
) -> std::io::Result<()> {
    if cfg.segment_prepare.allocates(cfg.flush_mode) {
        backend.create_allocated(path, cfg.segment_bytes).await
    } else {
        backend.create_zeroed(path, cfg.segment_bytes).await
    }
}

pub(crate) fn segment_name(base: u64) -> String {
    format!("{base:0NAME_DIGITS$}")
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_name(base))
}

/// Where a dropped segment waits to be reused: `<name>.recycled` in the log's directory (a
/// name no open takes for a segment).
pub(crate) fn recycled_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{}.recycled", segment_name(base)))
}

/// A recycled segment's file name (see [`recycled_path`]).
pub(crate) fn is_recycled_name(name: &str) -> bool {
    name.strip_suffix(".recycled")
        .is_some_and(|n| parse_segment_name(n).is_some())
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
    fn zeroing_goes_at_the_floor_when_idle_and_speeds_up_as_the_segment_fills() {
        const MIB: u64 = 1 << 20;
        let chunk = 256 * 1024;
        let floor = 32 * MIB;
        // Idle log: the floor, 256 KiB every 7.8 ms.
        let idle = zeroing_wait(1024 * MIB, 1024 * MIB, 0.0, floor, chunk);
        assert_eq!(idle, Duration::from_nanos(7_812_500));
        // 10 MiB/s of appends into a fresh 1 GiB segment: half of it lasts 51 s, the floor is
        // faster than needed.
        assert_eq!(
            zeroing_wait(1024 * MIB, 1024 * MIB, 10.0 * MIB as f64, floor, chunk),
            idle
        );
        // 100 MiB/s with 512 MiB of room: 1 GiB in 2.56 s is 400 MiB/s, 256 KiB per 0.625 ms.
        let w = zeroing_wait(512 * MIB, 1024 * MIB, 100.0 * MIB as f64, floor, chunk);
        assert_eq!(w, Duration::from_micros(625));
        // Faster than the disk would take it, or no room left: full speed.
        assert_eq!(
            zeroing_wait(64 * MIB, 1024 * MIB, 100.0 * MIB as f64, floor, chunk),
            Duration::ZERO
        );
        assert_eq!(
            zeroing_wait(0, 1024 * MIB, 0.0, floor, chunk),
            Duration::ZERO
        );
        // Pacing off, or nothing left.
        assert_eq!(
            zeroing_wait(1024 * MIB, 1024 * MIB, 0.0, 0, chunk),
            Duration::ZERO
        );
        assert_eq!(
            zeroing_wait(1024 * MIB, 0, 0.0, floor, chunk),
            Duration::ZERO
        );
    }

    #[test]
    fn names_round_trip_and_reject_others() {
        assert_eq!(segment_name(1048576), "00000000000001048576");
        assert_eq!(parse_segment_name("00000000000001048576"), Some(1048576));
        assert_eq!(parse_segment_name("00000000000001048576.tmp"), None);
        assert_eq!(parse_segment_name(".dma-probe"), None);
        assert_eq!(parse_segment_name("0000000000000104857x"), None);
        let p = recycled_path(Path::new("/d"), 65536);
        assert_eq!(p, Path::new("/d/00000000000000065536.recycled"));
        assert!(is_recycled_name("00000000000000065536.recycled"));
        assert!(!is_recycled_name("00000000000000065536"));
        assert!(!is_recycled_name("x.recycled"));
    }
}
