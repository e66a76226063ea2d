//! Storage tests on the simulated disk: functional behaviour, one test per recovery row,
//! poisoning, idempotent producers, and a seeded random crash test against a model.

mod common;

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringmq::format::batch::{BatchBuilder, Message};
use ringmq::format::record::{RecordIter, RecordView};
use ringmq::storage::checkpoint::CheckpointSlot;
use ringmq::storage::recovery::Observation;
use ringmq::storage::sim::SimBackend;
use ringmq::storage::{
    AppendRequest, Appended, BackgroundCheck, FlushMode, LogPosition, ProducerSeq, QueueOffset,
    RecoveryMode, RecoveryReport, ShardStore, StorageConfig, StorageError, StorageFault,
    SyncFlushIo,
};

use common::on_executor;

type Store = ShardStore<SimBackend>;

fn cfg(mode: FlushMode) -> StorageConfig {
    StorageConfig {
        segment_bytes: 64 * 1024,
        write_buffer_bytes: 8 * 1024,
        flush_mode: mode,
        flush_interval_ms: 5,
        flush_bytes: 16 * 1024,
        max_writes_in_flight: 4,
        max_record_bytes: 32 * 1024,
        recovery: RecoveryMode::Strict,
        // These tests are about the open-time scan and its decision table: every open scans
        // the whole log. The snapshot tests below turn the snapshot on.
        index_snapshot: false,
        ..StorageConfig::default()
    }
}

async fn open(sim: &SimBackend, dir: &Path, mode: FlushMode) -> (Store, RecoveryReport) {
    ShardStore::open_with(sim.clone(), dir, cfg(mode))
        .await
        .unwrap()
}

/// [`open`] with the index snapshot on (the broker's default).
async fn open_snap(sim: &SimBackend, dir: &Path, mode: FlushMode) -> (Store, RecoveryReport) {
    let cfg = StorageConfig {
        index_snapshot: true,
        ..cfg(mode)
    };
    ShardStore::open_with(sim.clone(), dir, cfg).await.unwrap()
}

fn req<'a>(topic: &'a str, queue_id: u32, count: u32, body: &'a [u8]) -> AppendRequest<'a> {
    AppendRequest {
        topic,
        queue_id,
        message_count: count,
        producer: None,
        body,
    }
}

async fn append_durable(s: &Store, topic: &str, q: u32, body: &[u8]) -> Appended {
    let a = s.append(req(topic, q, 1, body)).await.unwrap();
    s.wait_durable(a.end).await.unwrap();
    a
}

/// Reads every visible record of a queue: (base offset, body).
async fn read_all(s: &Store, topic: &str, q: u32) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let stats = s.queue_stats(topic, q);
    let mut off = stats.min_offset;
    loop {
        let b = s.read(topic, q, off, 10_000).await.unwrap();
        if b.records.is_empty() {
            break;
        }
        for r in RecordIter::new(&b.records) {
            let r = r.unwrap();
            assert_eq!(r.topic, topic);
            assert_eq!(r.header.queue_id, q);
            out.push((r.header.base_queue_offset, r.body.to_vec()));
        }
        off = b.next_offset;
    }
    out
}

fn seg_path(dir: &Path, base: u64) -> std::path::PathBuf {
    dir.join("commitlog").join(format!("{base:020}"))
}

/// Where a dropped segment waits to be reused.
fn recycled_path(dir: &Path, base: u64) -> std::path::PathBuf {
    dir.join("commitlog").join(format!("{base:020}.recycled"))
}

/// The crash drill's seeds: `RINGMQ_CRASH_SEED` and `RINGMQ_CRASH_ITERS`, or these defaults.
fn crash_seeds(base: u64, iterations: u64) -> (u64, u64) {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        var("RINGMQ_CRASH_SEED", base),
        var("RINGMQ_CRASH_ITERS", iterations),
    )
}

#[test]
fn sync_appends_are_durable_and_read_back_in_order() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        for i in 0..20u32 {
            let a = append_durable(&s, "t", 0, &vec![i as u8; 100 + i as usize]).await;
            assert_eq!(a.base_offset, QueueOffset(u64::from(i)));
            assert!(s.watermarks().durable >= a.end);
        }
        let all = read_all(&s, "t", 0).await;
        assert_eq!(all.len(), 20);
        for (i, (off, body)) in all.iter().enumerate() {
            assert_eq!(*off, i as u64);
            assert_eq!(body, &vec![i as u8; 100 + i]);
        }
        let m = s.metrics();
        assert_eq!(m.appends, 20);
        assert!(m.fsyncs >= 1 && !m.poisoned);
        s.close().await.unwrap();
    });
}

#[test]
fn group_commit_serves_many_waiters_with_few_fsyncs() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let s = s.clone();
            tasks.push(glommio::spawn_local(async move {
                let a = s.append(req("g", i % 4, 1, &[7u8; 200])).await.unwrap();
                s.wait_durable(a.end).await.unwrap();
            }));
        }
        for t in tasks {
            t.await;
        }
        let m = s.metrics();
        assert_eq!(m.appends, 64);
        assert!(
            m.fsyncs < 16,
            "expected group commit, got {} fsyncs",
            m.fsyncs
        );
        s.close().await.unwrap();
    });
}

#[test]
fn reads_cross_segment_boundaries_and_survive_reopen() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let mut ends = Vec::new();
        for i in 0..40u32 {
            // ~10 KiB each: 6 per 64 KiB segment, so several rolls.
            let a = append_durable(&s, "big", 1, &vec![i as u8; 10_000]).await;
            ends.push(a);
        }
        assert!(ends.last().unwrap().position.0 > 4 * 64 * 1024);
        let all = read_all(&s, "big", 1).await;
        assert_eq!(all.len(), 40);
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.records_scanned, 40);
        assert_eq!(rep.truncated_at, None);
        let again = read_all(&s, "big", 1).await;
        assert_eq!(all, again);
        let a = append_durable(&s, "big", 1, b"after").await;
        assert_eq!(a.base_offset, QueueOffset(40));
        s.close().await.unwrap();
    });
}

#[test]
fn read_never_passes_the_visible_watermark() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let a = s.append(req("v", 0, 3, b"not yet durable")).await.unwrap();
        // Nothing asked for a flush, so nothing is durable or visible.
        let b = s.read("v", 0, QueueOffset(0), 1000).await.unwrap();
        assert!(b.records.is_empty());
        assert_eq!(b.end_offset, QueueOffset(0));
        assert_eq!(s.queue_stats("v", 0).written_end_offset, QueueOffset(3));
        s.wait_durable(a.end).await.unwrap();
        let b = s.read("v", 0, QueueOffset(1), 1000).await.unwrap();
        let recs: Vec<_> = RecordIter::new(&b.records).collect();
        assert_eq!(
            recs.len(),
            1,
            "the record containing offset 1 is returned whole"
        );
        assert_eq!(b.next_offset, QueueOffset(3));
        // A replication layer can hold visibility back.
        s.set_visible_cap(Some(LogPosition(0)));
        assert!(s
            .read("v", 0, QueueOffset(0), 1000)
            .await
            .unwrap()
            .records
            .is_empty());
        s.set_visible_cap(None);
        s.close().await.unwrap();
    });
}

#[test]
fn offsets_out_of_range_are_errors() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        append_durable(&s, "o", 0, b"x").await;
        let e = s.read("o", 0, QueueOffset(5), 100).await.unwrap_err();
        assert!(matches!(
            e,
            StorageError::OffsetOutOfRange {
                requested: 5,
                min: 0,
                end: 1
            }
        ));
        let e = s.read("nope", 0, QueueOffset(1), 100).await.unwrap_err();
        assert!(matches!(e, StorageError::OffsetOutOfRange { .. }));
        assert!(s
            .read("nope", 0, QueueOffset(0), 100)
            .await
            .unwrap()
            .records
            .is_empty());
        // The end offset itself is an empty read (long polling), not an error.
        assert!(s
            .read("o", 0, QueueOffset(1), 100)
            .await
            .unwrap()
            .records
            .is_empty());
        let e = s.append(req("../x", 0, 1, b"x")).await.unwrap_err();
        assert!(matches!(e, StorageError::InvalidArgument(_)));
        let big = vec![0u8; 40 * 1024];
        let e = s.append(req("o", 0, 1, &big)).await.unwrap_err();
        assert!(matches!(e, StorageError::RecordTooLarge { .. }));
        s.close().await.unwrap();
    });
}

#[test]
fn max_bytes_limits_a_read_but_returns_at_least_one_record() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        for _ in 0..5 {
            append_durable(&s, "m", 0, &[1u8; 500]).await;
        }
        let b = s.read("m", 0, QueueOffset(0), 10).await.unwrap();
        assert_eq!(RecordIter::new(&b.records).count(), 1);
        let b = s.read("m", 0, QueueOffset(0), 1200).await.unwrap();
        assert_eq!(RecordIter::new(&b.records).count(), 2);
        s.close().await.unwrap();
    });
}

#[test]
fn wait_visible_beyond_wakes_on_durable_append() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let s2 = s.clone();
        let waiter = glommio::spawn_local(async move {
            s2.wait_visible_beyond("w", 0, QueueOffset(0)).await;
            s2.queue_stats("w", 0).visible_end_offset
        });
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        append_durable(&s, "w", 0, b"hello").await;
        assert_eq!(waiter.await, QueueOffset(1));
        s.close().await.unwrap();
    });
}

#[test]
fn key_index_finds_visible_records_by_key() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let mut body = bytes::BytesMut::new();
        let message = Message::new(&b"payload"[..])
            .with_key(&b"order-1"[..])
            .with_tag(&b"tagA"[..]);
        BatchBuilder::new(&mut body).push(&message).unwrap();
        let a = append_durable(&s, "k", 0, &body).await;
        assert_eq!(s.lookup_key("k", b"order-1"), vec![a.position]);
        assert!(s.lookup_key("k", b"order-2").is_empty());
        assert!(s.lookup_key("other", b"order-1").is_empty());
        s.close().await.unwrap();
        drop(s);
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(s.lookup_key("k", b"order-1"), vec![a.position]);
        s.close().await.unwrap();
    });
}

#[test]
fn fdatasync_error_poisons_the_log() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let ok = append_durable(&s, "p", 0, b"ok").await;
        sim.fail_next_sync();
        let a = s.append(req("p", 0, 1, b"lost")).await.unwrap();
        let e = s.wait_durable(a.end).await.unwrap_err();
        assert!(matches!(e, StorageError::Poisoned { .. }), "{e}");
        assert!(
            s.watermarks().durable < a.end,
            "nothing unsynced is reported durable"
        );
        assert!(s.watermarks().durable >= ok.end);
        let e = s.append(req("p", 0, 1, b"later")).await.unwrap_err();
        assert!(matches!(e, StorageError::Poisoned { .. }));
        assert!(s.metrics().poisoned);
        assert!(s.close().await.is_err());
    });
}

#[test]
fn write_error_poisons_the_log() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        append_durable(&s, "p", 0, b"ok").await;
        sim.fail_next_write();
        let a = s.append(req("p", 0, 1, b"lost")).await.unwrap();
        let e = s.wait_durable(a.end).await.unwrap_err();
        assert!(matches!(e, StorageError::Poisoned { .. }), "{e}");
        let e = s.append(req("p", 0, 1, b"later")).await.unwrap_err();
        assert!(matches!(e, StorageError::Poisoned { .. }));
    });
}

fn preq<'a>(pid: u64, epoch: u16, seq: u32, count: u32, body: &'a [u8]) -> AppendRequest<'a> {
    AppendRequest {
        topic: "idem",
        queue_id: 0,
        message_count: count,
        producer: Some(ProducerSeq {
            producer_id: pid,
            epoch,
            base_sequence: seq,
        }),
        body,
    }
}

#[test]
fn idempotent_retries_return_original_offsets_also_after_reopen() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let a0 = s.append(preq(9, 1, 0, 2, b"b0")).await.unwrap();
        let a1 = s.append(preq(9, 1, 2, 3, b"b1")).await.unwrap();
        assert_eq!(
            (a0.base_offset, a1.base_offset),
            (QueueOffset(0), QueueOffset(2))
        );
        let dup = s.append(preq(9, 1, 0, 2, b"b0")).await.unwrap();
        assert!(dup.duplicate);
        assert_eq!(
            (dup.base_offset, dup.position, dup.end),
            (a0.base_offset, a0.position, a0.end)
        );
        s.wait_durable(a1.end).await.unwrap();
        let e = s.append(preq(9, 1, 7, 1, b"gap")).await.unwrap_err();
        assert!(
            matches!(
                e,
                StorageError::SequenceGap {
                    expected: 5,
                    got: 7,
                    ..
                }
            ),
            "{e}"
        );
        let e = s.append(preq(9, 0, 5, 1, b"old")).await.unwrap_err();
        assert!(matches!(
            e,
            StorageError::ProducerFenced {
                epoch: 0,
                current_epoch: 1,
                ..
            }
        ));
        // Another producer is independent.
        assert!(!s.append(preq(10, 0, 0, 1, b"x")).await.unwrap().duplicate);
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.producers, 2);
        let dup = s.append(preq(9, 1, 2, 3, b"b1")).await.unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.base_offset, a1.base_offset);
        let next = s.append(preq(9, 1, 5, 1, b"b2")).await.unwrap();
        assert!(!next.duplicate);
        assert_eq!(next.base_offset, QueueOffset(6));
        // A new epoch restarts the sequence.
        assert!(!s.append(preq(9, 2, 0, 1, b"e2")).await.unwrap().duplicate);
        assert_eq!(read_all(&s, "idem", 0).await.len(), 3);
        s.close().await.unwrap();
    });
}

// ---- Recovery decision table: one test per row ----

#[test]
fn recovery_clean_tail_keeps_everything() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.records_scanned, 0);
        let a = append_durable(&s, "r", 0, b"one").await;
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.tail, Some(Observation::CleanTail));
        assert_eq!(
            (rep.records_scanned, rep.end_position, rep.truncated_at),
            (1, a.end.0, None)
        );
        assert!(rep.to_string().contains("recovered 1 records"));
        s.close().await.unwrap();
    });
}

#[test]
fn recovery_zero_filled_prepared_tail_after_crash_stops_cleanly() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let a = append_durable(&s, "r", 0, b"one").await;
        sim.crash(1);
        drop(s);
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.tail, Some(Observation::CleanTail));
        assert_eq!((rep.end_position, rep.truncated_at), (a.end.0, None));
        assert_eq!(read_all(&s, "r", 0).await.len(), 1);
        s.close().await.unwrap();
    });
}

/// Rewrites the durable checkpoint (both slots) to `pos`, as if the lazy checkpoint writer had
/// last run when the log ended there: the bytes after `pos` count as a possibly torn tail.
fn set_checkpoint(sim: &SimBackend, dir: &Path, pos: u64) {
    let slot = CheckpointSlot {
        sequence: 1 << 40,
        position: pos,
        // As a writer that may have written anywhere would have left it.
        reserved: u64::MAX,
    }
    .encode();
    let p = dir.join("commitlog").join("checkpoint");
    sim.poke(&p, 0, &slot);
    sim.poke(&p, 4096, &slot);
}

#[test]
fn recovery_torn_record_is_truncated() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let a = append_durable(&s, "r", 0, b"one").await;
        let b = append_durable(&s, "r", 0, &[5u8; 3000]).await;
        s.close().await.unwrap();
        drop(s);
        // A crash right after `a` was checkpointed; the second record was torn: keep its first
        // 1000 bytes, the rest never reached the disk.
        set_checkpoint(&sim, dir.path(), a.end.0);
        let zeros = vec![0u8; (b.end.0 - b.position.0 - 1000) as usize];
        sim.poke(&seg_path(dir.path(), 0), b.position.0 + 1000, &zeros);
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.tail, Some(Observation::TornRecord));
        assert_eq!(rep.truncated_at, Some(a.end.0));
        assert_eq!(rep.truncated_bytes, 1000);
        assert_eq!(read_all(&s, "r", 0).await, vec![(0, b"one".to_vec())]);
        // The torn bytes are gone from the file, and appends continue at the cut.
        let bytes = sim.file_bytes(&seg_path(dir.path(), 0)).unwrap();
        assert!(bytes[a.end.0 as usize..].iter().all(|&x| x == 0));
        let c = append_durable(&s, "r", 0, b"two").await;
        assert_eq!((c.position, c.base_offset), (a.end, QueueOffset(1)));
        s.close().await.unwrap();
    });
}

#[test]
fn recovery_crc_mismatch_past_the_checkpoint_followed_by_valid_records_truncates() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let a = append_durable(&s, "r", 0, b"first").await;
        let b = append_durable(&s, "r", 0, b"second").await;
        append_durable(&s, "r", 0, b"third").await;
        append_durable(&s, "r", 0, b"fourth").await;
        s.close().await.unwrap();
        drop(s);
        set_checkpoint(&sim, dir.path(), a.end.0);
        sim.poke(&seg_path(dir.path(), 0), b.end.0 - 1, b"X");
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(
            rep.tail,
            Some(Observation::CrcMismatchThenValid { valid_after: 2 })
        );
        assert_eq!(rep.truncated_at, Some(a.end.0));
        assert_eq!(rep.valid_records_discarded, 2);
        assert!(rep.to_string().contains("WARNING"));
        assert_eq!(read_all(&s, "r", 0).await, vec![(0, b"first".to_vec())]);
        s.close().await.unwrap();
    });
}

/// Issue 11 item 1, scaled to the simulator: many acked records over several segments, a clean
/// stop, one byte flipped inside an early record's body. Returns the acked appends
/// `(queue, appended, body)` and the one that was hit.
async fn acked_log_with_a_flipped_byte(
    sim: &SimBackend,
    dir: &Path,
) -> (Vec<(u32, Appended, Vec<u8>)>, usize) {
    let (s, _) = open(sim, dir, FlushMode::SyncFlush).await;
    let mut acked = Vec::new();
    for i in 0..600u32 {
        // Queue 1 gets records 0 and 3 only: record 3, the one hit, is the last of its queue.
        let q = if i == 0 || i == 3 { 1 } else { 0 };
        let body: Vec<u8> = (0..700).map(|j| (i * 7 + j) as u8).collect();
        let a = s.append(req("f", q, 2, &body)).await.unwrap();
        acked.push((q, a, body));
    }
    let last = acked.last().unwrap().1.end;
    s.wait_durable(last).await.unwrap();
    assert!(last.0 > 5 * 64 * 1024, "several segments");
    s.close().await.unwrap();
    let hit = 3;
    let a = acked[hit].1;
    let at = a.position.0 + 64 + 1 + 100; // inside the body
    let p = seg_path(dir, 0);
    let old = sim.file_bytes(&p).unwrap()[at as usize];
    sim.poke(&p, at, &[old ^ 0x10]);
    (acked, hit)
}

#[test]
fn recovery_flipped_byte_before_the_checkpoint_refuses_to_open() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (acked, hit) = acked_log_with_a_flipped_byte(&sim, dir.path()).await;
        let before: Vec<_> = (0..6u64)
            .map(|i| sim.file_bytes(&seg_path(dir.path(), i * 64 * 1024)))
            .collect();
        let e = ShardStore::open_with(sim.clone(), dir.path(), cfg(FlushMode::SyncFlush))
            .await
            .err()
            .expect("strict recovery must refuse");
        let pos = acked[hit].1.position.0;
        match &e {
            StorageError::CorruptDurable {
                path,
                file_offset,
                position,
                ..
            } => {
                assert_eq!(path, &seg_path(dir.path(), 0));
                assert_eq!((*file_offset, *position), (pos, pos));
            }
            other => panic!("expected CorruptDurable, got {other}"),
        }
        let line = e.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        for needle in [
            "00000000000000000000",
            &format!("at byte {pos}"),
            "ringmq admin repair",
            "--recovery skip-corrupt",
        ] {
            assert!(line.contains(needle), "{needle:?} missing in: {line}");
        }
        // Nothing was truncated or removed.
        let after: Vec<_> = (0..6u64)
            .map(|i| sim.file_bytes(&seg_path(dir.path(), i * 64 * 1024)))
            .collect();
        assert!(before == after, "a refused open must not change the log");
    });
}

/// Every acked record but `hit` is there, at its original offsets.
async fn check_all_but(s: &Store, acked: &[(u32, Appended, Vec<u8>)], hit: usize) {
    let mut messages = 0;
    for queue in [0u32, 1] {
        let got = read_all(s, "f", queue).await;
        let want: Vec<(u64, Vec<u8>)> = acked
            .iter()
            .enumerate()
            .filter(|(i, (q, _, _))| *q == queue && *i != hit)
            .map(|(_, (_, a, b))| (a.base_offset.0, b.clone()))
            .collect();
        assert_eq!(got, want, "queue {queue}");
        messages += 2 * got.len();
    }
    assert_eq!(messages, 2 * (acked.len() - 1));
    // The lost last record of queue 1 keeps its offsets: new messages do not reuse them.
    assert_eq!(s.queue_stats("f", 1).written_end_offset, QueueOffset(4));
}

#[test]
fn recovery_skip_corrupt_quarantines_exactly_the_bad_record() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (acked, hit) = acked_log_with_a_flipped_byte(&sim, dir.path()).await;
        let bad = acked[hit].1;
        let bad_bytes = sim.file_bytes(&seg_path(dir.path(), 0)).unwrap()
            [bad.position.0 as usize..bad.end.0 as usize]
            .to_vec();
        let skip = StorageConfig {
            recovery: RecoveryMode::SkipCorrupt,
            ..cfg(FlushMode::SyncFlush)
        };
        let (s, rep) = ShardStore::open_with(sim.clone(), dir.path(), skip)
            .await
            .unwrap();
        assert_eq!(rep.quarantined.len(), 1, "{rep}");
        let q = &rep.quarantined[0];
        assert_eq!(
            (q.position, q.bytes),
            (bad.position.0, bad.end.0 - bad.position.0)
        );
        assert_eq!(q.lost, Some(("f".to_string(), 1, 2, 2)));
        assert_eq!(
            std::fs::read(&q.file).unwrap(),
            bad_bytes,
            "bytes kept aside"
        );
        assert!(q.file.starts_with(dir.path().join("quarantine")));
        assert_eq!(s.metrics().quarantined_records, 1);
        assert!(
            rep.truncated_at.is_none() && rep.segments_removed == 0,
            "{rep}"
        );
        check_all_but(&s, &acked, hit).await;
        check_all_but(&s, &acked, hit).await;
        s.close().await.unwrap();
        drop(s);
        // The gap record makes the log valid again: a strict open passes and sees the same.
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(
            rep.quarantined.is_empty() && rep.truncated_at.is_none(),
            "{rep}"
        );
        check_all_but(&s, &acked, hit).await;
        let a = append_durable(&s, "f", 1, b"next").await;
        assert_eq!(a.base_offset, QueueOffset(4));
        s.close().await.unwrap();
    });
}

#[test]
fn recovery_missing_durable_bytes_refuse_to_open() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let mut last = None;
        for i in 0..20u32 {
            last = Some(append_durable(&s, "m", 0, &vec![i as u8; 10_000]).await);
        }
        s.close().await.unwrap();
        drop(s);
        // The segment holding the last records was zeroed (lost durable bytes).
        let last = last.unwrap();
        let base = last.position.0 / (64 * 1024) * 64 * 1024;
        sim.poke(&seg_path(dir.path(), base), 0, &vec![0u8; 64 * 1024]);
        let e = ShardStore::open_with(sim.clone(), dir.path(), cfg(FlushMode::SyncFlush))
            .await
            .err()
            .expect("strict recovery must refuse");
        assert!(
            matches!(&e, StorageError::CorruptDurable { detail, .. } if detail.contains("no record here")),
            "{e}"
        );
        let skip = StorageConfig {
            recovery: RecoveryMode::SkipCorrupt,
            ..cfg(FlushMode::SyncFlush)
        };
        let (s, rep) = ShardStore::open_with(sim.clone(), dir.path(), skip)
            .await
            .unwrap();
        assert!(rep.durable_bytes_lost > 0, "{rep}");
        let kept = read_all(&s, "m", 0).await;
        assert!(!kept.is_empty() && kept.len() < 20);
        assert!(s.checkpoint_position().0 <= s.watermarks().durable.0);
        s.close().await.unwrap();
        drop(s);
        // The lowered checkpoint lets a strict open pass.
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(read_all(&s, "m", 0).await, kept);
        s.close().await.unwrap();
    });
}

fn cq_file(dir: &Path, topic: &str, q: u32) -> std::path::PathBuf {
    dir.join("consumequeue").join(topic).join(q.to_string())
}

#[test]
fn recovery_index_ahead_of_the_log_is_truncated() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        append_durable(&s, "r", 0, b"one").await;
        s.close().await.unwrap();
        drop(s);
        let p = cq_file(dir.path(), "r", 0);
        let mut f = std::fs::read(&p).unwrap();
        assert_eq!(f.len(), 28);
        f.extend_from_slice(&[9u8; 56]); // two entries pointing past the log
        std::fs::write(&p, &f).unwrap();
        std::fs::create_dir_all(dir.path().join("consumequeue/ghost")).unwrap();
        std::fs::write(cq_file(dir.path(), "ghost", 3), [1u8; 28]).unwrap();
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.index_entries_truncated, 3);
        assert_eq!(std::fs::read(&p).unwrap().len(), 28);
        assert_eq!(
            std::fs::read(cq_file(dir.path(), "ghost", 3))
                .unwrap()
                .len(),
            0
        );
        assert_eq!(read_all(&s, "r", 0).await.len(), 1);
        s.close().await.unwrap();
    });
}

#[test]
fn recovery_index_behind_the_log_is_rebuilt() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        for i in 0..5u8 {
            append_durable(&s, "r", 0, &[i; 10]).await;
        }
        s.close().await.unwrap();
        drop(s);
        let p = cq_file(dir.path(), "r", 0);
        let f = std::fs::read(&p).unwrap();
        std::fs::write(&p, &f[..28 * 2 + 5]).unwrap(); // two entries and a torn third
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(rep.index_entries_rebuilt, 3);
        assert_eq!(std::fs::read(&p).unwrap(), f);
        s.close().await.unwrap();
    });
}

#[test]
fn recovery_missing_index_files_are_rebuilt() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        append_durable(&s, "r", 0, b"a").await;
        append_durable(&s, "r", 1, b"b").await;
        s.close().await.unwrap();
        drop(s);
        std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!((rep.index_files_rebuilt, rep.index_entries_rebuilt), (2, 2));
        assert_eq!(
            std::fs::read(cq_file(dir.path(), "r", 1)).unwrap().len(),
            28
        );
        s.close().await.unwrap();
    });
}

#[test]
fn drop_segments_before_removes_old_segments_and_their_offsets() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        for i in 0..20u32 {
            append_durable(&s, "d", 0, &vec![i as u8; 10_000]).await;
        }
        let n = s.drop_segments_before(LogPosition(2 * 64 * 1024)).unwrap();
        assert_eq!(n, 2);
        // Both kept for reuse (`recycle_segments` = 2), renamed in the background.
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        for base in [0, 64 * 1024] {
            assert!(sim.file_bytes(&seg_path(dir.path(), base)).is_none());
            let kept = recycled_path(dir.path(), base);
            assert!(sim.file_bytes(&kept).is_some(), "{}", kept.display());
        }
        let st = s.queue_stats("d", 0);
        assert!(st.min_offset.0 >= 12);
        let e = s.read("d", 0, QueueOffset(0), 100).await.unwrap_err();
        assert!(matches!(e, StorageError::OffsetOutOfRange { .. }));
        let all = read_all(&s, "d", 0).await;
        assert_eq!(all.first().unwrap().0, st.min_offset.0);
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert_eq!(s.queue_stats("d", 0).min_offset, st.min_offset);
        assert!(rep.truncated_at.is_none());
        s.close().await.unwrap();
    });
}

/// A kept segment that cannot be reused (here: gone behind the log's back) costs a new
/// segment, not the log: appends go on across the rolls that would have reused it.
#[test]
fn a_recycled_segment_that_cannot_be_reused_is_replaced_by_a_new_one() {
    use ringmq::storage::StorageBackend;
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        for i in 0..20u32 {
            append_durable(&s, "d", 0, &vec![i as u8; 10_000]).await;
        }
        assert_eq!(
            s.drop_segments_before(LogPosition(2 * 64 * 1024)).unwrap(),
            2
        );
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        for base in [0u64, 64 * 1024] {
            sim.remove(&recycled_path(dir.path(), base)).unwrap();
        }
        for i in 20..40u32 {
            append_durable(&s, "d", 0, &vec![i as u8; 10_000]).await;
        }
        assert!(!s.metrics().poisoned);
        assert_eq!(s.metrics().segments_recycled, 0);
        let all = read_all(&s, "d", 0).await;
        assert_eq!(all.last().unwrap().0, 39);
        s.close().await.unwrap();
    });
}

// ---- The index snapshot (fast restart) ----

/// Everything a reader and a retrying producer can see of the store, for comparing opens.
async fn visible_state(s: &Store) -> Vec<String> {
    let mut out = Vec::new();
    for (t, q) in [("a", 0), ("a", 1), ("b", 0), ("idem", 0)] {
        let st = s.queue_stats(t, q);
        out.push(format!("{t}/{q} {st:?} {:?}", read_all(s, t, q).await));
    }
    out
}

async fn fill_for_snapshot(s: &Store, round: u32) {
    for i in 0..30u32 {
        let body = vec![(i + round) as u8; 700 + (i as usize * 37) % 3000];
        append_durable(s, ["a", "b"][i as usize % 2], i % 2, &body).await;
    }
    for k in 0..6u32 {
        let seq = round * 6 + k;
        let a = s.append(preq(7, 1, seq, 1, b"idempotent")).await.unwrap();
        s.wait_durable(a.end).await.unwrap();
    }
}

/// A clean stop leaves a snapshot at the log end: the next open scans nothing and yields the
/// same queues, offsets and producer windows as a full scan of the same log.
#[test]
fn an_open_from_the_snapshot_equals_a_full_scan() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        fill_for_snapshot(&s, 0).await;
        let before = visible_state(&s).await;
        s.close().await.unwrap();
        drop(s);

        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(rep.from_snapshot, "{rep}");
        assert_eq!(rep.records_scanned, 0, "{rep}");
        assert_eq!(visible_state(&s).await, before);
        s.wait_background_check().await;
        assert_eq!(s.background_check(), BackgroundCheck::Clean { records: 36 });
        // The producer window came back: a retry of any stored batch is a duplicate with its
        // offsets, and the next sequence goes on.
        for seq in 0..6u32 {
            let d = s.append(preq(7, 1, seq, 1, b"idempotent")).await.unwrap();
            assert!(d.duplicate, "seq {seq}");
            assert_eq!(d.base_offset, QueueOffset(u64::from(seq)));
        }
        let n = s.append(preq(7, 1, 6, 1, b"next")).await.unwrap();
        assert!(!n.duplicate);
        assert_eq!(n.base_offset, QueueOffset(6));
        s.close().await.unwrap();
        drop(s);

        // The same log, scanned whole: the same state.
        let (s, rep) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(!rep.from_snapshot && rep.records_scanned == 37, "{rep}");
        let full = visible_state(&s).await;
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(rep.from_snapshot, "{rep}");
        assert_eq!(visible_state(&s).await, full);
        s.close().await.unwrap();
    });
}

/// After a crash the open starts at the last snapshot (here the one written when the store
/// opened) and scans only what came after it; records and producer windows on both sides of
/// the snapshot are intact.
#[test]
fn after_a_crash_the_open_scans_only_past_the_snapshot() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        fill_for_snapshot(&s, 0).await;
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        let snap_at = rep.end_position;
        fill_for_snapshot(&s, 1).await;
        let before = visible_state(&s).await;
        sim.crash(99);
        drop(s);

        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(rep.from_snapshot, "{rep}");
        eprintln!("first crash: {rep}");
        assert_eq!(rep.scan_start, snap_at, "{rep}");
        assert_eq!(
            rep.records_scanned, 36,
            "only the records after the snapshot: {rep}"
        );
        assert_eq!(visible_state(&s).await, before);
        for seq in [0u32, 5, 6, 11] {
            let d = s.append(preq(7, 1, seq, 1, b"idempotent")).await.unwrap();
            assert!(d.duplicate, "seq {seq}");
            assert_eq!(d.base_offset, QueueOffset(u64::from(seq)));
        }
        // Crash again at once: this open's snapshot was taken at its checkpoint, while the
        // records after the checkpoint were already in the indexes (left out of the snapshot,
        // scanned again now).
        let ckpt = s.checkpoint_position().0;
        let before = visible_state(&s).await;
        sim.crash(7);
        drop(s);
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        eprintln!("second crash: snapshot/checkpoint at {ckpt}: {rep}");
        assert!(rep.from_snapshot, "{rep}");
        assert_eq!(visible_state(&s).await, before);
        for seq in [0u32, 5, 6, 11] {
            let d = s.append(preq(7, 1, seq, 1, b"idempotent")).await.unwrap();
            assert!(d.duplicate, "seq {seq}");
        }
        s.close().await.unwrap();
    });
}

/// A clean close's snapshot lets the next open skip reading past the log end. That must never
/// outlive the open: records written after a restart (here rolling into new segments) and
/// then a crash must all be found, from a segment boundary on.
#[test]
fn a_crash_after_a_restart_never_trusts_the_clean_close_snapshot() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        for i in 0..5u8 {
            append_durable(&s, "a", 0, &vec![i; 12_000]).await;
        }
        s.close().await.unwrap();
        drop(s);
        // The snapshot's flags word (bytes 16..20, see `index/snapshot.rs`): bit 0 = clean close.
        let flags = || std::fs::read(dir.path().join("index.snapshot")).unwrap()[16..20].to_vec();
        assert_eq!(flags(), [1, 0, 0, 0], "close writes a clean-close snapshot");
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(rep.from_snapshot, "{rep}");
        assert_eq!(flags(), [0, 0, 0, 0], "the open replaced it before serving");
        for i in 5..40u8 {
            append_durable(&s, "a", 0, &vec![i; 12_000]).await;
        }
        sim.crash(3);
        drop(s);
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        let got = read_all(&s, "a", 0).await;
        assert_eq!(got.len(), 40, "acked records lost after a crash: {rep}");
        for (i, (off, body)) in got.iter().enumerate() {
            assert_eq!((*off, body[0]), (i as u64, i as u8));
        }
        s.close().await.unwrap();
    });
}

/// A snapshot that does not fit what is on disk is never used: damaged bytes, or a queue file
/// shorter than the snapshot says. The open then scans the whole log and loses nothing.
#[test]
fn a_snapshot_that_does_not_fit_is_not_used() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        fill_for_snapshot(&s, 0).await;
        let before = visible_state(&s).await;
        s.close().await.unwrap();
        drop(s);
        let snap = dir.path().join("index.snapshot");
        let good = std::fs::read(&snap).unwrap();

        let mut bad = good.clone();
        bad[20] ^= 1;
        std::fs::write(&snap, &bad).unwrap();
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(!rep.from_snapshot && rep.records_scanned == 36, "{rep}");
        assert_eq!(visible_state(&s).await, before);
        s.close().await.unwrap();
        drop(s);

        let cq = dir.path().join("consumequeue").join("a").join("0");
        let len = std::fs::metadata(&cq).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&cq).unwrap();
        f.set_len(len - 28).unwrap();
        drop(f);
        let (s, rep) = open_snap(&sim, dir.path(), FlushMode::SyncFlush).await;
        assert!(!rep.from_snapshot && rep.records_scanned == 36, "{rep}");
        assert_eq!(visible_state(&s).await, before);
        s.close().await.unwrap();
    });
}

// ---- Seeded random crash test against a model ----

#[derive(Clone, Debug)]
struct Batch {
    base: u64,
    count: u32,
    body: Vec<u8>,
    end: LogPosition,
    acked: bool,
}

const TOPICS: [&str; 2] = ["alpha", "beta"];

/// What a crash iteration's log goes through besides appends, syncs, reads, stops and crashes.
#[derive(Clone, Copy, PartialEq)]
enum Retention {
    /// Nothing is ever dropped.
    Off,
    /// Larger records, and the sealed segments are dropped now and then: kept for reuse (the
    /// default `recycle_segments`), so later segments are recycled ones with a previous life
    /// in them.
    Recycling,
}

/// One seeded run of random appends, syncs, reads, clean stops and crashes, checked against a
/// model. With `fault`, the fault is injected into every store instance (tests that prove the
/// drill catches it).
async fn crash_iteration(seed: u64, fault: Option<StorageFault>) {
    crash_iteration_with(seed, fault, Retention::Off).await;
}

/// [`crash_iteration`] with `retention`; returns how many segments were recycled (renamed into
/// the pool or out of it).
async fn crash_iteration_with(seed: u64, fault: Option<StorageFault>, retention: Retention) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBackend::new();
    let mode = if rng.gen_bool(0.7) {
        FlushMode::SyncFlush
    } else {
        FlushMode::AsyncFlush
    };
    // Even seeds run with the index snapshot (the broker's default), odd ones scan all; seeds
    // 0 and 1 mod 4 issue SYNC_FLUSH cycles inline (the default), 2 and 3 through io_uring.
    let io = if seed % 4 < 2 {
        SyncFlushIo::Inline
    } else {
        SyncFlushIo::Ring
    };
    let opener = |sim: SimBackend, dir: std::path::PathBuf| async move {
        let cfg = StorageConfig {
            index_snapshot: seed % 2 == 0,
            sync_flush_io: io,
            ..cfg(mode)
        };
        ShardStore::open_with(sim, &dir, cfg).await.unwrap()
    };
    let (mut s, _) = opener(sim.clone(), dir.path().to_path_buf()).await;
    if let Some(f) = fault {
        s.inject_fault(f);
    }
    let mut model: Vec<Vec<Batch>> = vec![Vec::new(); 4];
    let mut next: Vec<u64> = vec![0; 4];
    // Per queue: the offset below which retention dropped everything.
    let mut dropped_to: Vec<u64> = vec![0; 4];
    let (steps, large) = match retention {
        Retention::Off => (60, 0.1),
        Retention::Recycling => (120, 0.5),
    };
    for _step in 0..steps {
        if retention == Retention::Recycling && rng.gen_bool(0.1) {
            // Retention: every sealed segment goes (into the recycling pool, or deleted when
            // it is full); the renames run in the background: let them finish, so a crash
            // cannot bring a dropped segment back.
            s.drop_segments_before(LogPosition(u64::MAX)).unwrap();
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            for (qi, q) in model.iter_mut().enumerate() {
                let min = s.queue_stats(TOPICS[qi / 2], (qi % 2) as u32).min_offset.0;
                q.retain(|b| b.base >= min);
                dropped_to[qi] = dropped_to[qi].max(min);
            }
        }
        match rng.gen_range(0..100) {
            0..=59 => {
                let qi = rng.gen_range(0..4);
                let len = if rng.gen_bool(large) {
                    rng.gen_range(5000..20000)
                } else {
                    rng.gen_range(1..1500)
                };
                let body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let count = rng.gen_range(1..4);
                let a = s
                    .append(req(TOPICS[qi / 2], (qi % 2) as u32, count, &body))
                    .await
                    .unwrap();
                assert_eq!(a.base_offset.0, next[qi], "seed {seed}");
                next[qi] += u64::from(count);
                if std::env::var("RINGMQ_CRASH_DEBUG").is_ok() {
                    eprintln!(
                        "append q{qi} pos {} end {} len {}",
                        a.position,
                        a.end,
                        body.len()
                    );
                }
                model[qi].push(Batch {
                    base: a.base_offset.0,
                    count,
                    body,
                    end: a.end,
                    acked: false,
                });
            }
            60..=79 => {
                let upto = s.watermarks().appended;
                s.wait_durable(upto).await.unwrap();
                if std::env::var("RINGMQ_CRASH_DEBUG").is_ok() {
                    eprintln!("durable {:?}", s.watermarks());
                }
                for q in &mut model {
                    for b in q.iter_mut().filter(|b| b.end <= upto) {
                        b.acked = true;
                    }
                }
            }
            80..=89 => {
                let qi = rng.gen_range(0..4);
                let got = read_all(&s, TOPICS[qi / 2], (qi % 2) as u32).await;
                for (g, m) in got.iter().zip(&model[qi]) {
                    assert_eq!((g.0, &g.1), (m.base, &m.body), "seed {seed}");
                }
                assert!(
                    got.len() >= model[qi].iter().filter(|b| b.acked).count(),
                    "seed {seed}"
                );
            }
            _ => {
                assert_nothing_written_past_the_reservation(&sim, dir.path(), seed);
                let clean = rng.gen_bool(0.2);
                if clean {
                    s.close().await.unwrap();
                    for q in &mut model {
                        q.iter_mut().for_each(|b| b.acked = true);
                    }
                } else {
                    if std::env::var("RINGMQ_CRASH_DEBUG").is_ok() {
                        eprintln!("crash at {:?}", s.watermarks());
                    }
                    sim.crash(rng.gen());
                }
                drop(s);
                let (s2, rep) = opener(sim.clone(), dir.path().to_path_buf()).await;
                if std::env::var("RINGMQ_CRASH_DEBUG").is_ok() {
                    eprintln!("reopen clean={clean}: {rep}");
                }
                s = s2;
                for qi in 0..4 {
                    let got = read_all(&s, TOPICS[qi / 2], (qi % 2) as u32).await;
                    assert!(
                        got.len() <= model[qi].len(),
                        "seed {seed}: records appeared"
                    );
                    for (g, m) in got.iter().zip(&model[qi]) {
                        assert_eq!(
                            (g.0, &g.1),
                            (m.base, &m.body),
                            "seed {seed}: record differs"
                        );
                    }
                    let acked = model[qi].iter().filter(|b| b.acked).count();
                    assert!(
                        got.len() >= acked,
                        "seed {seed}: lost acked records in queue {qi} ({} < {acked})",
                        got.len()
                    );
                    model[qi].truncate(got.len());
                    model[qi].iter_mut().for_each(|b| b.acked = true);
                    // Offsets continue right after the last recovered batch: none reused, none
                    // skipped.
                    next[qi] = s
                        .queue_stats(TOPICS[qi / 2], (qi % 2) as u32)
                        .written_end_offset
                        .0;
                    let want = model[qi]
                        .last()
                        .map_or(dropped_to[qi], |b| b.base + u64::from(b.count));
                    assert_eq!(next[qi], want, "seed {seed}: queue {qi} continues at");
                }
                if let Some(f) = fault {
                    s.inject_fault(f);
                }
            }
        }
    }
    s.close().await.unwrap();
    sim.renames()
}

/// The invariant recovery relies on to read only up to the checkpoint's write reservation:
/// no byte of any segment at or past it was ever written (non-zero) in the segment's present
/// life: it is zero (recovery's zeroing may reach into the block holding it), or what a
/// recycled segment held when it got its name.
fn assert_nothing_written_past_the_reservation(sim: &SimBackend, dir: &Path, seed: u64) {
    let ckpt = sim
        .file_bytes(&dir.join("commitlog").join("checkpoint"))
        .unwrap();
    let Some(reserved) = [0usize, 4096]
        .iter()
        .filter_map(|&at| CheckpointSlot::decode(&ckpt[at..]))
        .max_by_key(|s| s.sequence)
        .map(|s| s.reserved)
    else {
        return;
    };
    let seg = cfg(FlushMode::SyncFlush).segment_bytes;
    for base in (0..256).map(|i| i * seg) {
        let path = seg_path(dir, base);
        let Some(bytes) = sim.file_bytes(&path) else {
            continue;
        };
        let before = sim.renamed_with(&path).unwrap_or_default();
        let changed = bytes
            .iter()
            .enumerate()
            .rposition(|(i, &b)| b != 0 && b != before.get(i).copied().unwrap_or(0));
        if let Some(i) = changed {
            assert!(
                base + (i as u64) < reserved,
                "seed {seed}: byte {} written past the reservation {reserved}",
                base + i as u64
            );
        }
    }
}

/// Prints the seed if the iteration panics.
struct SeedGuard(u64);
impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "crash test failed with seed {0} (rerun: RINGMQ_CRASH_SEED={0} RINGMQ_CRASH_ITERS=1)",
                self.0
            );
        }
    }
}

#[test]
fn random_operations_with_crashes_never_lose_acked_or_return_torn_records() {
    let (base, iterations) = crash_seeds(0x5EED, 300);
    on_executor(move || async move {
        for i in 0..iterations {
            let seed = base + i;
            let _guard = SeedGuard(seed);
            crash_iteration(seed, None).await;
        }
    });
}

/// The crash drill with retention dropping sealed segments and the log reusing them: what a
/// recycled segment held before must never come back as a record, nor make recovery take an
/// acked record for corruption, nor hide a torn tail.
#[test]
fn random_operations_with_crashes_on_recycled_segments_never_lose_acked_or_return_stale_records() {
    let (base, iterations) = crash_seeds(0xEC0, 120);
    on_executor(move || async move {
        let mut renames = 0;
        for i in 0..iterations {
            let seed = base + i;
            let _guard = SeedGuard(seed);
            renames += crash_iteration_with(seed, None, Retention::Recycling).await;
        }
        eprintln!("{renames} segment renames (into the pool and out of it) in {iterations} runs");
        assert!(
            renames >= iterations,
            "{renames} renames in {iterations} runs: the drill hardly recycles"
        );
    });
}

/// Proof that the drill above can catch the bug it exists for: a store that acks before its
/// fdatasync (one flush cycle per store instance skips the sync but still advances `durable`)
/// must fail it. If this test fails, the crash drill has gone blind.
#[test]
fn the_crash_drill_fails_when_the_store_acks_before_the_sync() {
    let seeds = 40u64;
    let mut failed = Vec::new();
    for seed in 0x5EED..0x5EED + seeds {
        let r = std::thread::spawn(move || {
            on_executor(move || async move {
                crash_iteration(seed, Some(StorageFault::SkipFdatasyncs(1))).await;
            })
        })
        .join();
        if r.is_err() {
            failed.push(seed);
        }
    }
    eprintln!(
        "the faulty store failed the drill for {} of {seeds} seeds: {failed:?}",
        failed.len()
    );
    assert!(
        !failed.is_empty(),
        "no seed caught a store that acks before the fdatasync"
    );
}

#[test]
fn record_view_rejects_what_the_store_never_returns() {
    // A fetch response is parsed with the same pure code.
    let rec = ringmq::format::record::encode_record(Default::default(), "t", b"body");
    assert!(RecordView::parse(&rec).is_ok());
}

// ---- The log as a replication stream (storage/stream.rs) ----

/// Copies `master`'s log into `replica` the way a follower does, from disk reads.
async fn copy_log(master: &Store, replica: &Store, read_bytes: usize) -> u64 {
    let mut next = replica.watermarks().appended;
    let mut chunks = 0;
    loop {
        let c = master.read_log(next, read_bytes).await.unwrap();
        if c.bytes.is_empty() && c.next == next {
            return chunks;
        }
        if !c.bytes.is_empty() {
            let (end, _) = replica
                .append_replicated(c.position, &c.bytes)
                .await
                .unwrap();
            assert_eq!(end, c.next);
            chunks += 1;
        }
        next = c.next;
    }
}

#[test]
fn a_replica_copies_the_log_at_the_same_positions_across_segment_rolls() {
    on_executor(|| async {
        let (dm, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sim = SimBackend::new();
        let (m, _) = open(&sim, dm.path(), FlushMode::SyncFlush).await;
        let (r, _) = open(&sim, dr.path(), FlushMode::AsyncFlush).await;
        // ~3 KiB records in 64 KiB segments: several rolls, each leaving an unused tail.
        for i in 0..100u32 {
            let topic = if i % 3 == 0 { "a" } else { "b" };
            append_durable(&m, topic, i % 2, &vec![i as u8; 3000 + i as usize]).await;
        }
        assert!(copy_log(&m, &r, 16 * 1024).await > 5);
        assert_eq!(r.watermarks().appended, m.watermarks().appended);
        r.wait_durable(r.watermarks().appended).await.unwrap();
        for (t, q) in [("a", 0), ("a", 1), ("b", 0), ("b", 1)] {
            assert_eq!(
                read_all(&r, t, q).await,
                read_all(&m, t, q).await,
                "{t}/{q}"
            );
            assert_eq!(r.queue_stats(t, q), m.queue_stats(t, q));
        }
        // The copy is a log like any other: it survives a reopen, and appends continue it.
        let end = r.watermarks().appended;
        r.close().await.unwrap();
        drop(r);
        let (r, rep) = open(&sim, dr.path(), FlushMode::SyncFlush).await;
        assert_eq!((rep.end_position, rep.truncated_at), (end.0, None));
        let a = append_durable(&r, "a", 0, b"after").await;
        assert_eq!(a.base_offset, m.queue_stats("a", 0).written_end_offset);
        r.close().await.unwrap();
        m.close().await.unwrap();
    });
}

#[test]
fn the_tail_feed_hands_out_appends_from_memory_in_order() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::AsyncFlush).await;
        append_durable(&s, "t", 0, b"before").await;
        let at = s.watermarks().appended;
        assert!(
            !s.tail_feed_start(LogPosition(at.0 - 1), 1 << 20),
            "only at the end"
        );
        assert!(s.tail_feed_start(at, 1 << 20));
        assert!(s.tail_take(at).is_none(), "nothing appended yet");
        let a = s.append(req("t", 0, 1, b"one")).await.unwrap();
        let b = s.append(req("t", 1, 1, b"two")).await.unwrap();
        // Not written yet (async flush), but the feed has both records.
        let c = s.tail_take(at).expect("a run");
        assert_eq!((c.position, c.next), (a.position, b.end));
        let bodies: Vec<Vec<u8>> = RecordIter::new(&c.bytes)
            .map(|r| r.unwrap().body.to_vec())
            .collect();
        assert_eq!(bodies.len(), 2);
        assert!(s.tail_take(c.next).is_none());
        assert!(s.tail_feed_covers(c.next));
        s.tail_feed_stop();
        assert!(!s.tail_feed_covers(c.next));
        s.close().await.unwrap();
    });
}

#[test]
fn append_replicated_refuses_corrupt_or_diverging_records_and_keeps_the_log() {
    on_executor(|| async {
        let (dm, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sim = SimBackend::new();
        let (m, _) = open(&sim, dm.path(), FlushMode::SyncFlush).await;
        let (r, _) = open(&sim, dr.path(), FlushMode::SyncFlush).await;
        for i in 0..4u8 {
            append_durable(&m, "t", 0, &[i; 100]).await;
        }
        let chunk = m.read_log(LogPosition(0), 1 << 20).await.unwrap();
        let first = RecordView::parse(&chunk.bytes).unwrap().bytes.len();

        let mut flipped = chunk.bytes.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let e = r
            .append_replicated(chunk.position, &flipped)
            .await
            .unwrap_err();
        assert!(matches!(e, StorageError::Record(_)), "{e}");
        // Records before the bad one went in whole; nothing of the bad one did.
        let kept = r.watermarks().appended;
        assert_eq!(
            kept.0 as usize,
            3 * first,
            "three whole records of equal size"
        );
        r.wait_durable(kept).await.unwrap();
        assert_eq!(read_all(&r, "t", 0).await.len(), 3);

        // The same records again: they claim positions this log already has.
        let e = r
            .append_replicated(chunk.position, &chunk.bytes[..first])
            .await
            .unwrap_err();
        assert!(matches!(e, StorageError::Diverged { .. }), "{e}");
        assert_eq!(r.watermarks().appended, kept);
        r.close().await.unwrap();
        m.close().await.unwrap();
    });
}

#[test]
fn opening_with_a_limit_truncates_the_log_and_rebuilds_what_derives_from_it() {
    on_executor(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBackend::new();
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let mut ends = Vec::new();
        for i in 0..40u32 {
            ends.push(append_durable(&s, "t", 0, &vec![i as u8; 2500]).await.end);
        }
        s.close().await.unwrap();
        drop(s);
        // Cut after record 25 (in a later segment than the first).
        let limit = ends[25];
        let (s, rep) = ShardStore::open_limited(
            sim.clone(),
            dir.path(),
            cfg(FlushMode::SyncFlush),
            Some(limit.0),
        )
        .await
        .unwrap();
        assert_eq!(rep.tail, Some(Observation::BeyondLimit));
        assert_eq!(rep.truncated_at, Some(limit.0));
        assert_eq!(s.watermarks().appended, limit);
        assert_eq!(read_all(&s, "t", 0).await.len(), 26);
        let a = append_durable(&s, "t", 0, b"new").await;
        assert_eq!(a.base_offset, QueueOffset(26));
        s.close().await.unwrap();
        drop(s);
        // The truncated records never come back.
        let (s, _) = open(&sim, dir.path(), FlushMode::SyncFlush).await;
        let all = read_all(&s, "t", 0).await;
        assert_eq!(all.len(), 27);
        assert_eq!(all[26].1, b"new".to_vec());
        s.close().await.unwrap();
    });
}
