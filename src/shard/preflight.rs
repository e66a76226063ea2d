//! Start-up checks: each failure is one actionable line, found before any executor starts.
//!
//! io_uring setup failures inside glommio surface as panics or opaque errors deep in the
//! reactor; these checks look at the same things first (kernel, io_uring availability,
//! memlock, the data dir and whether it honours O_DIRECT) and say what to do.
//!
//! Each check is a reading of the host plus a verdict over what was read (`check_*` taking
//! values); `ringmq tune --check` prints the same verdicts, so it fails exactly where a broker
//! start would.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::storage::space::{describe_bytes, fs_space, is_disk_full};

/// glommio 0.9 needs io_uring features from Linux 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// glommio's default registered buffer memory per executor (`io_memory`).
pub const GLOMMIO_DEFAULT_IO_MEMORY_BYTES: u64 = 10 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("kernel {found} is too old: RingMQ needs Linux {}.{} or newer for io_uring", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("io_uring is disabled by sysctl kernel.io_uring_disabled={0}: run `sysctl -w kernel.io_uring_disabled=0` (or run as root / in the io_uring group)")]
    IoUringDisabled(u32),
    #[error("io_uring is not available ({0}): RingMQ needs io_uring; check seccomp/container policy and the kernel config")]
    IoUringUnavailable(std::io::Error),
    #[error("memlock limit is {limit_bytes} bytes but {shards} shards need {needed_bytes}: raise `ulimit -l`, run as root, or lower io_memory_bytes / the shard count")]
    MemlockTooSmall {
        limit_bytes: u64,
        needed_bytes: u64,
        shards: usize,
    },
    #[error("data dir {path}: {what}: {source}")]
    DataDir {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("data dir {path}: the data dir's file system is full ({} free): free space on it or use another --data-dir", describe_bytes(*.free_bytes))]
    DiskFull { path: String, free_bytes: u64 },
    #[error("data dir {path} is in memory (tmpfs/ramfs) or has no O_DIRECT, so an fdatasync would not make anything durable: use a disk-backed directory, or set allow_non_direct_io (--allow-non-direct-io) to run anyway")]
    NoDirectIo { path: String },
}

/// What the checks found that is worth a warning but not a refusal.
#[derive(Debug, Default)]
pub struct PreflightReport {
    pub kernel: String,
    pub direct_io: bool,
    pub warnings: Vec<String>,
}

/// Runs every check for a broker with `shards` shards on `data_dir`.
pub fn check(
    data_dir: &Path,
    shards: usize,
    io_memory_bytes: u64,
    allow_non_direct_io: bool,
) -> Result<PreflightReport, PreflightError> {
    let mut report = PreflightReport {
        kernel: kernel_release(),
        ..Default::default()
    };
    check_kernel(&report.kernel)?;
    check_io_uring()?;
    check_memlock_limit(is_root(), memlock_limit(), shards, io_memory_bytes)?;
    report.direct_io = check_data_dir(data_dir)?;
    if !report.direct_io {
        if !allow_non_direct_io {
            return Err(PreflightError::NoDirectIo {
                path: data_dir.display().to_string(),
            });
        }
        report.warnings.push(format!(
            "DATA DIR {} DOES NOT SUPPORT O_DIRECT: acks claim durability that this file system cannot give (allow_non_direct_io is set)",
            data_dir.display()
        ));
    }
    Ok(report)
}

/// The running kernel's release string (`uname -r`), or "unknown".
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Parses "6.18.44-fc" into (6, 18).
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses a kernel older than [`MIN_KERNEL`]; an unparseable release passes.
pub fn check_kernel(release: &str) -> Result<(), PreflightError> {
    match parse_kernel(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        // An unparseable release string is not worth refusing to start over.
        None => Ok(()),
        Some(_) => Err(PreflightError::KernelTooOld {
            found: release.to_string(),
        }),
    }
}

fn check_io_uring() -> Result<(), PreflightError> {
    check_io_uring_sysctl(io_uring_disabled_sysctl(), is_root())?;
    probe_io_uring()
}

/// `kernel.io_uring_disabled`, or `None` where the kernel has no such sysctl (before 6.6: on).
pub fn io_uring_disabled_sysctl() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().parse().unwrap_or(0))
}

/// The sysctl's verdict: 1 = only privileged users or the io_uring group; 2 = nobody.
pub fn check_io_uring_sysctl(disabled: Option<u32>, root: bool) -> Result<(), PreflightError> {
    match disabled {
        Some(v) if v == 2 || (v == 1 && !root) => Err(PreflightError::IoUringDisabled(v)),
        _ => Ok(()),
    }
}

/// Sets up (and closes) a tiny ring: the direct way to know io_uring works here (seccomp and
/// container policies block it without any sysctl saying so).
pub fn probe_io_uring() -> Result<(), PreflightError> {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup reads and writes `params`, which is large enough for the struct.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(PreflightError::IoUringUnavailable(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by the kernel and is owned here.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Linux's CAP_IPC_LOCK: io_uring does not charge registered buffers to memlock for it.
const CAP_IPC_LOCK: u32 = 14;

/// Whether this process has CAP_IPC_LOCK in its effective set (from `/proc/self/status`;
/// where that cannot be read, whether it is root). Root usually has it, but a container may
/// drop it (Docker does by default); then glommio's buffer registration meets memlock, and
/// glommio skips it with a warning and runs on unregistered buffers (seen here).
pub fn has_ipc_lock() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| cap_eff_has(&s, CAP_IPC_LOCK))
        .unwrap_or_else(is_root)
}

/// Whether the `CapEff:` line of a `/proc/<pid>/status` text has capability `cap`.
pub fn cap_eff_has(status: &str, cap: u32) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let mask = u64::from_str_radix(hex, 16).ok()?;
    Some(mask & (1 << cap) != 0)
}

/// RLIMIT_MEMLOCK's soft limit in bytes, `None` when unlimited or unreadable.
pub fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(lim.rlim_cur)
}

/// Locked memory `shards` executors need: their registered buffers plus a margin for the
/// rings themselves.
pub fn memlock_needed_bytes(shards: usize, io_memory_bytes: u64) -> u64 {
    let per_shard = if io_memory_bytes == 0 {
        GLOMMIO_DEFAULT_IO_MEMORY_BYTES
    } else {
        io_memory_bytes
    };
    per_shard * shards as u64 + (1 << 20)
}

/// The memlock verdict: moot for root or without a limit, else the limit must cover
/// [`memlock_needed_bytes`].
pub fn check_memlock_limit(
    root: bool,
    limit_bytes: Option<u64>,
    shards: usize,
    io_memory_bytes: u64,
) -> Result<(), PreflightError> {
    let Some(limit_bytes) = limit_bytes.filter(|_| !root) else {
        return Ok(());
    };
    let needed = memlock_needed_bytes(shards, io_memory_bytes);
    if needed > limit_bytes {
        return Err(PreflightError::MemlockTooSmall {
            limit_bytes,
            needed_bytes: needed,
            shards,
        });
    }
    Ok(())
}

/// Creates the data dir if needed, proves it is writable, and tells whether it honours
/// O_DIRECT (by writing one aligned block through it, the only test that cannot lie).
pub fn check_data_dir(data_dir: &Path) -> Result<bool, PreflightError> {
    let err = |what, source| PreflightError::DataDir {
        path: data_dir.display().to_string(),
        what,
        source,
    };
    // A full file system refuses the probes with ENOSPC: say that, not "not writable" or "no
    // O_DIRECT" (issue 14: a broker on a full disk was told its data dir was tmpfs).
    let full = |e: &std::io::Error| {
        is_disk_full(e).then(|| PreflightError::DiskFull {
            path: data_dir.display().to_string(),
            free_bytes: fs_space(data_dir).map_or(0, |s| s.available_bytes),
        })
    };
    let err = |what, source: std::io::Error| full(&source).unwrap_or(err(what, source));
    fs::create_dir_all(data_dir).map_err(|e| err("cannot create it", e))?;
    let probe = data_dir.join(".preflight-write-test");
    let created = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe);
    if let Err(e) = created {
        return Err(err("is not writable", e));
    }
    // The O_DIRECT block write first: on a full file system it is the probe that meets
    // ENOSPC, and that must read as "full", not as "no O_DIRECT".
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|f| write_aligned_block(&f));
    let direct = match direct {
        Ok(()) => true,
        Err(e) => {
            if let Some(full) = full(&e) {
                let _ = fs::remove_file(&probe);
                return Err(full);
            }
            // No O_DIRECT here: still prove the directory takes a plain write.
            let plain = OpenOptions::new()
                .write(true)
                .open(&probe)
                .and_then(|mut f| f.write_all(b"ok"));
            if let Err(e) = plain {
                let _ = fs::remove_file(&probe);
                return Err(err("is not writable", e));
            }
            false
        }
    };
    let _ = fs::remove_file(&probe);
    // Since Linux 6.6 tmpfs accepts O_DIRECT, but its fdatasync makes nothing durable.
    Ok(direct && !is_memory_fs(data_dir))
}

fn write_aligned_block(f: &fs::File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const BLOCK: usize = 4096;
    let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).expect("valid layout");
    // SAFETY: layout is non-zero sized; the buffer is freed below on every path.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    if buf.is_null() {
        return Err(std::io::Error::other("out of memory"));
    }
    // SAFETY: buf points to BLOCK initialized bytes, aligned for O_DIRECT.
    let n = unsafe { libc::pwrite(f.as_raw_fd(), buf as *const libc::c_void, BLOCK, 0) };
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    if n == BLOCK as isize {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// ramfs (libc does not name it).
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// Whether `path` lives in memory (tmpfs, ramfs): nothing there survives a crash.
pub fn is_memory_fs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into `s`; `c` is a valid NUL-terminated path.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe {
        libc::statfs(c.as_ptr(), &mut s) == 0
            && (s.f_type == libc::TMPFS_MAGIC || s.f_type == RAMFS_MAGIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_compared_numerically() {
        assert_eq!(parse_kernel("6.18.44-fc-v669"), Some((6, 18)));
        assert!(check_kernel("5.10.0").is_ok());
        assert!(check_kernel("5.4.0-generic").is_err());
        assert!(check_kernel("garbage").is_ok());
    }

    #[test]
    fn io_uring_sysctl_and_memlock_verdicts() {
        assert!(check_io_uring_sysctl(None, false).is_ok());
        assert!(check_io_uring_sysctl(Some(0), false).is_ok());
        assert!(check_io_uring_sysctl(Some(1), true).is_ok());
        assert!(check_io_uring_sysctl(Some(1), false).is_err());
        assert!(check_io_uring_sysctl(Some(2), true).is_err());
        // 8 MiB (this machine's limit): one shard at glommio's 10 MiB default does not fit.
        let limit = Some(8 << 20);
        assert!(check_memlock_limit(false, limit, 1, 0).is_err());
        assert!(check_memlock_limit(false, limit, 2, 3 << 20).is_ok());
        assert!(
            check_memlock_limit(true, limit, 8, 0).is_ok(),
            "CAP_IPC_LOCK"
        );
        assert!(check_memlock_limit(false, None, 8, 0).is_ok(), "unlimited");
        let status = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        assert_eq!(cap_eff_has(status, CAP_IPC_LOCK), Some(true));
        assert_eq!(
            cap_eff_has("CapEff:\t0000000000000000\n", CAP_IPC_LOCK),
            Some(false)
        );
        assert_eq!(cap_eff_has("no caps here", CAP_IPC_LOCK), None);
    }

    #[test]
    fn disk_backed_data_dir_passes_and_tmpfs_is_refused() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let report = check(dir.path(), 2, 0, false).unwrap();
        assert!(report.direct_io);
        let shm = Path::new("/dev/shm");
        if shm.exists() && is_memory_fs(shm) {
            let d = tempfile::tempdir_in(shm).unwrap();
            assert!(matches!(
                check(d.path(), 1, 0, false),
                Err(PreflightError::NoDirectIo { .. })
            ));
            let r = check(d.path(), 1, 0, true).unwrap();
            assert!(!r.direct_io && !r.warnings.is_empty());
        }
    }
}
