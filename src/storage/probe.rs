//! Work-around for glommio 0.9's io-poll probe (NOTES.md): the first `DmaFile` opened per
//! device per thread is probed with a real read at offset 0. If that file is empty, the read
//! never reaches the device, the device is wrongly marked pollable and every later DMA read
//! fails with EOPNOTSUPP on a virtio disk without poll queues. So before anything else a shard
//! opens `<dir>/.dma-probe`, a non-empty 4 KiB file, read-only.
//!
//! It must run before any other `DmaFile` is opened on that device in the thread: call it first
//! in every executor that touches the disk ([`crate::storage::ShardStore::open`] does).

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use glommio::io::DmaFile;

use crate::storage::backend::sync_dir;
use crate::storage::error::StorageError;

/// Name of the probe file inside a storage directory.
pub const PROBE_FILE: &str = ".dma-probe";
const PROBE_BYTES: usize = 4096;

thread_local! {
    static PRIMED: RefCell<HashSet<PathBuf>> = RefCell::new(HashSet::new());
}

/// Ensures `<dir>/.dma-probe` holds 4 KiB of data and opens it with `DmaFile::open` so that
/// glommio's probe reads real data. Idempotent per thread and directory.
pub async fn prime_dma_probe(dir: &Path) -> Result<(), StorageError> {
    if PRIMED.with(|p| p.borrow().contains(dir)) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io("create dir", dir, e))?;
    let path = dir.join(PROBE_FILE);
    let ok = std::fs::metadata(&path)
        .map(|m| m.len() >= PROBE_BYTES as u64)
        .unwrap_or(false);
    if !ok {
        let mut f =
            std::fs::File::create(&path).map_err(|e| StorageError::io("create", &path, e))?;
        f.write_all(&[0xA5u8; PROBE_BYTES])
            .and_then(|_| f.sync_all())
            .map_err(|e| StorageError::io("write", &path, e))?;
        sync_dir(dir).map_err(|e| StorageError::io("fsync dir", dir, e))?;
    }
    let f = DmaFile::open(&path)
        .await
        .map_err(|e| StorageError::io("open probe", &path, e.into()))?;
    let _ = f.close().await;
    PRIMED.with(|p| p.borrow_mut().insert(dir.to_path_buf()));
    Ok(())
}
