//! A small real file system for disk-full tests: an ext4 image on a loop device, made by the
//! test and removed after it (also when the test fails: [`LoopFs`]'s Drop unmounts and deletes).
//! Tests that use one are serialized by an exclusive `flock` on `/tmp/ringmq-loop.lock`, so
//! they never fill each other's disk or race for loop devices.
//!
//! `mkfs.ext4 -m 0`: no blocks reserved for root, so what `df` calls available is what a root
//! broker and the test's filler file can write, and "full" means the same to both.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The lock every loop-device test holds for its whole life.
const LOCK_PATH: &str = "/tmp/ringmq-loop.lock";

/// A mounted ext4 file system of a few hundred MiB.
pub struct LoopFs {
    /// Where it is mounted (an empty file system but for `lost+found`).
    pub mount: PathBuf,
    image: PathBuf,
    mounted: bool,
    _work: tempfile::TempDir,
    _lock: File,
}

/// Why a loop file system cannot be made here (not root, no loop devices, no mkfs.ext4).
pub type SkipReason = String;

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopFs {
    /// Makes, formats and mounts an image of `mib` MiB. Holds the lock until dropped.
    pub fn new(mib: u64) -> Result<LoopFs, SkipReason> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: mounting a loop device needs root".into());
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(|e| format!("open {LOCK_PATH}: {e}"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "flock {LOCK_PATH}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let work = tempfile::Builder::new()
            .prefix("ringmq-loopfs-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .map_err(|e| format!("temp dir: {e}"))?;
        let image = work.path().join("fs.img");
        let mount = work.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| format!("mkdir {}: {e}", mount.display()))?;
        let mut fs = LoopFs {
            mount,
            image,
            mounted: false,
            _work: work,
            _lock: lock,
        };
        File::create(&fs.image)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| format!("create {}: {e}", fs.image.display()))?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&fs.image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&fs.image)
            .arg(&fs.mount))?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Bytes an unprivileged writer may still write (`df`'s Avail).
    pub fn available_bytes(&self) -> u64 {
        ringmq::storage::space::fs_space(&self.mount)
            .expect("statvfs")
            .available_bytes
    }

    /// `df`'s Use% as a fraction.
    pub fn used_ratio(&self) -> f64 {
        ringmq::storage::space::fs_space(&self.mount)
            .expect("statvfs")
            .used_ratio()
    }

    /// Writes a filler file at `path` (on this file system) until only about `leave` bytes
    /// are available, or until ENOSPC with `leave == 0`. Returns the bytes written.
    pub fn fill(&self, path: &Path, leave: u64) -> u64 {
        let mut f = File::options()
            .create(true)
            .append(true)
            .open(path)
            .expect("create the filler");
        let chunk = vec![0xF1u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let avail = self.available_bytes();
            if avail <= leave {
                break;
            }
            let n = ((avail - leave) as usize).min(chunk.len());
            match f.write(&chunk[..n]) {
                Ok(0) => break,
                Ok(k) => written += k as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
            // Delayed allocation: make the file system count the blocks now.
            f.sync_data().ok();
        }
        f.sync_all().ok();
        written
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            // A broker still stopping may hold files for a moment: retry, then detach lazily
            // so the image can go anyway.
            let mut ok = false;
            for _ in 0..20 {
                if run(Command::new("umount").arg(&self.mount)).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if !ok {
                let _ = run(Command::new("umount").arg("-l").arg(&self.mount));
            }
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Prints SKIP with the reason; under `CI=true` a skip is a failure.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot make a loop file system under CI=true: {reason}");
    }
    eprintln!("SKIP {test}: {reason}");
}
