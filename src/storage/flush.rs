//! Flush policy: the per-shard flush leader (group commit).
//!
//! One flusher task per shard. Each cycle it hands the dirty tail to a write, waits until
//! everything up to that point is written, takes the set of segments with completed writes,
//! fdatasyncs them and only then advances `durable` to the written watermark taken before the
//! syncs were issued. Every append waiter whose bytes were written before the sync is completed
//! by that one fdatasync. Appends (and writes of full chunks) go on while a sync is in flight.
//!
//! - `SyncFlush`: a cycle starts when a `wait_durable` caller asks for a position beyond
//!   `durable`.
//! - `AsyncFlush`: a cycle starts every `flush_interval_ms`, or as soon as `flush_bytes` are
//!   pending (or when someone calls `wait_durable`). Always O_DIRECT, never the page cache.
//!
//! Under SYNC_FLUSH with `SyncFlushIo::Inline` (the default) a cycle's tail write and its
//! fdatasync are plain blocking syscalls on the shard's thread, not io_uring operations: the
//! ack path then has no kernel worker and no reactor park between the device and the ack.
//!
//! An fdatasync error poisons the log; `durable` never moves past what a completed fdatasync
//! covered.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::storage::backend::{BackendFile, StorageBackend};
use crate::storage::commitlog::CommitLog;
use crate::storage::counters::FlushCycle;
use crate::storage::{FlushMode, SyncFlushIo};

/// The largest SYNC_FLUSH cycle (bytes appended and not yet durable) whose I/O goes inline
/// under `SyncFlushIo::Inline`. 1000-message batches (W3a, 256 KiB a cycle) had a p99 of
/// 11-13 ms inline against 5-7 ms through io_uring; cycles of a few single-message requests
/// (W1, W2: 0.3-11 KiB) were 24-46 % faster inline.
const INLINE_CYCLE_MAX_BYTES: u64 = 64 << 10;

/// Runs the flush leader until the log is closed (everything flushed) or poisoned.
/// Derived indexes are persisted by the checkpoint task (`store.rs`), not here: nothing but
/// the log's own writes and syncs runs between an fdatasync and the acks it releases.
pub(crate) async fn run_flusher<B: StorageBackend>(log: Rc<CommitLog<B>>) {
    let interval = Duration::from_millis(log.cfg.flush_interval_ms.max(1));
    loop {
        let work = || {
            let m = log.marks();
            m.stopped()
                || m.sync_requested > m.durable
                || (log.cfg.flush_mode == FlushMode::AsyncFlush
                    && m.appended.bytes_since(m.durable) >= log.cfg.flush_bytes)
        };
        match log.cfg.flush_mode {
            FlushMode::SyncFlush => log.flusher_wake.wait_until(work).await,
            FlushMode::AsyncFlush => {
                futures_lite::future::or(log.flusher_wake.wait_until(work), async {
                    glommio::timer::sleep(interval).await;
                })
                .await
            }
        }
        {
            let m = log.marks();
            if m.poisoned {
                break;
            }
            if m.appended == m.durable {
                if m.closing {
                    break;
                }
                continue;
            }
        }
        // Inline I/O only where an ack waits on the cycle (an ASYNC_FLUSH cycle on the
        // shard's thread would hold up every append behind it), and only for a small cycle:
        // a large one keeps the device (and so the thread) longer, and the shard goes on
        // reading its connections meanwhile through io_uring.
        let inline = log.cfg.flush_mode == FlushMode::SyncFlush
            && log.cfg.sync_flush_io == SyncFlushIo::Inline
            && {
                let m = log.marks();
                m.appended.bytes_since(m.durable) <= INLINE_CYCLE_MAX_BYTES
            };
        let started = Instant::now();
        let target = log.hand_off_partial(inline);
        // No await since `hand_off_partial`: the last record ends at or below `target`.
        let record_end = log.marks().record_end;
        let appends_at_handoff = log.counters().appends;
        log.changed
            .wait_until(|| {
                let m = log.marks();
                m.poisoned || m.written >= target
            })
            .await;
        if log.marks().poisoned {
            break;
        }
        let (segs, upto) = log.take_dirty();
        // Test-only fault (`ShardStore::inject_fault`): "ack before sync". The crash drill must
        // catch it; see tests/storage_sim.rs.
        let skip = log.take_skipped_sync();
        let sync_started = Instant::now();
        let results = if skip {
            log::error!("storage: FAULT INJECTED: skipping the fdatasync of a flush cycle");
            segs.iter().map(|_| Ok(())).collect()
        } else if inline {
            segs.iter().map(|s| s.file.sync_blocking()).collect()
        } else {
            futures::future::join_all(segs.iter().map(|s| s.file.sync())).await
        };
        let sync_us = sync_started.elapsed().as_micros() as u64;
        let mut failed = None;
        for (s, r) in segs.iter().zip(results) {
            if let Err(e) = r {
                failed = Some(format!("fdatasync of segment {}: {e}", s.path.display()));
            }
        }
        if let Some(cause) = failed {
            log.poison(cause);
            break;
        }
        log.note_flush_cycle(FlushCycle {
            fsyncs: segs.len() as u64,
            cycle_us: started.elapsed().as_micros() as u64,
            sync_us,
            bytes: upto.0.saturating_sub(log.marks().durable.0),
            appends_at_handoff,
        });
        log.set_durable(upto, record_end);
    }
    log.changed.notify_all();
    log.durable_changed.notify_all();
}
