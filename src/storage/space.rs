//! Free space on the file system that holds a shard's log, and how a full disk is recognised.
//!
//! - [`fs_space`]: one `statvfs(2)` call (cheap: ext4 answers from in-memory counters), in the
//!   units an operator sees in `df`: `available_bytes` is what an unprivileged writer may still
//!   use (`f_bavail`, so root's reserved blocks count as used: the broker never eats the
//!   reserve meant for the operator), and [`FsSpace::used_ratio`] is `df`'s Use%.
//! - [`is_disk_full`]: ENOSPC and EDQUOT, the two errors after which a write may succeed again
//!   once space is freed; every other I/O error is a fault of the device or a bug.
//!
//! Imports nothing else of storage, so any storage file may use it.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// Sizes of one file system, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    pub total_bytes: u64,
    /// Free for an unprivileged writer (`df`'s Avail).
    pub available_bytes: u64,
    /// Used, root's reserve not included (`df`'s Used).
    pub used_bytes: u64,
}

impl FsSpace {
    /// `df`'s Use%: used / (used + available), in `[0, 1]`.
    pub fn used_ratio(&self) -> f64 {
        let denom = self.used_bytes.saturating_add(self.available_bytes);
        if denom == 0 {
            return 1.0;
        }
        self.used_bytes as f64 / denom as f64
    }
}

/// `statvfs` of the file system holding `path`.
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: statvfs only writes into `s`; `c` is a valid NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = s.f_frsize as u64;
    let blocks = s.f_blocks as u64;
    let free = (s.f_bfree as u64).min(blocks);
    let avail = (s.f_bavail as u64).min(free);
    Ok(FsSpace {
        total_bytes: blocks * unit,
        available_bytes: avail * unit,
        used_bytes: (blocks - free) * unit,
    })
}

/// The DISK_FULL message when `space` is used above `ratio` (`None` when it is not): it names
/// the usage and the threshold, so a producer's error says what to free.
pub fn over_ratio_reason(space: &FsSpace, ratio: f64, dir: &Path) -> Option<String> {
    let used = space.used_ratio();
    (used > ratio).then(|| {
        format!(
            "disk usage {:.1} % of the file system holding {} is above disk_reject_ratio {:.1} % \
             ({} free of {}); writes resume when usage drops below it",
            used * 100.0,
            dir.display(),
            ratio * 100.0,
            describe_bytes(space.available_bytes),
            describe_bytes(space.total_bytes)
        )
    })
}

/// Whether `e` says the file system (or the user's quota) is full: retry once space is freed.
pub fn is_disk_full(e: &io::Error) -> bool {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        return true;
    }
    // glommio rebuilds errors from their kind and loses the errno. The kinds are taken from
    // the errnos (not named: `StorageFull` is newer than the crate's MSRV); a toolchain that
    // gives ENOSPC the same kind as EIO (uncategorized) cannot tell them apart by kind.
    let eio = io::Error::from_raw_os_error(libc::EIO).kind();
    [libc::ENOSPC, libc::EDQUOT].iter().any(|&n| {
        let kind = io::Error::from_raw_os_error(n).kind();
        kind != eio && kind != io::ErrorKind::Other && e.kind() == kind
    })
}

/// An error of the kind ENOSPC maps to, with a message of ours.
pub fn disk_full_error(message: String) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(libc::ENOSPC).kind(), message)
}

/// `64 MiB (67108864 bytes)`: sizes in disk-full messages, readable and exact.
pub fn describe_bytes(n: u64) -> String {
    const MIB: u64 = 1 << 20;
    if n >= MIB {
        format!("{:.1} MiB ({n} bytes)", n as f64 / MIB as f64)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_disk_full_and_eio_is_not() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::EDQUOT)));
        // glommio rebuilds errors from their kind, losing the errno.
        let rebuilt = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_disk_full(&io::Error::new(
            rebuilt.kind(),
            "Writing ... No space left on device"
        )));
        assert!(is_disk_full(&disk_full_error("ours".into())));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!is_disk_full(&io::Error::other("x")));
    }

    #[test]
    fn the_ratio_is_dfs_use_percent() {
        let s = FsSpace {
            total_bytes: 100,
            available_bytes: 20,
            used_bytes: 75,
        };
        assert!((s.used_ratio() - 75.0 / 95.0).abs() < 1e-9);
        let why = over_ratio_reason(&s, 0.5, Path::new("/d")).unwrap();
        assert!(why.contains("78.9 %") && why.contains("50.0 %"), "{why}");
        assert_eq!(over_ratio_reason(&s, 0.9, Path::new("/d")), None);
        let full = FsSpace {
            available_bytes: 0,
            used_bytes: 100,
            ..s
        };
        assert_eq!(
            over_ratio_reason(&full, 1.0, Path::new("/d")),
            None,
            "1.0 is off"
        );
        let here = fs_space(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(here.total_bytes > 0 && here.used_ratio() <= 1.0);
    }
}
