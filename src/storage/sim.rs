//! A simulated disk for crash tests. Every file has a *written* image (what reads see) and a
//! *durable* image (what survives a crash). `sync` copies written to durable. [`SimBackend::crash`]
//! models a power loss: each 4 KiB block written since the last sync independently keeps its old
//! content, its new content, a torn prefix of the new content, or garbage in the bytes the write
//! was changing — disks with a write cache persist unsynced writes in any order. (Bytes a write
//! rewrites with the same value stay intact: sectors are old or new, never random.) Handles opened before a crash fail afterwards, so
//! the old store instance poisons itself and stops.
//!
//! Unsynced metadata is lost as well: a file's length after a crash is its length at its last
//! sync. This is at least as strict as the real contract (`backend.rs`): only a completed sync
//! makes data durable; `create_zeroed` and `remove` are durable when they return.
//!
//! Faults can be injected: the next write or the next sync fails.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::storage::backend::{BackendFile, Pace, StorageBackend, BLOCK_BYTES};

/// What [`BackendFile::alloc_write_buf`] fills its buffers with here.
const GARBAGE: u8 = 0xA5;

#[derive(Default)]
struct Image {
    written: Vec<u8>,
    durable: Vec<u8>,
    dirty_blocks: BTreeSet<u64>,
    /// What the file held when it got its present name by [`StorageBackend::rename`] (a
    /// recycled segment's previous life); `None` for a file created under it.
    renamed_with: Option<Vec<u8>>,
}

#[derive(Default)]
struct Disk {
    files: HashMap<PathBuf, Image>,
    generation: u64,
    fail_next_write: bool,
    fail_next_sync: bool,
    /// Writes and file creations fail with ENOSPC while set (a full disk).
    full: bool,
    writes: u64,
    syncs: u64,
    renames: u64,
}

/// The simulated disk; clones share it. A clone binds to the disk's current generation on its
/// first use, and fails every operation after a crash (the old process is dead): pass a fresh
/// clone to each store instance.
#[derive(Default)]
pub struct SimBackend {
    disk: Rc<RefCell<Disk>>,
    bound: Cell<Option<u64>>,
}

impl Clone for SimBackend {
    fn clone(&self) -> Self {
        SimBackend {
            disk: self.disk.clone(),
            bound: Cell::new(None),
        }
    }
}

/// A file handle on the simulated disk.
pub struct SimFile {
    disk: Rc<RefCell<Disk>>,
    path: PathBuf,
    generation: u64,
}

/// Small deterministic generator (xorshift64*), so the library needs no `rand`.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn crashed() -> io::Error {
    io::Error::other("simulated disk crashed; handle is stale")
}

impl SimBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next write fails with EIO.
    pub fn fail_next_write(&self) {
        self.disk.borrow_mut().fail_next_write = true;
    }

    /// The next fdatasync fails with EIO.
    pub fn fail_next_sync(&self) {
        self.disk.borrow_mut().fail_next_sync = true;
    }

    /// While `full`, every write and file creation fails with ENOSPC, as on a full disk; reads
    /// and syncs still work.
    pub fn set_full(&self, full: bool) {
        self.disk.borrow_mut().full = full;
    }

    /// Number of completed syncs and writes so far.
    pub fn counts(&self) -> (u64, u64) {
        let d = self.disk.borrow();
        (d.writes, d.syncs)
    }

    /// Power loss: unsynced blocks keep old, new, torn or garbage content (seeded). All open
    /// handles become stale.
    pub fn crash(&self, seed: u64) {
        let mut rng = XorShift(seed | 1);
        let mut d = self.disk.borrow_mut();
        d.generation += 1;
        d.fail_next_sync = false;
        d.fail_next_write = false;
        let mut paths: Vec<PathBuf> = d.files.keys().cloned().collect();
        paths.sort();
        for p in paths {
            let img = d.files.get_mut(&p).expect("listed");
            // Unsynced metadata is lost too: a file keeps its durable length (fdatasync is
            // what makes a size change durable), so blocks written past it vanish.
            let mut result = img.durable.clone();
            for &blk in &img.dirty_blocks {
                let start = (blk * BLOCK_BYTES) as usize;
                let end = (start + BLOCK_BYTES as usize).min(result.len());
                if start >= end {
                    continue;
                }
                match rng.next() % 10 {
                    0..=3 => {} // old content
                    4..=6 => result[start..end].copy_from_slice(&img.written[start..end]),
                    7..=8 => {
                        let cut = start + (rng.next() as usize % (end - start));
                        result[start..cut].copy_from_slice(&img.written[start..cut]);
                    }
                    _ => {
                        // Garbage, but only in bytes the write was changing: a sector is old or
                        // new, so rewriting a partial tail block never damages its unchanged
                        // (already durable) prefix.
                        let old = img
                            .durable
                            .iter()
                            .chain(std::iter::repeat(&0u8))
                            .skip(start);
                        for ((r, &new), &old) in result[start..end]
                            .iter_mut()
                            .zip(&img.written[start..end])
                            .zip(old)
                        {
                            if new != old {
                                *r = rng.next() as u8;
                            }
                        }
                    }
                }
            }
            img.written = result.clone();
            img.durable = result;
            img.dirty_blocks.clear();
        }
    }

    /// Reads a file's written image (tests).
    pub fn file_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        self.disk
            .borrow()
            .files
            .get(path)
            .map(|i| i.written.clone())
    }

    /// What a file held when it was renamed to `path` (see `Image::renamed_with`): `None`
    /// when it was created under that name, or there is no such file (tests).
    pub fn renamed_with(&self, path: &Path) -> Option<Vec<u8>> {
        self.disk
            .borrow()
            .files
            .get(path)
            .and_then(|i| i.renamed_with.clone())
    }

    /// Number of completed renames so far (tests: segments recycled).
    pub fn renames(&self) -> u64 {
        self.disk.borrow().renames
    }

    /// Overwrites bytes of a file durably (tests that plant corruption).
    pub fn poke(&self, path: &Path, pos: u64, bytes: &[u8]) {
        let mut d = self.disk.borrow_mut();
        let img = d.files.get_mut(path).expect("file exists");
        let end = pos as usize + bytes.len();
        if img.written.len() < end {
            img.written.resize(end, 0);
        }
        img.written[pos as usize..end].copy_from_slice(bytes);
        img.durable = img.written.clone();
    }
}

impl SimFile {
    fn check(&self, d: &Disk) -> io::Result<()> {
        if d.generation != self.generation || !d.files.contains_key(&self.path) {
            return Err(crashed());
        }
        Ok(())
    }
}

impl BackendFile for SimFile {
    type Buf = Vec<u8>;
    type ReadBuf = Vec<u8>;

    fn alloc_buf(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    /// Not zeros: a byte the log forgot to write (or to zero) shows up as garbage in the
    /// crash drills.
    fn alloc_write_buf(&self, len: usize) -> Vec<u8> {
        vec![GARBAGE; len]
    }

    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> io::Result<()> {
        self.write_bytes(&buf, pos).await
    }

    async fn write_shared(&self, buf: Rc<Vec<u8>>, pos: u64) -> io::Result<()> {
        self.write_bytes(&buf, pos).await
    }

    async fn read_buf(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let d = self.disk.borrow();
        self.check(&d)?;
        let img = &d.files[&self.path];
        let start = (pos as usize).min(img.written.len());
        let end = (pos as usize + len).min(img.written.len());
        Ok(img.written[start..end].to_vec())
    }

    async fn sync(&self) -> io::Result<()> {
        futures_lite::future::yield_now().await;
        self.sync_blocking()
    }

    fn write_blocking(&self, buf: &Vec<u8>, pos: u64) -> io::Result<()> {
        self.write_now(buf, pos)
    }

    fn sync_blocking(&self) -> io::Result<()> {
        let mut d = self.disk.borrow_mut();
        self.check(&d)?;
        if std::mem::take(&mut d.fail_next_sync) {
            return Err(io::Error::other("injected fdatasync error (EIO)"));
        }
        d.syncs += 1;
        let img = d.files.get_mut(&self.path).expect("checked");
        img.durable = img.written.clone();
        img.dirty_blocks.clear();
        Ok(())
    }

    async fn file_len(&self) -> io::Result<u64> {
        let d = self.disk.borrow();
        self.check(&d)?;
        Ok(d.files[&self.path].written.len() as u64)
    }
}

impl SimFile {
    async fn write_bytes(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        futures_lite::future::yield_now().await;
        self.write_now(buf, pos)
    }

    fn write_now(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        let mut d = self.disk.borrow_mut();
        self.check(&d)?;
        assert_eq!(pos % BLOCK_BYTES, 0, "unaligned write position");
        assert_eq!(buf.len() as u64 % BLOCK_BYTES, 0, "unaligned write length");
        if std::mem::take(&mut d.fail_next_write) {
            return Err(io::Error::other("injected write error (EIO)"));
        }
        if d.full {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        d.writes += 1;
        let img = d.files.get_mut(&self.path).expect("checked");
        let end = pos as usize + buf.len();
        if img.written.len() < end {
            img.written.resize(end, 0);
        }
        img.written[pos as usize..end].copy_from_slice(buf);
        for blk in pos / BLOCK_BYTES..(end as u64).div_ceil(BLOCK_BYTES) {
            img.dirty_blocks.insert(blk);
        }
        Ok(())
    }
}

impl SimBackend {
    fn check_generation(&self) -> io::Result<()> {
        let g = self.disk.borrow().generation;
        match self.bound.get() {
            None => {
                self.bound.set(Some(g));
                Ok(())
            }
            Some(b) if b != g => Err(crashed()),
            Some(_) => Ok(()),
        }
    }
}

impl StorageBackend for SimBackend {
    type File = SimFile;

    async fn open(&self, path: &Path) -> io::Result<SimFile> {
        self.check_generation()?;
        let d = self.disk.borrow();
        if !d.files.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such sim file"));
        }
        Ok(SimFile {
            disk: self.disk.clone(),
            path: path.to_path_buf(),
            generation: d.generation,
        })
    }

    async fn create_zeroed_paced(&self, path: &Path, len: u64, pace: Pace<'_>) -> io::Result<()> {
        // The simulated disk has no device cache to share: the pace is asked once (it may give
        // up) but not waited for.
        if pace(0).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "preparation given up",
            ));
        }
        futures_lite::future::yield_now().await;
        self.check_generation()?;
        let mut d = self.disk.borrow_mut();
        if d.full {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        d.files.insert(
            path.to_path_buf(),
            Image {
                written: vec![0; len as usize],
                durable: vec![0; len as usize],
                dirty_blocks: BTreeSet::new(),
                renamed_with: None,
            },
        );
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let d = self.disk.borrow();
        Ok(d.files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.check_generation()?;
        self.disk.borrow_mut().files.remove(path);
        Ok(())
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        futures_lite::future::yield_now().await;
        self.check_generation()?;
        let mut d = self.disk.borrow_mut();
        let Some(mut img) = d.files.remove(from) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such sim file"));
        };
        // A directory operation is durable at once; the content is what a crash would leave
        // (unsynced blocks of it are kept as written: the caller syncs before it renames).
        img.renamed_with = Some(img.written.clone());
        d.files.insert(to.to_path_buf(), img);
        d.renames += 1;
        Ok(())
    }

    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_loses_unsynced_data_and_unsynced_file_growth() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let sim = SimBackend::new();
                let p = Path::new("/sim/f");
                sim.create_zeroed(p, 4096).await.unwrap();
                let f = sim.open(p).await.unwrap();
                f.write_at(vec![1u8; 4096], 0).await.unwrap();
                f.sync().await.unwrap();
                f.write_at(vec![2u8; 8192], 4096).await.unwrap(); // grows the file, no sync
                sim.crash(3);
                let b = sim.file_bytes(p).unwrap();
                assert_eq!(b.len(), 4096, "unsynced growth is lost");
                assert!(b.iter().all(|&x| x == 1), "synced data survives");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
