//! The file I/O the log needs, as a trait, so the same log code runs on real O_DIRECT files
//! ([`DmaBackend`]) and on a simulated disk that can crash (`SimBackend`, in `sim.rs`).
//!
//! Contract of an implementation: `write_at` positions and lengths are multiples of
//! [`BLOCK_BYTES`]; a completed `sync` makes every write that completed before it was issued
//! durable; directory operations (`create_zeroed`, `remove`, `rename`) are durable when they
//! return.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use crate::storage::space::{describe_bytes, disk_full_error, fs_space};

/// O_DIRECT alignment used for every write position and length.
pub const BLOCK_BYTES: u64 = 4096;

/// Rounds `v` down to a block boundary.
pub fn align_down(v: u64) -> u64 {
    v & !(BLOCK_BYTES - 1)
}

/// Rounds `v` up to a block boundary.
pub fn align_up(v: u64) -> u64 {
    align_down(v + BLOCK_BYTES - 1)
}

/// A buffer a backend can write from.
pub trait IoBuf: 'static {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Shrinks the buffer to `len` bytes (destructive).
    fn trim(&mut self, len: usize);
}

impl IoBuf for DmaBuffer {
    fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
    fn trim(&mut self, len: usize) {
        self.trim_to_size(len)
    }
}

impl IoBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
    fn trim(&mut self, len: usize) {
        self.truncate(len)
    }
}

/// An open file of a backend.
#[allow(async_fn_in_trait)]
pub trait BackendFile: 'static {
    type Buf: IoBuf;
    /// An aligned, zeroed buffer of `len` bytes (a multiple of [`BLOCK_BYTES`]).
    fn alloc_buf(&self, len: usize) -> Self::Buf;
    /// An aligned buffer of `len` bytes whose contents are unspecified: for a caller that
    /// writes every byte it hands to a write (the log's write chunks, which zero only their
    /// last block's tail). Zeroing a 1 MiB chunk per chunk was 13 % of an ASYNC append's CPU.
    fn alloc_write_buf(&self, len: usize) -> Self::Buf {
        self.alloc_buf(len)
    }
    /// Writes the whole buffer at `pos` (both aligned).
    async fn write_at(&self, buf: Self::Buf, pos: u64) -> io::Result<()>;
    /// [`Self::write_at`] from a buffer the caller keeps, so a write that failed because the
    /// disk was full can be issued again with the same bytes (the log's write path does).
    async fn write_shared(&self, buf: Rc<Self::Buf>, pos: u64) -> io::Result<()>;
    /// Bytes as a read returns them, in the backend's own buffer: a reader that checks them
    /// and copies them on (a fetch) copies once, not twice.
    type ReadBuf: std::ops::Deref<Target = [u8]>;
    /// Reads up to `len` bytes at `pos` (any alignment); fewer at EOF.
    async fn read_buf(&self, pos: u64, len: usize) -> io::Result<Self::ReadBuf>;
    /// [`Self::read_buf`], appended to `out`.
    async fn read_into(&self, pos: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(&self.read_buf(pos, len).await?);
        Ok(())
    }
    /// fdatasync.
    async fn sync(&self) -> io::Result<()>;
    /// [`Self::write_shared`] as a plain blocking syscall on the calling thread, which sleeps
    /// in the kernel until the device completes it: no io_uring worker, no reactor park and
    /// wake-up in between (`SyncFlushIo::Inline`; on this VM a 4 KiB write + fdatasync took
    /// 128 µs p50 so against 206 µs through io_uring).
    fn write_blocking(&self, buf: &Self::Buf, pos: u64) -> io::Result<()>;
    /// [`Self::sync`] as a blocking `fdatasync(2)` on the calling thread (see
    /// [`Self::write_blocking`]).
    fn sync_blocking(&self) -> io::Result<()>;
    async fn file_len(&self) -> io::Result<u64>;
}

/// See [`StorageBackend::create_zeroed_paced`].
pub type Pace<'a> = &'a dyn Fn(u64) -> Option<Duration>;

/// A directory of files.
#[allow(async_fn_in_trait)]
pub trait StorageBackend: Clone + 'static {
    type File: BackendFile;
    /// Opens an existing file for reading and writing.
    async fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates `path` with `len` bytes of written zeros, durably and atomically (a crash leaves
    /// either no file or the whole file). Replaces an existing file.
    async fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<()> {
        self.create_zeroed_paced(path, len, &|_| Some(Duration::ZERO))
            .await
    }
    /// [`Self::create_zeroed`] at a pace: before each part, `pace(bytes zeroed so far)` says
    /// how long to wait first. No wait: a burst of large writes; a wait: one small write;
    /// `None`: give up (the file is removed; the error is [`io::ErrorKind::Interrupted`]).
    async fn create_zeroed_paced(&self, path: &Path, len: u64, pace: Pace<'_>) -> io::Result<()>;
    /// Creates `path` with `len` bytes that read as zeros without writing them (fallocate:
    /// unwritten extents), durably and atomically like [`Self::create_zeroed`]. A backend
    /// without such a thing writes the zeros.
    async fn create_allocated(&self, path: &Path, len: u64) -> io::Result<()> {
        self.create_zeroed(path, len).await
    }
    /// Names of the files in `dir` (not recursive), unsorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to` (replacing it), content and all, durably (the directory is
    /// synced before it returns): how a dropped segment is recycled. No handle of `from` may
    /// be open.
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
}

/// An O_DIRECT write that wrote less than asked is an error (never a partial success).
fn whole_write(n: usize, want: usize, pos: u64) -> io::Result<()> {
    if n != want {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short O_DIRECT write: {n} of {want} bytes at {pos}"),
        ));
    }
    Ok(())
}

/// Real files with O_DIRECT through glommio's io_uring.
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaBackend;

/// A [`DmaFile`] opened for reading and writing.
pub struct DmaBackendFile {
    file: Rc<DmaFile>,
}

/// Size of each zero-write while preparing a file at full speed, and how many are in flight.
const PREPARE_WRITE_BYTES: usize = 1 << 20;
const PREPARE_WRITES_IN_FLIGHT: usize = 4;
/// Size of each zero-write while preparing at a pace: what an fdatasync of the active segment
/// may find in the device cache besides its own bytes (about 0.25 ms of this disk's time).
pub const PACED_WRITE_BYTES: usize = 256 << 10;

impl BackendFile for DmaBackendFile {
    type Buf = DmaBuffer;
    type ReadBuf = ReadResult;

    fn alloc_buf(&self, len: usize) -> DmaBuffer {
        let mut b = self.file.alloc_dma_buffer(len);
        b.as_bytes_mut().fill(0);
        b
    }

    fn alloc_write_buf(&self, len: usize) -> DmaBuffer {
        self.file.alloc_dma_buffer(len)
    }

    async fn write_at(&self, buf: DmaBuffer, pos: u64) -> io::Result<()> {
        let want = buf.len();
        let n = self
            .file
            .write_at(buf, pos)
            .await
            .map_err(io::Error::from)?;
        whole_write(n, want, pos)
    }

    async fn write_shared(&self, buf: Rc<DmaBuffer>, pos: u64) -> io::Result<()> {
        let want = buf.len();
        let n = self
            .file
            .write_rc_at(buf, pos)
            .await
            .map_err(io::Error::from)?;
        whole_write(n, want, pos)
    }

    async fn read_buf(&self, pos: u64, len: usize) -> io::Result<ReadResult> {
        self.file.read_at(pos, len).await.map_err(io::Error::from)
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(io::Error::from)
    }

    fn write_blocking(&self, buf: &DmaBuffer, pos: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let want = buf.len();
        let n = loop {
            // SAFETY: `buf` is a live, aligned buffer of `want` bytes; the call is synchronous.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    buf.as_ptr().cast(),
                    want,
                    pos as libc::off_t,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        whole_write(n, want, pos)
    }

    fn sync_blocking(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: a plain syscall on an open descriptor.
            if unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    async fn file_len(&self) -> io::Result<u64> {
        self.file.file_size().await.map_err(io::Error::from)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// fsync of a directory, so a rename or unlink in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Renames `from` to `to` and syncs the directory, so the rename survives a crash (blocking).
fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// [`rename_durable`] on glommio's blocking thread pool: a directory fsync waits for a
/// journal commit (milliseconds here), which must not stall the shard's appends and acks.
async fn rename_off_shard(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    glommio::executor()
        .spawn_blocking(move || rename_durable(&from, &to))
        .await
}

/// Writes `len` zero bytes to `tmp` with O_DIRECT, syncs it and renames it to `path` (durably).
async fn write_zeroed(tmp: &Path, path: &Path, len: u64, pace: Pace<'_>) -> io::Result<()> {
    // Written, not fallocated: fdatasync into unwritten extents costs 2x (NOTES.md).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(tmp)
        .await
        .map_err(io::Error::from)?;
    let f = Rc::new(f);
    let written = async {
        let mut pos = 0u64;
        while pos < len {
            let Some(wait) = pace(pos) else {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "segment preparation given up (the log is closing)",
                ));
            };
            let (writes, bytes) = if wait.is_zero() {
                (PREPARE_WRITES_IN_FLIGHT, PREPARE_WRITE_BYTES)
            } else {
                glommio::timer::sleep(wait).await;
                (1, PACED_WRITE_BYTES)
            };
            let mut batch = Vec::new();
            for _ in 0..writes {
                if pos >= len {
                    break;
                }
                let n = (len - pos).min(bytes as u64) as usize;
                let mut buf = f.alloc_dma_buffer(n);
                buf.as_bytes_mut().fill(0);
                let f = f.clone();
                let at = pos;
                batch.push(async move { f.write_at(buf, at).await });
                pos += n as u64;
            }
            for r in futures::future::join_all(batch).await {
                r.map_err(io::Error::from)?;
            }
        }
        f.fdatasync().await.map_err(io::Error::from)
    }
    .await;
    let _ = f.close_rc().await;
    written?;
    rename_off_shard(tmp, path).await
}

impl StorageBackend for DmaBackend {
    type File = DmaBackendFile;

    async fn open(&self, path: &Path) -> io::Result<DmaBackendFile> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map_err(io::Error::from)?;
        Ok(DmaBackendFile { file: Rc::new(f) })
    }

    async fn create_zeroed_paced(&self, path: &Path, len: u64, pace: Pace<'_>) -> io::Result<()> {
        // Fail fast, before a byte is written, when the file cannot fit: zero-writing a 1 GiB
        // segment into 300 MiB only fills the disk and then fails anyway.
        let parent = path.parent().unwrap_or(Path::new("."));
        if let Ok(space) = fs_space(parent) {
            if space.available_bytes < len {
                return Err(disk_full_error(format!(
                    "the file system has {} free and this file needs {}: free space on it \
                         or lower segment_bytes (--segment-bytes)",
                    describe_bytes(space.available_bytes),
                    describe_bytes(len)
                )));
            }
        }
        let tmp = tmp_path(path);
        let r = write_zeroed(&tmp, path, len, pace).await;
        if r.is_err() {
            // A partial file would keep the disk full after the failure (issue 14: a failed
            // start left a 267 MiB `.tmp` behind).
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    async fn create_allocated(&self, path: &Path, len: u64) -> io::Result<()> {
        let tmp = tmp_path(path);
        let (t, p) = (tmp.clone(), path.to_path_buf());
        // fallocate of a GiB is a metadata update (milliseconds, a journal commit in the
        // fsyncs): on the blocking pool, like the rename below.
        let r = glommio::executor()
            .spawn_blocking(move || {
                use std::os::fd::AsRawFd;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&t)?;
                let len = libc::off_t::try_from(len)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
                // SAFETY: a valid open descriptor; mode 0 allocates and extends the file.
                if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f.sync_all()?;
                drop(f);
                rename_durable(&t, &p)
            })
            .await;
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                v.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(v)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        rename_off_shard(from, to).await
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
}
