//! Storage on the real disk (ext4 on virtio here; never tmpfs): the glommio io-poll probe
//! work-around, SYNC and ASYNC appends, reopen.

mod common;

use std::time::{Duration, SystemTime};

use glommio::io::OpenOptions;
use ringmq::format::record::RecordIter;
use ringmq::storage::{
    prime_dma_probe, AppendRequest, BackgroundCheck, FetchVerify, FlushMode, QueueOffset,
    ShardStore, StorageConfig, StorageError,
};

use common::{data_dir, on_executor};

fn cfg(mode: FlushMode) -> StorageConfig {
    StorageConfig {
        segment_bytes: 1 << 20,
        flush_mode: mode,
        flush_interval_ms: 20,
        write_buffer_bytes: 64 * 1024,
        ..StorageConfig::default()
    }
}

#[test]
fn dma_reads_work_after_priming_even_when_the_first_data_file_is_empty() {
    let dir = data_dir();
    let path = dir.path().to_path_buf();
    // A fresh thread: glommio caches the probe result per thread.
    on_executor(move || async move {
        prime_dma_probe(&path).await.unwrap();
        prime_dma_probe(&path).await.unwrap(); // idempotent
        let seg = path.join("00000000000000000000");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(&seg)
            .await
            .unwrap();
        assert_eq!(f.file_size().await.unwrap(), 0, "the segment starts empty");
        let mut buf = f.alloc_dma_buffer(4096);
        buf.as_bytes_mut().fill(0x5A);
        f.write_at(buf, 0).await.unwrap();
        f.fdatasync().await.unwrap();
        let r = f
            .read_at_aligned(0, 4096)
            .await
            .expect("DMA read must not fail with EOPNOTSUPP");
        assert!(r.iter().all(|&b| b == 0x5A));
        f.close().await.unwrap();
    });
}

#[test]
fn store_on_a_fresh_dir_writes_and_reads_back_with_dma() {
    let dir = data_dir();
    let path = dir.path().join("shard-0");
    on_executor(move || async move {
        let (s, rep) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        assert_eq!(rep.records_scanned, 0);
        let a = s
            .append(AppendRequest {
                topic: "t",
                queue_id: 0,
                message_count: 1,
                producer: None,
                body: b"hello disk",
            })
            .await
            .unwrap();
        s.wait_durable(a.end).await.unwrap();
        let b = s.read("t", 0, QueueOffset(0), 4096).await.unwrap();
        let r: Vec<_> = RecordIter::new(&b.records)
            .map(|r| r.unwrap().body.to_vec())
            .collect();
        assert_eq!(r, vec![b"hello disk".to_vec()]);
        s.close().await.unwrap();
    });
}

/// Flips the bits of `mask` in the byte at `at` of `file`, durably: a disk's bit rot.
fn flip_bits(file: &std::path::Path, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ mask], at).unwrap();
    f.sync_all().unwrap();
}

async fn append_many(s: &ShardStore, tag: u8, n: u32, concurrent: u32) -> Vec<(u32, u64, usize)> {
    let mut tasks = Vec::new();
    for t in 0..concurrent {
        let s = s.clone();
        tasks.push(glommio::spawn_local(async move {
            let mut out = Vec::new();
            for i in 0..n {
                let len = 100 + ((i * 7919 + t * 131) % 30_000) as usize;
                let body = vec![tag ^ (i as u8); len];
                let a = s
                    .append(AppendRequest {
                        topic: "disk",
                        queue_id: t,
                        message_count: 1,
                        producer: None,
                        body: &body,
                    })
                    .await
                    .unwrap();
                s.wait_durable(a.end).await.unwrap();
                out.push((t, a.base_offset.0, len));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await);
    }
    all
}

/// The segment files of a shard's log (names all digits), sorted.
fn segment_files(shard: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(shard.join("commitlog"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .collect();
    v.sort();
    v
}

/// How many dropped segments a shard keeps for reuse (`<base>.recycled`).
fn recycled_count(shard: &std::path::Path) -> usize {
    std::fs::read_dir(shard.join("commitlog"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".recycled"))
        .count()
}

async fn check_all(s: &ShardStore, expect: &[(u32, u64, usize)]) {
    for &(q, off, len) in expect {
        let b = s.read("disk", q, QueueOffset(off), 1).await.unwrap();
        let r = RecordIter::new(&b.records).next().unwrap().unwrap();
        assert_eq!((r.header.base_queue_offset, r.body.len()), (off, len));
    }
}

#[test]
fn sync_and_async_appends_survive_reopen_on_the_real_disk() {
    let dir = data_dir();
    let path = dir.path().join("shard-0");
    on_executor(move || async move {
        let (s, _) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        let mut expect = append_many(&s, 1, 40, 8).await; // ~5 MiB: several 1 MiB segments
        let m = s.metrics();
        assert!(m.fsyncs > 0 && m.appends == 320 && !m.poisoned);
        check_all(&s, &expect).await;
        s.close().await.unwrap();
        drop(s);

        let (s, rep) = ShardStore::open(&path, cfg(FlushMode::AsyncFlush))
            .await
            .unwrap();
        // A clean stop leaves an index snapshot at the log end: nothing to scan.
        assert!(rep.from_snapshot && rep.records_scanned == 0, "{rep}");
        assert_eq!(rep.truncated_at, None);
        check_all(&s, &expect).await;
        // ASYNC: appends resolve without waiting; the flusher makes them durable on its own.
        let mut last = None;
        for i in 0..50u32 {
            let body = vec![9u8; 1000];
            let a = s
                .append(AppendRequest {
                    topic: "disk",
                    queue_id: 100,
                    message_count: 1,
                    producer: None,
                    body: &body,
                })
                .await
                .unwrap();
            assert_eq!(a.base_offset, QueueOffset(u64::from(i)));
            expect.push((100, u64::from(i), 1000));
            last = Some(a.end);
        }
        let end = last.unwrap();
        for _ in 0..100 {
            if s.watermarks().durable >= end {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            s.watermarks().durable >= end,
            "the background flusher made ASYNC appends durable"
        );
        s.close().await.unwrap();
        drop(s);

        let (s, rep) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        assert!(rep.from_snapshot && rep.records_scanned == 0, "{rep}");
        check_all(&s, &expect).await;
        s.close().await.unwrap();
    });
}

/// Issue 14/16: segments prepared either way (written zeros, fallocated) hold appends across
/// several rolls, and a full scan at reopen (no index snapshot) finds exactly those records:
/// an allocated segment's unwritten rest reads as zeros, as recovery expects of a tail.
#[test]
fn zeroed_and_fallocated_segments_both_hold_appends_across_rolls_and_a_full_rescan() {
    use ringmq::storage::SegmentPrepare;
    for (mode, prepare) in [
        (FlushMode::SyncFlush, SegmentPrepare::Allocate),
        (FlushMode::AsyncFlush, SegmentPrepare::Auto),
        (FlushMode::AsyncFlush, SegmentPrepare::Zero),
    ] {
        let dir = data_dir();
        let path = dir.path().join("shard-0");
        on_executor(move || async move {
            let config = StorageConfig {
                segment_prepare: prepare,
                ..cfg(mode)
            };
            let (s, _) = ShardStore::open(&path, config.clone()).await.unwrap();
            let expect = append_many(&s, 3, 40, 4).await;
            s.close().await.unwrap();
            drop(s);
            let segments = std::fs::read_dir(path.join(ringmq::storage::COMMITLOG_DIR))
                .unwrap()
                .count();
            assert!(segments >= 3, "{mode} {prepare}: {segments} segment files");
            let rescan = StorageConfig {
                index_snapshot: false,
                ..config
            };
            let (s, rep) = ShardStore::open(&path, rescan).await.unwrap();
            assert_eq!(rep.truncated_at, None, "{mode} {prepare}: {rep}");
            assert!(rep.records_scanned > 0, "{mode} {prepare}: {rep}");
            check_all(&s, &expect).await;
            s.close().await.unwrap();
        });
    }
}

/// Issue 11 item 1 on the real disk: many records acked under SYNC_FLUSH over several
/// segments, a clean stop, one bit flipped inside an early record's body. A strict open refuses
/// naming file and byte; `ringmq admin repair` quarantines exactly that record; everything else
/// is served afterwards, at its original offsets.
#[test]
fn a_flipped_byte_in_acked_data_refuses_to_open_and_repair_keeps_every_other_record() {
    let dir = data_dir();
    let data = dir.path().to_path_buf();
    let shard = data.join("shard-0");
    let (expect, hit) = {
        let shard = shard.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        on_executor(move || async move {
            let (s, _) = ShardStore::open(&shard, cfg(FlushMode::SyncFlush))
                .await
                .unwrap();
            let expect = append_many(&s, 3, 60, 4).await; // ~3.6 MiB: four 1 MiB segments
            assert!(s.watermarks().durable.0 > 3 << 20);
            // An early record whose body does not start in segment 0's first block.
            let (q, off, len) = expect[5];
            let r = s.read("disk", q, QueueOffset(off), 1).await.unwrap();
            let h = RecordIter::new(&r.records).next().unwrap().unwrap().header;
            s.close().await.unwrap();
            tx.send((expect, (q, off, len, h.log_position))).unwrap();
        });
        rx.recv().unwrap()
    };
    let (hit_q, hit_off, _, hit_pos) = hit;
    assert!(hit_pos < 1 << 20, "the hit record is in the first segment");
    let seg0 = shard.join("commitlog").join("00000000000000000000");
    flip_bits(&seg0, hit_pos + 64 + 4 + 50, 0x04); // header, topic "disk", then the body
    let segments_before = std::fs::read_dir(shard.join("commitlog")).unwrap().count();
    let needles = [
        seg0.display().to_string(),
        format!("at byte {hit_pos}"),
        "ringmq admin repair".to_string(),
        "--recovery skip-corrupt".to_string(),
    ];

    // The clean stop left an index snapshot: the open starts from it at once, and the
    // background check of the records below it finds the flipped bit, names it in the same
    // line, and takes the snapshot back. The record itself reads as CORRUPT, never as data.
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = shard.clone();
    on_executor(move || async move {
        let (s, rep) = ShardStore::open(&s2, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        assert!(rep.from_snapshot, "{rep}");
        s.wait_background_check().await;
        let check = s.background_check();
        let read = s.read("disk", hit_q, QueueOffset(hit_off), 1).await;
        let fetch = s.fetch("disk", hit_q, QueueOffset(hit_off), 1).await;
        s.close().await.unwrap();
        let err = |r: Result<_, StorageError>| r.err().map(|e| e.to_string());
        tx.send((check, err(read), err(fetch))).unwrap();
    });
    let (check, read_err, fetch_err) = rx.recv().unwrap();
    let BackgroundCheck::Corrupt(line) = check else {
        panic!("the background check missed the flipped bit: {check:?}");
    };
    for needle in &needles {
        assert!(line.contains(needle), "{needle:?} missing in: {line}");
    }
    let read_err = read_err.expect("a corrupt record must not be served");
    assert!(read_err.contains("corrupt"), "{read_err}");
    // A consumer's fetch too: the background check found a corrupt record, so fetches check
    // every CRC (fetch_verify = once skips them only once the whole log checked out).
    let fetch_err = fetch_err.expect("a corrupt record must not be fetched");
    assert!(fetch_err.contains("corrupt"), "{fetch_err}");
    assert!(!shard.join("index.snapshot").exists());

    // Strict (the default) refuses, in one line naming the file, the byte and what to run.
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = shard.clone();
    on_executor(move || async move {
        let e = ShardStore::open(&s2, cfg(FlushMode::SyncFlush))
            .await
            .err()
            .expect("strict open must refuse");
        tx.send(e.to_string()).unwrap();
    });
    let line = rx.recv().unwrap();
    for needle in &needles {
        assert!(line.contains(needle), "{needle:?} missing in: {line}");
    }
    assert_eq!(
        std::fs::read_dir(shard.join("commitlog")).unwrap().count(),
        segments_before,
        "a refused open removes nothing"
    );

    // The operator's repair, through the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["admin", "repair", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("quarantined=1 "), "{stdout}");
    assert!(stdout.contains(&format!("position={hit_pos} ")), "{stdout}");
    assert!(
        stdout.contains(&format!("queue=disk/{hit_q} offsets={hit_off}..")),
        "{stdout}"
    );
    let side = shard.join("quarantine").join(format!("{hit_pos:020}.bin"));
    assert!(std::fs::metadata(&side).unwrap().len() > 64);

    // A strict open passes now, and every other acked record is there at its offset.
    on_executor(move || async move {
        let (s, rep) = ShardStore::open(&shard, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        assert!(
            rep.quarantined.is_empty() && rep.truncated_at.is_none(),
            "{rep}"
        );
        let kept: Vec<_> = expect
            .iter()
            .copied()
            .filter(|&(q, off, _)| (q, off) != (hit_q, hit_off))
            .collect();
        assert_eq!(kept.len(), expect.len() - 1);
        check_all(&s, &kept).await;
        // The lost offset reads as a gap: asking for it returns the next record.
        let b = s
            .read("disk", hit_q, QueueOffset(hit_off), 1)
            .await
            .unwrap();
        let r = RecordIter::new(&b.records).next().unwrap().unwrap();
        assert_eq!(r.header.base_queue_offset, hit_off + 1);
        s.close().await.unwrap();
    });
}

/// `fetch_verify`: with `once` (the default) a fetch sends records as read once the whole log
/// was checked (here: a fresh log, every record built by this store), so a bit flipped on the
/// disk afterwards leaves the broker; the client's parse of the answer refuses it, so no
/// application ever gets it. With `always` the fetch itself answers CORRUPT. `read` (what
/// retries and transactions copy records with) checks always.
#[test]
fn a_bit_flipped_after_the_check_is_refused_by_the_client_or_by_an_always_verifying_fetch() {
    for verify in [FetchVerify::Once, FetchVerify::Always] {
        let dir = data_dir();
        let shard = dir.path().join("shard-0");
        let (tx, rx) = std::sync::mpsc::channel();
        on_executor(move || async move {
            let config = StorageConfig {
                fetch_verify: verify,
                ..cfg(FlushMode::SyncFlush)
            };
            let (s, _) = ShardStore::open(&shard, config).await.unwrap();
            assert_eq!(s.background_check(), BackgroundCheck::NotNeeded);
            let expect = append_many(&s, 7, 20, 1).await;
            let (q, off, _) = expect[3];
            let clean = s.fetch("disk", q, QueueOffset(off), 1).await.unwrap();
            let pos = RecordIter::new(&clean.records)
                .next()
                .unwrap()
                .unwrap()
                .header
                .log_position;
            let seg0 = shard.join("commitlog").join("00000000000000000000");
            flip_bits(&seg0, pos + 64 + 4 + 10, 0x10); // header, topic "disk", then the body
            let fetched = s.fetch("disk", q, QueueOffset(off), 1).await;
            let read = s.read("disk", q, QueueOffset(off), 1).await;
            s.close().await.unwrap();
            tx.send((fetched, read.err().map(|e| e.to_string())))
                .unwrap();
        });
        let (fetched, read_err) = rx.recv().unwrap();
        let read_err = read_err.expect("read checks every CRC");
        assert!(read_err.contains("corrupt"), "{read_err}");
        match (verify, fetched) {
            (FetchVerify::Once, Ok(batch)) => {
                let parsed: Result<Vec<_>, _> = RecordIter::new(&batch.records).collect();
                let e = parsed.expect_err("the client's parse must refuse the flipped bit");
                assert!(e.to_string().contains("crc mismatch"), "{e}");
            }
            (FetchVerify::Always, Err(e)) => {
                assert!(e.to_string().contains("corrupt"), "{e}");
            }
            (verify, other) => panic!("fetch_verify = {verify}: {other:?}"),
        }
    }
}

/// Issue 14, retention by age on the real disk: the sealed segments last written more than
/// `retention_hours` ago are deleted oldest first (here the first two, their modification time
/// set back by 100 h), never a younger one after them nor the active one; a read below the
/// oldest kept offset gets OFFSET_OUT_OF_RANGE naming it; everything kept reads back, also
/// after a restart from the index snapshot.
#[test]
fn retention_deletes_only_the_expired_prefix_of_sealed_segments() {
    let dir = data_dir();
    let path = dir.path().join("shard-0");
    on_executor(move || async move {
        let (s, _) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        let expect = append_many(&s, 1, 60, 8).await; // ~5 MiB: several 1 MiB segments
        let segs = segment_files;
        let before = segs(&path);
        assert!(before.len() >= 5, "{before:?}");
        let old = SystemTime::now() - Duration::from_secs(100 * 3600);
        // Segments 0 and 1 expired; segment 3 too, but segment 2 is young, so 3 must stay.
        for i in [0, 1, 3] {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&before[i])
                .unwrap();
            f.set_modified(old).unwrap();
        }
        let removed = s.drop_expired_segments(SystemTime::now()).unwrap();
        assert_eq!(removed, 2);
        // Kept for reuse (`recycle_segments`): renamed in the background, and one of them may
        // already be the next segment, prepared ahead of the active one (a later name).
        let gone = |after: &[std::path::PathBuf]| {
            !after.contains(&before[0]) && !after.contains(&before[1])
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone(&segs(&path)) && std::time::Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let after = segs(&path);
        assert!(gone(&after), "{after:?}");
        assert_eq!(after[..before.len() - 2], before[2..], "{after:?}");
        let last = before.last().unwrap();
        assert!(
            after[before.len() - 2..].iter().all(|p| p > last),
            "only a segment prepared ahead may be new: {after:?}"
        );
        let st = s.queue_stats("disk", 0);
        assert!(st.min_offset.0 > 0, "{st:?}");
        let e = s.read("disk", 0, QueueOffset(0), 1).await.unwrap_err();
        assert!(e.to_string().contains(&st.min_offset.0.to_string()), "{e}");
        let mins: Vec<u64> = (0..8)
            .map(|q| s.queue_stats("disk", q).min_offset.0)
            .collect();
        let kept: Vec<_> = expect
            .iter()
            .copied()
            .filter(|&(q, off, _)| off >= mins[q as usize])
            .collect();
        assert!(kept.len() < expect.len() && !kept.is_empty());
        check_all(&s, &kept).await;
        s.close().await.unwrap();
        drop(s);
        let (s, rep) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        assert!(rep.from_snapshot, "{rep}");
        check_all(&s, &kept).await;
        assert_eq!(s.queue_stats("disk", 0).min_offset, st.min_offset);
        s.close().await.unwrap();
    });
}

/// Retention by size on the real disk: with `retention_bytes` of three 1 MiB segments, the
/// retention task (every second) deletes the oldest sealed segments until the log fits; what
/// is kept reads back, what went reads as OFFSET_OUT_OF_RANGE naming the oldest offset.
#[test]
fn retention_by_size_keeps_the_log_within_its_bound() {
    let dir = data_dir();
    let path = dir.path().join("shard-0");
    on_executor(move || async move {
        let config = StorageConfig {
            retention_bytes: 3 << 20,
            ..cfg(FlushMode::SyncFlush)
        };
        let (s, _) = ShardStore::open(&path, config).await.unwrap();
        let expect = append_many(&s, 1, 60, 8).await; // ~5 MiB: several 1 MiB segments
        let segments = || {
            std::fs::read_dir(path.join("commitlog"))
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .chars()
                        .all(|c| c.is_ascii_digit())
                })
                .count()
        };
        assert!(segments() >= 5, "{} segments", segments());
        let mut waited = 0;
        // Three in the log (sealed and active) plus the spare prepared for the next roll.
        while segments() > 4 {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            waited += 1;
            assert!(waited < 50, "still {} segments after 5 s", segments());
        }
        let st = s.queue_stats("disk", 0);
        assert!(st.min_offset.0 > 0, "{st:?}");
        let e = s.read("disk", 0, QueueOffset(0), 1).await.unwrap_err();
        assert!(e.to_string().contains(&st.min_offset.0.to_string()), "{e}");
        let mins: Vec<u64> = (0..8)
            .map(|q| s.queue_stats("disk", q).min_offset.0)
            .collect();
        let kept: Vec<_> = expect
            .iter()
            .copied()
            .filter(|&(q, off, _)| off >= mins[q as usize])
            .collect();
        assert!(!kept.is_empty());
        check_all(&s, &kept).await;
        s.close().await.unwrap();
    });
}

/// The clean watermark and forced deletion, on a small loop-device file system: above
/// `disk_clean_ratio` expired segments go within seconds (not at the minute's check); above
/// `disk_force_clean_ratio` unexpired ones go only with `force_clean`, oldest first, until
/// the usage is below it.
#[test]
fn above_the_clean_ratio_expired_segments_go_at_once_and_forced_deletion_is_opt_in() {
    let fs = match common::loopfs::LoopFs::new(64) {
        Ok(fs) => fs,
        Err(why) => return common::loopfs::skip("clean_ratio_and_forced_deletion", &why),
    };
    let mount = fs.mount.clone();
    let path = mount.join("shard-0");
    let filler = mount.join("filler");
    on_executor(move || async move {
        let segments = segment_files;
        let wait_until = |what: &str, mut done: Box<dyn FnMut() -> bool>| {
            let what = what.to_string();
            async move {
                for _ in 0..80 {
                    if done() {
                        return;
                    }
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
                panic!("{what}: not within 8 s");
            }
        };
        // Phase 1: clean ratio. Expired segments, disk above 75 %.
        let (s, _) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        append_many(&s, 1, 60, 8).await;
        s.wait_spare_segment().await; // zeroed at a pace: there before the names are taken
        let before = segments(&path);
        assert!(before.len() >= 5, "{before:?}");
        let old = SystemTime::now() - Duration::from_secs(100 * 3600);
        for seg in &before[..2] {
            let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
            f.set_modified(old).unwrap();
        }
        let used = |m: &std::path::Path| ringmq::storage::space::fs_space(m).unwrap().used_ratio();
        // Fill to ~80 %: above the clean ratio, below the force ratio.
        fill_to(&mount, &filler, 0.80);
        assert!(
            used(&mount) > 0.75 && used(&mount) < 0.85,
            "{}",
            used(&mount)
        );
        let p = path.clone();
        wait_until(
            "expired segments deleted above the clean ratio",
            Box::new(move || segments(&p).len() == before.len() - 2),
        )
        .await;
        // Above the clean ratio the space matters more than recycling: deleted, not kept.
        let kept = recycled_count(&path);
        assert_eq!(kept, 0, "segments kept for reuse above the clean ratio");
        s.close().await.unwrap();
        drop(s);
        std::fs::remove_file(&filler).unwrap();

        // Phase 2: unexpired segments, disk above 85 %: kept without force_clean...
        let (s, _) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        append_many(&s, 2, 60, 8).await;
        // The next segment is zeroed at a pace: let it be there before the snapshot of names.
        s.wait_spare_segment().await;
        let now = segments(&path);
        fill_to(&mount, &filler, 0.90);
        glommio::timer::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            segments(&path),
            now,
            "deleted unexpired segments without force_clean"
        );
        s.close().await.unwrap();
        drop(s);
        // ... and deleted, oldest first, with it, until the usage is below the force ratio.
        let forced = StorageConfig {
            force_clean: true,
            ..cfg(FlushMode::SyncFlush)
        };
        let (s, _) = ShardStore::open(&path, forced).await.unwrap();
        let m = mount.clone();
        wait_until(
            "forced deletion brings usage below disk_force_clean_ratio",
            Box::new(move || used(&m) <= 0.85),
        )
        .await;
        let left = segments(&path);
        assert!(left.len() < now.len(), "{left:?}");
        assert!(left.iter().all(|p| now.contains(p)), "only the oldest went");
        assert_eq!(left[..], now[now.len() - left.len()..], "a prefix went");
        s.close().await.unwrap();
    });
    drop(fs);
}

/// Writes `filler` until the file system holding `mount` is used at about `ratio`.
fn fill_to(mount: &std::path::Path, filler: &std::path::Path, ratio: f64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    let chunk = vec![0u8; 256 << 10];
    while ringmq::storage::space::fs_space(mount)
        .unwrap()
        .used_ratio()
        < ratio
    {
        f.write_all(&chunk).unwrap();
        f.sync_data().unwrap();
    }
}

/// Segment recycling on the real disk: retention's dropped segments become `.recycled` files
/// and then the log's next segments, with their previous life still in them; what the log
/// wrote since reads back, also after a clean stop and a full scan of every segment, and
/// nothing is truncated (the old bytes past the log end are never read as a torn tail).
#[test]
fn dropped_segments_are_recycled_into_new_ones_and_their_old_bytes_never_read() {
    let dir = data_dir();
    let path = dir.path().join("shard-0");
    on_executor(move || async move {
        let (s, _) = ShardStore::open(&path, cfg(FlushMode::SyncFlush))
            .await
            .unwrap();
        let first = append_many(&s, 1, 60, 8).await; // ~5 MiB: several 1 MiB segments
        let dropped = s
            .drop_segments_before(ringmq::storage::LogPosition(2 << 20))
            .unwrap();
        assert_eq!(dropped, 2);
        let recycled = recycled_count;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while recycled(&path) < 2 {
            assert!(std::time::Instant::now() < deadline, "no .recycled files");
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // More than two more segments: the spare in waiting, then the recycled ones.
        let second = append_many(&s, 2, 60, 8).await;
        let m = s.metrics();
        assert_eq!(m.segments_recycled, 2, "{m:?}");
        assert_eq!(recycled(&path), 0);
        let mins: Vec<u64> = (0..8)
            .map(|q| s.queue_stats("disk", q).min_offset.0)
            .collect();
        let kept: Vec<_> = first
            .iter()
            .chain(&second)
            .copied()
            .filter(|&(q, off, _)| off >= mins[q as usize])
            .collect();
        check_all(&s, &kept).await;
        s.close().await.unwrap();
        drop(s);
        let full_scan = StorageConfig {
            index_snapshot: false,
            ..cfg(FlushMode::SyncFlush)
        };
        let (s, rep) = ShardStore::open(&path, full_scan).await.unwrap();
        assert!(rep.truncated_at.is_none(), "{rep}");
        assert_eq!(rep.valid_records_discarded, 0, "{rep}");
        check_all(&s, &kept).await;
        for q in 0..8u32 {
            assert_eq!(
                s.queue_stats("disk", q).written_end_offset.0,
                120,
                "queue {q} goes on where it was"
            );
        }
        s.close().await.unwrap();
    });
}
