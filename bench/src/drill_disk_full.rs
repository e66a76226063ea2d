//! `ringmq-bench drill disk-full`: rehearse a full disk and audit what the acks promised.
//!
//! Each round makes a small ext4 file system on a loop device (`--fs-mib`, default 300; root
//! only, serialized with an exclusive `flock` on `/tmp/ringmq-loop.lock`, unmounted and removed
//! afterwards on every path), runs a broker process (`serve-broker`) with its data dir there
//! and the device's ENOSPC as the only limit (`disk_reject_ratio = 1.0`), and:
//!
//! 1. fills the file system with a filler file next to the data dir until one more segment
//!    fits and a second does not;
//! 2. runs the drills' pipelined producers (no client retries) until the broker answers
//!    DISK_FULL, and keeps them sending for `--full-hold-ms` (every answer must be an ack or
//!    DISK_FULL: STORAGE_ERROR or any other status fails the round);
//! 3. reads every queue while the disk is full (reads must keep working);
//! 4. deletes the filler and measures how long until the next ack (writes must resume by
//!    themselves, no restart);
//! 5. stops the load, stops the broker with SIGTERM (it must exit 0), restarts it on the same
//!    data dir and audits every acked message: present at its offset, intact, once — in both
//!    flush modes, since the stop was clean.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringmq::client::Admin;
use ringmq::config::{Config, StorageConfig};
use ringmq::storage::space::fs_space;
use ringmq::storage::FlushMode;

use crate::drill::{self, audit, read_everything, DrillArgs, Verdict, TOPIC};
use crate::drill_load::{Load, LoadOptions};
use crate::runner::error_kind;
use crate::slave::{SlaveHost, SlaveProcess};

/// The lock every loop-device user of this project holds (the tests take it too).
const LOCK_PATH: &str = "/tmp/ringmq-loop.lock";
/// How long the load may take to fill the disk, and the writes to resume.
const FILL_TIMEOUT: Duration = Duration::from_secs(120);
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// The status a full disk must produce, and the only failure a round accepts.
const DISK_FULL: &str = "DISK_FULL";

/// What one round found.
#[derive(Debug)]
struct RoundReport {
    round: u32,
    acked_before_free: u64,
    disk_full_answers: u64,
    /// Failures other than DISK_FULL, by status.
    other_failures: BTreeMap<String, u64>,
    reads_while_full: Result<usize, String>,
    resumed_after_ms: Option<u64>,
    acked_after_free: u64,
    lost: u64,
    damaged: u64,
    duplicates: u64,
    clean_stop: Result<(), String>,
    verdict: Verdict,
    why: Vec<String>,
}

/// An ext4 file system on a loop device, gone on drop.
struct LoopFs {
    mount: PathBuf,
    image: PathBuf,
    mounted: bool,
    _lock: File,
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopFs {
    fn new(dir: &Path, mib: u64) -> Result<LoopFs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("drill disk-full needs root (it mounts a loop device)".into());
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(|e| format!("{LOCK_PATH}: {e}"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "flock {LOCK_PATH}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut fs = LoopFs {
            mount: dir.join("mnt"),
            image: dir.join("fs.img"),
            mounted: false,
            _lock: lock,
        };
        std::fs::create_dir_all(&fs.mount).map_err(|e| format!("{}: {e}", fs.mount.display()))?;
        File::create(&fs.image)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| format!("{}: {e}", fs.image.display()))?;
        run_cmd(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&fs.image),
        )?;
        run_cmd(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&fs.image)
                .arg(&fs.mount),
        )?;
        fs.mounted = true;
        Ok(fs)
    }

    fn available_bytes(&self) -> u64 {
        fs_space(&self.mount).map_or(0, |s| s.available_bytes)
    }

    /// Writes `path` until about `leave` bytes are available.
    fn fill(&self, path: &Path, leave: u64) -> Result<(), String> {
        let mut f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let chunk = vec![0xF1u8; 1 << 20];
        loop {
            let avail = self.available_bytes();
            if avail <= leave {
                break;
            }
            let n = ((avail - leave) as usize).min(chunk.len());
            match f.write(&chunk[..n]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(format!("filling {}: {e}", path.display())),
            }
            // Delayed allocation: make the file system count the blocks now.
            let _ = f.sync_data();
        }
        let _ = f.sync_all();
        Ok(())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let mut ok = false;
            for _ in 0..50 {
                if run_cmd(Command::new("umount").arg(&self.mount)).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                let _ = run_cmd(Command::new("umount").arg("-l").arg(&self.mount));
            }
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

fn start_broker(args: &DrillArgs, dir: &Path, data: &Path) -> Result<SlaveProcess, String> {
    let config = Config {
        server: crate::runner::bench_server_config(data, "127.0.0.1", args.broker_cores),
        storage: StorageConfig {
            flush_mode: args.flush_mode,
            flush_interval_ms: args.flush_interval_ms,
            segment_bytes: args.segment_mib << 20,
            // The device's own ENOSPC is what this drill rehearses.
            disk_reject_ratio: 1.0,
            ..StorageConfig::default()
        },
        ..Config::default()
    };
    let path = dir.join("config.toml");
    std::fs::write(&path, config.to_toml()).map_err(|e| format!("{}: {e}", path.display()))?;
    let cores: Vec<usize> = (0..args.broker_cores).collect();
    SlaveProcess::spawn(&path, &SlaveHost::Loopback, &cores)
}

/// Waits until every shard has its active segment and a prepared spare, so the filler takes
/// exactly the space it means to.
fn wait_for_spares(data: &Path, shards: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = (0..shards).all(|s| {
            let log = data.join(format!("shard-{s}")).join("commitlog");
            let names: Vec<String> = std::fs::read_dir(&log)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.iter().filter(|n| n.len() == 20).count() >= 2
                && !names.iter().any(|n| n.ends_with(".tmp"))
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the broker did not prepare its spare segments within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_kinds(failures: &[(String, Instant)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (k, _) in failures {
        *m.entry(k.clone()).or_default() += 1;
    }
    m
}

fn round(args: &DrillArgs, dir: &Path, n: u32) -> Result<RoundReport, String> {
    let mut r = RoundReport {
        round: n,
        acked_before_free: 0,
        disk_full_answers: 0,
        other_failures: BTreeMap::new(),
        reads_while_full: Ok(0),
        resumed_after_ms: None,
        acked_after_free: 0,
        lost: 0,
        damaged: 0,
        duplicates: 0,
        clean_stop: Ok(()),
        verdict: Verdict::Pass,
        why: Vec::new(),
    };
    let round_dir = dir.join(format!("round-{n}"));
    std::fs::create_dir_all(&round_dir).map_err(|e| format!("{}: {e}", round_dir.display()))?;
    let fs = LoopFs::new(&round_dir, args.fs_mib)?;
    let data = fs.mount.join("data");
    let broker = start_broker(args, &round_dir, &data)?;
    let addr = broker.address().to_string();
    Admin::connect(&addr)
        .and_then(|a| a.create_topic(TOPIC, args.queues))
        .map_err(|e| format!("create topic: {e}"))?;
    wait_for_spares(&data, args.broker_cores)?;
    let segment = args.segment_mib << 20;
    let filler = fs.mount.join("filler");
    // One more segment per shard fits, a second does not.
    fs.fill(&filler, segment * args.broker_cores as u64 + (4 << 20))?;

    let load = Load::start(
        args,
        &addr,
        n,
        LoadOptions {
            request_timeout: Duration::from_secs(10),
            stop_on_refused_send: false,
            classify: error_kind,
        },
    )?;
    let started = Instant::now();
    // Full once DISK_FULL answers arrive; hold it full for a while.
    while load.failed() == 0 {
        if started.elapsed() > FILL_TIMEOUT {
            let _ = load.finish();
            return Err(format!("the disk did not fill within {FILL_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(args.full_hold_ms));
    r.reads_while_full = read_everything(&addr, args.queues).map(|m| m.len());

    let acked_before_free = load.acked();
    let freed_at = Instant::now();
    std::fs::remove_file(&filler).map_err(|e| format!("{}: {e}", filler.display()))?;
    while load.acked() == acked_before_free && freed_at.elapsed() < RESUME_TIMEOUT {
        std::thread::sleep(Duration::from_millis(5));
    }
    if load.acked() > acked_before_free {
        r.resumed_after_ms = Some(freed_at.elapsed().as_millis() as u64);
        std::thread::sleep(Duration::from_millis(500));
    }
    let (acks, failures) = load.finish();
    r.acked_before_free = acked_before_free as u64;
    r.acked_after_free = (acks.len() - acked_before_free) as u64;
    for (kind, count) in count_kinds(&failures) {
        if kind == DISK_FULL {
            r.disk_full_answers = count;
        } else {
            r.other_failures.insert(kind, count);
        }
    }
    r.clean_stop = match broker.stop() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("SIGTERM: {s}")),
        Err(e) => Err(e),
    };

    let broker = start_broker(args, &round_dir, &data)?;
    let stored = read_everything(broker.address(), args.queues)?;
    let acks: Vec<drill::Ack> = acks
        .iter()
        .map(|a| drill::Ack {
            id: a.id,
            queue: a.result.queue,
            offset: a.result.offset,
            before_reading: true,
        })
        .collect();
    // A clean stop: nothing acked may be missing in either flush mode.
    let (a, _) = audit(
        FlushMode::SyncFlush,
        args.message_bytes as usize,
        &acks,
        &[],
        &stored,
        0,
    );
    r.lost = a.lost_before_reading + a.lost_after_reading;
    r.damaged = a.damaged;
    r.duplicates = a.duplicates;
    broker
        .stop()
        .map_err(|e| format!("stopping the broker: {e}"))?;
    drop(fs);

    if r.disk_full_answers == 0 {
        r.why.push("no DISK_FULL answer".into());
    }
    if !r.other_failures.is_empty() {
        r.why.push(format!("other answers: {:?}", r.other_failures));
    }
    if let Err(e) = &r.reads_while_full {
        r.why.push(format!("reads failed while full: {e}"));
    }
    if r.resumed_after_ms.is_none() {
        r.why.push(format!(
            "writes did not resume within {RESUME_TIMEOUT:?} of freeing space"
        ));
    }
    if let Err(e) = &r.clean_stop {
        r.why.push(format!("unclean stop: {e}"));
    }
    if !a.why.is_empty() {
        r.why.push(a.why);
    }
    if !r.why.is_empty() {
        r.verdict = Verdict::Fail;
    }
    Ok(r)
}

fn table(args: &DrillArgs, reports: &[RoundReport]) -> String {
    let mut t = format!(
        "drill disk-full, {}, {} MiB ext4 on a loop device, {} MiB segments: DISK_FULL and \
         nothing else while full, reads work, writes resume by themselves, SIGTERM exits 0, \
         every acked message present once and intact after a restart\n\n",
        args.flush_mode, args.fs_mib, args.segment_mib
    );
    t.push_str(
        "| round | acked before freeing | messages answered DISK_FULL | other answers | messages readable while full | resumed after ms | acked after | lost / damaged / dup | SIGTERM | verdict |\n\
         |---:|---:|---:|---|---:|---:|---:|---|---|---|\n",
    );
    for r in reports {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
            r.round,
            r.acked_before_free,
            r.disk_full_answers,
            if r.other_failures.is_empty() {
                "none".to_string()
            } else {
                format!("{:?}", r.other_failures)
            },
            match &r.reads_while_full {
                Ok(n) => n.to_string(),
                Err(_) => "failed".to_string(),
            },
            r.resumed_after_ms
                .map_or("never".to_string(), |ms| ms.to_string()),
            r.acked_after_free,
            r.lost,
            r.damaged,
            r.duplicates,
            if r.clean_stop.is_ok() {
                "exit 0"
            } else {
                "unclean"
            },
            match r.verdict {
                Verdict::Pass => "PASS".to_string(),
                Verdict::Fail => format!("FAIL: {}", r.why.join("; ")),
            }
        ));
    }
    t
}

pub fn run(args: DrillArgs) -> Result<(), String> {
    args.validate()?;
    let dir = drill::data_dir(&args)?;
    eprintln!(
        "drill disk-full: {} rounds, {}, {} producers x pipelined {} B messages, {} queues, {} MiB file system, data {}",
        args.rounds,
        args.flush_mode,
        args.producers,
        args.message_bytes,
        args.queues,
        args.fs_mib,
        dir.display()
    );
    let mut reports = Vec::new();
    let mut outcome = Ok(());
    for n in 1..=args.rounds {
        match round(&args, &dir, n) {
            Ok(r) => {
                eprintln!(
                    "round {n}: {:?}{}",
                    r.verdict,
                    if r.why.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.why.join("; "))
                    }
                );
                reports.push(r);
            }
            Err(e) => {
                outcome = Err(format!("round {n}: {e}"));
                break;
            }
        }
    }
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome?;
    println!("{}", table(&args, &reports));
    let failed = reports
        .iter()
        .filter(|r| r.verdict == Verdict::Fail)
        .count();
    if failed > 0 {
        return Err(format!("{failed} of {} round(s) failed", reports.len()));
    }
    Ok(())
}
