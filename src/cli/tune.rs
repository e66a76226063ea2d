//! `ringmq tune --check`: reads the host a broker would run on and prints one row per setting
//! that decides what the broker can do (value, why it matters, what to run), each OK, WARN or
//! FAIL. It changes nothing (the data dir probe writes one block and removes it, and removes
//! the directories it had to create for that).
//!
//! Contract: a row is FAIL exactly when a broker started with the same config would refuse to
//! start for that reason; the verdicts for kernel, io_uring, memlock and the data dir are
//! `shard::preflight`'s own, the config check is `Config::validate`, and the free-space one is
//! the room the store needs to prepare each new shard's first segment. The exit code is
//! non-zero when any row is FAIL; WARNs never fail it.
//!
//! Layout: [`Host::read`] does every read (each may fail: a missing `/sys` or `/proc` file
//! becomes "unknown" with the reason, never a panic); the `check_*` functions are pure over
//! what was read, so the unit tests feed them values.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Args;

use ringmq::config::Config;
use ringmq::shard::preflight::{self, PreflightError};
use ringmq::storage::recovery::log_has_segments;
use ringmq::storage::space::{fs_space, FsSpace};
use ringmq::storage::COMMITLOG_DIR;

use crate::broker_args::BrokerArgs;

/// Below this soft RLIMIT_NOFILE a busy broker can run out of descriptors (every connection,
/// segment and consume-queue file holds one). RocketMQ's deployment guide asks for 655350.
pub const NOFILE_WARN_BELOW: u64 = 65_536;

/// glommio's registered buffers plus rings measured usable under this machine's 8 MiB
/// memlock: about 6 MiB (NOTES.md), so preflight's 1 MiB margin is the least, not a comfort.
const MEMLOCK_COMFORT_MARGIN_BYTES: u64 = 2 << 20;

/// Bytes a fresh shard writes before it serves besides its first segment: the checkpoint
/// (two 4 KiB slots) and the DMA probe file (4 KiB), rounded up.
const FRESH_SHARD_EXTRA_BYTES: u64 = 16 << 10;

#[derive(Args)]
pub struct TuneArgs {
    /// Check the host and print a table; exit non-zero when a broker would refuse to start
    #[arg(long, required = true)]
    check: bool,
    /// The broker's flags (`--config`, `--data-dir`, `--cores`, `--io-memory-bytes`, ...),
    /// read exactly as `ringmq broker` reads them
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub setting: &'static str,
    pub value: String,
    pub status: Status,
    pub why: String,
    /// What to run to change it; `None` when nothing needs doing.
    pub fix: Option<String>,
}

impl Row {
    fn new(setting: &'static str, status: Status, value: String, why: impl Into<String>) -> Row {
        Row {
            setting,
            value,
            status,
            why: why.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Row {
        self.fix = Some(fix.into());
        self
    }

    /// A value that could not be read: WARN, since nothing can be said about it.
    fn unknown(setting: &'static str, why_unknown: &str, why: &str) -> Row {
        Row::new(
            setting,
            Status::Warn,
            format!("unknown ({why_unknown})"),
            why,
        )
    }
}

/// A reading of the host, or why it could not be made.
pub type Reading<T> = Result<T, String>;

/// What the broker would run with: the config after `--config` and the flags.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: Config,
    /// Where the config came from: "defaults" or the file.
    pub source: String,
    /// Problems that make the broker refuse the config (validation, cores, an unreadable file).
    pub problems: Vec<String>,
    pub shards: usize,
    pub cores: Vec<usize>,
}

impl Plan {
    fn from_args(args: BrokerArgs) -> Plan {
        let source = args
            .config_path()
            .map_or("defaults".to_string(), |p| p.display().to_string());
        let data_dir = args.data_dir().map(Path::to_path_buf);
        let mut problems = Vec::new();
        let config = match args.into_config() {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                let mut c = Config::default();
                if let Some(d) = data_dir {
                    c.server.data_dir = d;
                }
                c
            }
        };
        if let Err(e) = config.validate() {
            problems.push(e.to_string());
        }
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let cores = match config.server.cores.resolve(&available) {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        };
        Plan {
            shards: cores.len().max(1),
            cores,
            config,
            source,
            problems,
        }
    }
}

/// The block device under the data dir and its queue settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    /// `vda`, `nvme0n1` (the whole disk, also when the data dir is on a partition).
    pub name: String,
    /// `write back` or `write through`.
    pub write_cache: Reading<String>,
    /// `0` or `1`.
    pub fua: Reading<String>,
    /// `none [mq-deadline] kyber bfq`.
    pub scheduler: Reading<String>,
}

/// The file system holding the data dir, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// cpuidle state from `/sys/devices/system/cpu/cpuidle`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuIdle {
    pub driver: String,
    pub governor: String,
    /// `/sys/module/haltpoll/parameters/guest_halt_poll_ns` when the guest driver is there.
    pub guest_halt_poll_ns: Option<u64>,
}

/// Everything read from the host. Each field is what one check needs.
#[derive(Debug)]
pub struct Host {
    pub data_dir: PathBuf,
    pub kernel: String,
    /// `kernel.io_uring_disabled`, `None` when the kernel has no such sysctl.
    pub io_uring_disabled: Option<u32>,
    pub io_uring_probe: Result<(), String>,
    pub root: bool,
    pub ipc_lock: bool,
    /// Soft and hard RLIMIT_MEMLOCK, `None` = unlimited.
    pub memlock: Reading<(Option<u64>, Option<u64>)>,
    /// Soft and hard RLIMIT_NOFILE, `None` = unlimited.
    pub nofile: Reading<(Option<u64>, Option<u64>)>,
    pub mount: Reading<Mount>,
    pub memory_fs: bool,
    /// preflight's data dir probe: whether O_DIRECT works and the file system is on disk.
    pub direct_io: Result<bool, PreflightError>,
    pub space: Reading<FsSpace>,
    /// Shards of the plan whose log has no segment yet (each prepares a whole one at start).
    pub fresh_shards: usize,
    pub disk: Reading<Disk>,
    pub cpuidle: Reading<CpuIdle>,
    /// `/sys/module/kvm/parameters/halt_poll_ns`; `None` when kvm is not loaded.
    pub halt_poll_ns: Option<Reading<u64>>,
    /// Running in a virtual machine (the `hypervisor` CPU flag).
    pub virtual_machine: bool,
    /// Distinct `scaling_governor`s of all CPUs; empty when there is no cpufreq driver.
    pub governors: Reading<Vec<String>>,
}

fn read_trim(path: impl AsRef<Path>) -> Reading<String> {
    let path = path.as_ref();
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Reading<(Option<u64>, Option<u64>)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into `lim`.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    let finite = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Ok((finite(lim.rlim_cur), finite(lim.rlim_max)))
}

/// The data dir made absolute, and its nearest existing ancestor (itself when it exists):
/// what a broker would create it in, so what the file system checks look at.
fn existing_ancestor(dir: &Path) -> Reading<PathBuf> {
    let abs = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut at = abs.as_path();
    loop {
        if at.exists() {
            return at
                .canonicalize()
                .map_err(|e| format!("{}: {e}", at.display()));
        }
        at = at
            .parent()
            .ok_or_else(|| format!("no part of {} exists", abs.display()))?;
    }
}

/// Runs preflight's data dir probe (which creates the dir like a broker would), then removes
/// the directories it had to create, so a check leaves the host as it was.
fn probe_data_dir(dir: &Path) -> Result<bool, PreflightError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    let r = preflight::check_data_dir(dir);
    // Deepest first; `remove_dir` only removes an empty directory, so nothing else can go.
    for d in &missing {
        let _ = fs::remove_dir(d);
    }
    r
}

/// Undoes the octal escapes (`\040` for a space) of a mountinfo field.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount holding `path` (absolute, canonical): the longest mount point that is a prefix
/// of it, the last one listed when a point is mounted over.
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        // `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw`: the mount point
        // is the fifth field, the type and source follow the separator.
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_mountinfo(point));
        let mut right = right.split(' ');
        let (Some(fs_type), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        let deeper = best.as_ref().map_or(true, |b| {
            mount_point.components().count() >= b.mount_point.components().count()
        });
        if path.starts_with(&mount_point) && deeper {
            best = Some(Mount {
                mount_point,
                fs_type: fs_type.to_string(),
                source: unescape_mountinfo(source),
            });
        }
    }
    best
}

/// Linux's `major()`/`minor()` of a `dev_t`.
pub fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The whole disk's sysfs directory for the file system at `existing` (on `mount`).
fn disk_sysfs(existing: &Path, mount: &Reading<Mount>) -> Reading<PathBuf> {
    let dev = fs::metadata(existing)
        .map_err(|e| format!("{}: {e}", existing.display()))?
        .dev();
    let (major, minor) = dev_major_minor(dev);
    let node = if major != 0 {
        PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
    } else {
        // btrfs and others report an anonymous device: try the mount's source instead.
        let m = mount.as_ref().map_err(Clone::clone)?;
        let source = Path::new(&m.source);
        let name = source
            .canonicalize()
            .ok()
            .filter(|p| p.starts_with("/dev"))
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
            .ok_or_else(|| format!("{} is not on a block device", m.fs_type))?;
        Path::new("/sys/class/block").join(name)
    };
    let dir = node
        .canonicalize()
        .map_err(|e| format!("{}: {e}", node.display()))?;
    // A partition's queue settings are its disk's.
    if dir.join("partition").exists() {
        dir.parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| format!("{} has no parent disk", dir.display()))
    } else {
        Ok(dir)
    }
}

fn read_disk(existing: &Path, mount: &Reading<Mount>) -> Reading<Disk> {
    let dir = disk_sysfs(existing, mount)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let queue = dir.join("queue");
    Ok(Disk {
        name,
        write_cache: read_trim(queue.join("write_cache")),
        fua: read_trim(queue.join("fua")),
        scheduler: read_trim(queue.join("scheduler")),
    })
}

fn read_governors() -> Reading<Vec<String>> {
    let cpu = Path::new("/sys/devices/system/cpu");
    let entries = fs::read_dir(cpu).map_err(|e| format!("cannot read {}: {e}", cpu.display()))?;
    let mut governors: Vec<String> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix("cpu")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| read_trim(e.path().join("cpufreq/scaling_governor")).ok())
        .collect();
    governors.sort();
    governors.dedup();
    Ok(governors)
}

fn read_cpuidle() -> Reading<CpuIdle> {
    let dir = Path::new("/sys/devices/system/cpu/cpuidle");
    let governor = read_trim(dir.join("current_governor"))
        .or_else(|_| read_trim(dir.join("current_governor_ro")))?;
    Ok(CpuIdle {
        driver: read_trim(dir.join("current_driver"))?,
        governor,
        guest_halt_poll_ns: read_trim("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .ok()
            .and_then(|s| s.parse().ok()),
    })
}

impl Host {
    /// Reads everything the checks need for `plan`. Never fails: what cannot be read is kept
    /// as the reason.
    pub fn read(plan: &Plan) -> Host {
        let data_dir = plan.config.server.data_dir.clone();
        let existing = existing_ancestor(&data_dir);
        let mount = existing.as_ref().map_err(Clone::clone).and_then(|p| {
            let text = read_trim("/proc/self/mountinfo")?;
            mount_of(&text, p).ok_or_else(|| format!("no mount holds {}", p.display()))
        });
        let fresh_shards = (0..plan.shards)
            .filter(|i| !log_has_segments(&data_dir.join(format!("shard-{i}")).join(COMMITLOG_DIR)))
            .count();
        Host {
            kernel: preflight::kernel_release(),
            io_uring_disabled: preflight::io_uring_disabled_sysctl(),
            io_uring_probe: preflight::probe_io_uring().map_err(|e| e.to_string()),
            root: preflight::is_root(),
            ipc_lock: preflight::has_ipc_lock(),
            memlock: rlimit(libc::RLIMIT_MEMLOCK),
            nofile: rlimit(libc::RLIMIT_NOFILE),
            memory_fs: existing.as_ref().is_ok_and(|p| preflight::is_memory_fs(p)),
            direct_io: probe_data_dir(&data_dir),
            space: existing
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|p| fs_space(p).map_err(|e| format!("statvfs {}: {e}", p.display()))),
            fresh_shards,
            disk: existing
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|p| read_disk(p, &mount)),
            mount,
            cpuidle: read_cpuidle(),
            halt_poll_ns: Path::new("/sys/module/kvm").exists().then(|| {
                read_trim("/sys/module/kvm/parameters/halt_poll_ns")
                    .and_then(|s| s.parse().map_err(|e| format!("halt_poll_ns {s:?}: {e}")))
            }),
            virtual_machine: read_trim("/proc/cpuinfo").is_ok_and(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
            }),
            governors: read_governors(),
            data_dir,
        }
    }
}

/// `1.0 GiB`, `8.0 MiB`, `512 KiB`: sizes for people (the exact bytes are in `df -B1`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    UNITS
        .iter()
        .find(|(_, size)| n >= *size)
        .map_or(format!("{n} B"), |(unit, size)| {
            format!("{:.1} {unit}", n as f64 / *size as f64)
        })
}

fn limit_text(v: Option<u64>) -> String {
    v.map_or("unlimited".to_string(), human_bytes)
}

pub fn check_config(plan: &Plan) -> Row {
    let c = &plan.config;
    let value = format!(
        "{}: {} shard(s) on cores {:?}, segment_bytes {}, io_memory_bytes {}, \
         disk_reject_ratio {:.0} %",
        plan.source,
        plan.shards,
        plan.cores,
        human_bytes(c.storage.segment_bytes),
        if c.server.io_memory_bytes == 0 {
            "0 (glommio's 10 MiB)".to_string()
        } else {
            human_bytes(c.server.io_memory_bytes)
        },
        c.storage.disk_reject_ratio * 100.0
    );
    let why = "the broker checks its config before anything else and refuses to start on any \
               problem; the rows below are for this config";
    if plan.problems.is_empty() {
        Row::new("broker config", Status::Ok, value, why)
    } else {
        Row::new(
            "broker config",
            Status::Fail,
            format!("{value}; {}", plan.problems.join("; ").replace('\n', " ")),
            why,
        )
        .fix("fix the config file or the flags (the same check as `ringmq broker`)")
    }
}

pub fn check_kernel(release: &str) -> Row {
    let why = format!(
        "glommio 0.9 needs io_uring features of Linux {}.{}",
        preflight::MIN_KERNEL.0,
        preflight::MIN_KERNEL.1
    );
    match preflight::check_kernel(release) {
        Ok(()) if preflight::parse_kernel(release).is_none() => Row::unknown(
            "kernel",
            &format!("release {release:?} does not parse"),
            &why,
        ),
        Ok(()) => Row::new("kernel", Status::Ok, release.to_string(), why),
        Err(e) => Row::new(
            "kernel",
            Status::Fail,
            release.to_string(),
            format!("{why}: {e}"),
        )
        .fix("boot a Linux 5.8 or newer kernel"),
    }
}

pub fn check_io_uring(disabled: Option<u32>, root: bool, probe: &Result<(), String>) -> Row {
    let sysctl = match disabled {
        Some(v) => format!("kernel.io_uring_disabled={v}"),
        None => "no kernel.io_uring_disabled (kernel before 6.6: on)".to_string(),
    };
    let why = "every shard's network and disk I/O goes through io_uring; 1 = only privileged \
               users, 2 = nobody";
    if let Err(e) = preflight::check_io_uring_sysctl(disabled, root) {
        return Row::new("io_uring", Status::Fail, sysctl, format!("{why}: {e}"))
            .fix("sysctl -w kernel.io_uring_disabled=0");
    }
    match probe {
        Ok(()) => Row::new("io_uring", Status::Ok, format!("{sysctl}; io_uring_setup works"), why),
        Err(e) => Row::new(
            "io_uring",
            Status::Fail,
            format!("{sysctl}; io_uring_setup fails"),
            format!("{why}: {e}"),
        )
        .fix("allow io_uring_setup in the seccomp/container policy (Docker's default profile blocks it)"),
    }
}

pub fn check_memlock(
    limits: &Reading<(Option<u64>, Option<u64>)>,
    root: bool,
    ipc_lock: bool,
    shards: usize,
    io_memory_bytes: u64,
) -> Row {
    let why = "glommio registers io_uring buffers (io_memory_bytes per shard, 10 MiB by \
               default), charged to memlock without CAP_IPC_LOCK; the broker refuses a \
               non-root start whose shards do not fit. Here memlock is 8 MiB and cannot be \
               raised even by root (no CAP_SYS_RESOURCE); about 6 MiB of it is usable";
    let (soft, hard) = match limits {
        Ok(l) => *l,
        Err(e) if root => {
            return Row::new(
                "memlock",
                Status::Ok,
                format!("unknown ({e}); moot: root"),
                why,
            )
        }
        Err(e) => return Row::unknown("memlock", e, why),
    };
    let needed = preflight::memlock_needed_bytes(shards, io_memory_bytes);
    let value = format!(
        "soft {}, hard {}; {} shard(s) need {}; {}, {}CAP_IPC_LOCK",
        limit_text(soft),
        limit_text(hard),
        shards,
        human_bytes(needed),
        if root { "root" } else { "not root" },
        if ipc_lock { "" } else { "no " },
    );
    let short = soft.is_some_and(|l| needed > l);
    let fix = "set io_memory_bytes so shards x io_memory_bytes + 1 MiB fits (e.g. \
               --io-memory-bytes 2097152), raise it (systemd LimitMEMLOCK=, \
               /etc/security/limits.conf), or run as root";
    match preflight::check_memlock_limit(root, soft, shards, io_memory_bytes) {
        Err(e) => Row::new("memlock", Status::Fail, value, format!("{why}: {e}")).fix(fix),
        // Root without the capability (a container that dropped it): the broker starts, and
        // glommio skips the registration with a warning (measured here with
        // `setpriv --bounding-set=-ipc_lock`): I/O then runs on unregistered buffers.
        Ok(()) if root && !ipc_lock && short => Row::new(
            "memlock",
            Status::Warn,
            format!("{value}: glommio will skip registering its buffers"),
            why,
        )
        .fix("give the broker CAP_IPC_LOCK (docker run --cap-add IPC_LOCK), or lower io_memory_bytes"),
        Ok(()) if root || soft.is_none() => {
            Row::new("memlock", Status::Ok, format!("{value}; moot"), why)
        }
        Ok(()) if soft.is_some_and(|l| needed + MEMLOCK_COMFORT_MARGIN_BYTES > l) => Row::new(
            "memlock",
            Status::Warn,
            format!("{value}; less than 2 MiB to spare"),
            why,
        )
        .fix(fix),
        Ok(()) => Row::new("memlock", Status::Ok, value, why),
    }
}

pub fn check_nofile(limits: &Reading<(Option<u64>, Option<u64>)>) -> Row {
    let why = "every connection, segment file and consume-queue file holds a descriptor; out \
               of them the broker refuses connections (EMFILE) and cannot roll a segment";
    let (soft, hard) = match limits {
        Ok(l) => *l,
        Err(e) => return Row::unknown("open files", e, why),
    };
    let text = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
    let value = format!("soft {}, hard {}", text(soft), text(hard));
    match soft {
        Some(s) if s < NOFILE_WARN_BELOW => {
            let fix = match hard {
                Some(h) if h < NOFILE_WARN_BELOW => {
                    "raise the hard limit (systemd LimitNOFILE=1048576, /etc/security/limits.conf)"
                        .to_string()
                }
                Some(h) => format!(
                    "ulimit -n {h} before starting (up to the hard limit needs no privilege)"
                ),
                None => "ulimit -n 1048576 before starting".to_string(),
            };
            Row::new(
                "open files",
                Status::Warn,
                format!("{value}; below {NOFILE_WARN_BELOW}"),
                why,
            )
            .fix(fix)
        }
        _ => Row::new("open files", Status::Ok, value, why),
    }
}

pub fn check_file_system(
    mount: &Reading<Mount>,
    memory_fs: bool,
    allow_non_direct_io: bool,
) -> Row {
    let why = "the log is written with O_DIRECT and made durable with fdatasync; ext4 is what \
               RingMQ is measured on, xfs behaves alike; in memory nothing survives a crash";
    let value = match mount {
        Ok(m) => format!(
            "{} on {}, mounted at {}",
            m.fs_type,
            m.source,
            m.mount_point.display()
        ),
        Err(e) if memory_fs => format!("in memory ({e})"),
        Err(e) => return Row::unknown("data dir file system", e, why),
    };
    let fs_type = mount.as_ref().map(|m| m.fs_type.as_str()).unwrap_or("");
    if memory_fs {
        let status = if allow_non_direct_io {
            Status::Warn
        } else {
            Status::Fail
        };
        return Row::new("data dir file system", status, value, why).fix(
            "use a directory on a disk (--data-dir), or accept the risk with --allow-non-direct-io",
        );
    }
    match fs_type {
        "ext4" | "xfs" => Row::new("data dir file system", Status::Ok, value, why),
        _ => Row::new(
            "data dir file system",
            Status::Warn,
            format!("{value}; not measured with RingMQ"),
            why,
        )
        .fix("prefer ext4 or xfs on a local disk (network, overlay and copy-on-write file systems differ in O_DIRECT and fdatasync)"),
    }
}

pub fn check_direct_io(
    probe: &Result<bool, PreflightError>,
    memory_fs: bool,
    allow_non_direct_io: bool,
    data_dir: &Path,
) -> Row {
    let why = "acks under SYNC_FLUSH mean the bytes are on the device; that needs O_DIRECT \
               writes on a disk-backed file system (the broker's start-up probe, run here)";
    match probe {
        Ok(true) => Row::new(
            "O_DIRECT in data dir",
            Status::Ok,
            format!("a 4 KiB O_DIRECT write in {} works", data_dir.display()),
            why,
        ),
        Ok(false) => {
            let value = if memory_fs {
                "accepted, but the file system is in memory (tmpfs/ramfs)"
            } else {
                "refused by the file system"
            };
            let status = if allow_non_direct_io {
                Status::Warn
            } else {
                Status::Fail
            };
            Row::new("O_DIRECT in data dir", status, value.to_string(), why)
                .fix("use a directory on a disk (--data-dir), or accept the risk with --allow-non-direct-io")
        }
        Err(e) => {
            let fix = if matches!(e, PreflightError::DiskFull { .. }) {
                "free space on that file system"
            } else {
                "make the data dir writable by this user, or pick another --data-dir"
            };
            Row::new("O_DIRECT in data dir", Status::Fail, e.to_string(), why).fix(fix)
        }
    }
}

pub fn check_free_space(
    space: &Reading<FsSpace>,
    fresh_shards: usize,
    shards: usize,
    segment_bytes: u64,
    disk_reject_ratio: f64,
) -> Row {
    let why = "a new shard writes its first segment (segment_bytes of zeros) before it serves \
               and refuses to start without room for it; each shard then keeps a spare segment \
               prepared; above disk_reject_ratio every produce gets DISK_FULL";
    let s = match space {
        Ok(s) => s,
        Err(e) => return Row::unknown("free space", e, why),
    };
    let start_needs = fresh_shards as u64 * (segment_bytes + FRESH_SHARD_EXTRA_BYTES);
    let spares = shards as u64 * segment_bytes;
    let used = s.used_ratio();
    let value = format!(
        "{} free of {} ({:.1} % used, reject above {:.0} %); start needs {} ({} new shard(s) x \
         segment_bytes {})",
        human_bytes(s.available_bytes),
        human_bytes(s.total_bytes),
        used * 100.0,
        disk_reject_ratio * 100.0,
        human_bytes(start_needs),
        fresh_shards,
        human_bytes(segment_bytes)
    );
    let fix = "free space on that file system, or lower segment_bytes (--segment-bytes)";
    if s.available_bytes < start_needs {
        Row::new("free space", Status::Fail, value, why).fix(fix)
    } else if used > disk_reject_ratio {
        Row::new(
            "free space",
            Status::Warn,
            format!("{value}; above disk_reject_ratio: produces get DISK_FULL"),
            why,
        )
        .fix("free space, lower retention_hours, or raise disk_reject_ratio")
    } else if s.available_bytes - start_needs < spares {
        Row::new(
            "free space",
            Status::Warn,
            format!("{value}; no room for a spare segment per shard: rolls will wait"),
            why,
        )
        .fix(fix)
    } else {
        Row::new("free space", Status::Ok, value, why)
    }
}

pub fn check_write_cache(disk: &Reading<Disk>) -> Row {
    let why = "with a volatile (write back) cache every fdatasync is a device flush: p50 ~60 \
               us here, half of a 4 KiB write + fdatasync pair (~125 us); RingMQ pays one per \
               group commit, not per message";
    let d = match disk {
        Ok(d) => d,
        Err(e) => return Row::unknown("disk write cache", e, why),
    };
    match &d.write_cache {
        Ok(v) => Row::new(
            "disk write cache",
            Status::Ok,
            format!("{v} ({})", d.name),
            why,
        ),
        Err(e) => Row::unknown("disk write cache", e, why),
    }
}

pub fn check_fua(disk: &Reading<Disk>) -> Row {
    let why = "without FUA the kernel turns O_DSYNC/FUA writes into write + cache flush, so \
               O_DSYNC gains nothing over fdatasync (measured here: no gain)";
    let d = match disk {
        Ok(d) => d,
        Err(e) => return Row::unknown("disk FUA", e, why),
    };
    match d.fua.as_deref() {
        Ok("0") => Row::new("disk FUA", Status::Ok, format!("0: none ({})", d.name), why),
        Ok(v) => Row::new("disk FUA", Status::Ok, format!("{v} ({})", d.name), why),
        Err(e) => Row::unknown("disk FUA", e, why),
    }
}

/// The active scheduler of a `none [mq-deadline] kyber` line.
pub fn active_scheduler(line: &str) -> &str {
    line.split_whitespace()
        .find_map(|s| s.strip_prefix('[').and_then(|s| s.strip_suffix(']')))
        .unwrap_or(line.trim())
}

pub fn check_scheduler(disk: &Reading<Disk>) -> Row {
    let why = "each shard writes one O_DIRECT stream with fdatasyncs in between; none and \
               mq-deadline pass it through, bfq's per-process idling delays it";
    let d = match disk {
        Ok(d) => d,
        Err(e) => return Row::unknown("I/O scheduler", e, why),
    };
    let line = match &d.scheduler {
        Ok(l) => l,
        Err(e) => return Row::unknown("I/O scheduler", e, why),
    };
    let active = active_scheduler(line);
    let value = format!(
        "{active} ({}; of: {})",
        d.name,
        line.replace(['[', ']'], "")
    );
    match active {
        "bfq" | "cfq" => Row::new("I/O scheduler", Status::Warn, value, why).fix(format!(
            "echo mq-deadline > /sys/block/{}/queue/scheduler (or none; a udev rule keeps it)",
            d.name
        )),
        _ => Row::new("I/O scheduler", Status::Ok, value, why),
    }
}

pub fn check_cpuidle(idle: &Reading<CpuIdle>, virtual_machine: bool) -> Row {
    let why = "a shard sleeps when idle and is woken per request; here a wake-up across vCPUs \
               costs 60-78 us for a 64-byte round trip vs 5-7 us on one vCPU; in a VM, plain \
               HLT idle (driver none) exits to the hypervisor on every sleep";
    let i = match idle {
        Ok(i) => i,
        Err(e) => return Row::unknown("cpuidle", e, why),
    };
    let mut value = format!("driver {}, governor {}", i.driver, i.governor);
    if let Some(ns) = i.guest_halt_poll_ns {
        value.push_str(&format!(", guest_halt_poll_ns {ns}"));
    }
    if virtual_machine && i.driver != "haltpoll" {
        Row::new(
            "cpuidle",
            Status::Warn,
            format!("{value} (virtual machine)"),
            why,
        )
        .fix(
            "boot the guest with cpuidle_haltpoll.force=1 (polls before halting: faster \
             wake-ups for idle CPU time; not measured here)",
        )
    } else {
        Row::new("cpuidle", Status::Ok, value, why)
    }
}

pub fn check_halt_poll(halt_poll_ns: &Option<Reading<u64>>, virtual_machine: bool) -> Row {
    let why = "on a KVM host, halt_poll_ns is how long a halted vCPU is polled before it sleeps: \
               it sets how fast brokers in guests wake up";
    let where_ = if virtual_machine {
        "; this is a guest, so its host's value is what counts (not readable here)"
    } else {
        ""
    };
    match halt_poll_ns {
        None => Row::new(
            "kvm halt_poll_ns",
            Status::Ok,
            format!("kvm not loaded{where_}"),
            why,
        ),
        Some(Err(e)) => Row::unknown("kvm halt_poll_ns", e, why),
        Some(Ok(0)) if !virtual_machine => Row::new(
            "kvm halt_poll_ns",
            Status::Warn,
            "0: polling off".into(),
            why,
        )
        .fix("echo 200000 > /sys/module/kvm/parameters/halt_poll_ns"),
        Some(Ok(ns)) => Row::new(
            "kvm halt_poll_ns",
            Status::Ok,
            format!("{ns} (for VMs this host runs){where_}"),
            why,
        ),
    }
}

pub fn check_governor(governors: &Reading<Vec<String>>, virtual_machine: bool) -> Row {
    let why = "a shard mostly waits for the network and the disk; a governor that clocks down \
               idle cores adds ramp-up time to the first requests after a pause";
    let g = match governors {
        Ok(g) => g,
        Err(e) => return Row::unknown("CPU frequency governor", e, why),
    };
    if g.is_empty() {
        let who = if virtual_machine {
            "the hypervisor"
        } else {
            "the firmware"
        };
        return Row::new(
            "CPU frequency governor",
            Status::Ok,
            format!("no cpufreq driver: {who} decides"),
            why,
        );
    }
    let value = g.join(", ");
    if g.iter().all(|x| x == "performance") {
        Row::new("CPU frequency governor", Status::Ok, value, why)
    } else {
        Row::new("CPU frequency governor", Status::Warn, value, why)
            .fix("cpupower frequency-set -g performance")
    }
}

/// Every row, in the order printed.
pub fn rows(plan: &Plan, host: &Host) -> Vec<Row> {
    let c = &plan.config;
    vec![
        check_config(plan),
        check_kernel(&host.kernel),
        check_io_uring(host.io_uring_disabled, host.root, &host.io_uring_probe),
        check_memlock(
            &host.memlock,
            host.root,
            host.ipc_lock,
            plan.shards,
            c.server.io_memory_bytes,
        ),
        check_nofile(&host.nofile),
        check_file_system(&host.mount, host.memory_fs, c.server.allow_non_direct_io),
        check_direct_io(
            &host.direct_io,
            host.memory_fs,
            c.server.allow_non_direct_io,
            &host.data_dir,
        ),
        check_free_space(
            &host.space,
            host.fresh_shards,
            plan.shards,
            c.storage.segment_bytes,
            c.storage.disk_reject_ratio,
        ),
        check_write_cache(&host.disk),
        check_fua(&host.disk),
        check_scheduler(&host.disk),
        check_cpuidle(&host.cpuidle, host.virtual_machine),
        check_halt_poll(&host.halt_poll_ns, host.virtual_machine),
        check_governor(&host.governors, host.virtual_machine),
    ]
}

/// The table: status, setting and value aligned, then why and what to run under each row.
pub fn render(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.setting.len()).max().unwrap_or(0);
    let mut out = format!("{:<6}  {:<width$}  VALUE\n", "STATUS", "SETTING");
    for r in rows {
        out.push_str(&format!(
            "{:<6}  {:<width$}  {}\n",
            r.status, r.setting, r.value
        ));
        out.push_str(&format!("{:<6}  {:<width$}  why: {}\n", "", "", r.why));
        if let Some(fix) = &r.fix {
            out.push_str(&format!("{:<6}  {:<width$}  run: {fix}\n", "", ""));
        }
    }
    let count = |s| rows.iter().filter(|r| r.status == s).count();
    let fails = count(Status::Fail);
    out.push_str(&format!(
        "{} OK, {} WARN, {} FAIL: {}\n",
        count(Status::Ok),
        count(Status::Warn),
        fails,
        if fails == 0 {
            "a broker with this config would start here"
        } else {
            "a broker with this config would refuse to start (each FAIL above says why)"
        }
    ));
    out
}

/// `ringmq tune --check`: prints the table; an error (non-zero exit) when a row is FAIL.
pub fn tune(args: TuneArgs) -> Result<(), String> {
    debug_assert!(args.check, "clap requires --check");
    let plan = Plan::from_args(args.broker);
    let host = Host::read(&plan);
    println!(
        "ringmq tune --check: data dir {}, config {}",
        plan.config.server.data_dir.display(),
        plan.source
    );
    let rows = rows(&plan, &host);
    print!("{}", render(&rows));
    let fails = rows.iter().filter(|r| r.status == Status::Fail).count();
    if fails == 0 {
        Ok(())
    } else {
        Err(format!(
            "{fails} check(s) FAIL: a broker would refuse to start"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(write_cache: &str, fua: &str, scheduler: &str) -> Reading<Disk> {
        Ok(Disk {
            name: "vda".into(),
            write_cache: Ok(write_cache.into()),
            fua: Ok(fua.into()),
            scheduler: Ok(scheduler.into()),
        })
    }

    fn space(total: u64, avail: u64) -> Reading<FsSpace> {
        Ok(FsSpace {
            total_bytes: total,
            available_bytes: avail,
            used_bytes: total - avail,
        })
    }

    #[test]
    fn kernel_row_fails_below_5_8_and_says_unknown_for_garbage() {
        assert_eq!(check_kernel("6.18.44-fc").status, Status::Ok);
        let old = check_kernel("5.4.0-generic");
        assert_eq!(old.status, Status::Fail);
        assert!(old.fix.is_some());
        let odd = check_kernel("unknown");
        assert_eq!(odd.status, Status::Warn);
        assert!(odd.value.starts_with("unknown ("), "{}", odd.value);
    }

    #[test]
    fn io_uring_row_follows_the_sysctl_and_the_probe() {
        assert_eq!(check_io_uring(Some(0), false, &Ok(())).status, Status::Ok);
        assert_eq!(check_io_uring(None, false, &Ok(())).status, Status::Ok);
        assert_eq!(check_io_uring(Some(1), true, &Ok(())).status, Status::Ok);
        let off = check_io_uring(Some(2), true, &Ok(()));
        assert_eq!(off.status, Status::Fail);
        assert!(off.fix.unwrap().contains("io_uring_disabled=0"));
        let blocked = check_io_uring(Some(0), false, &Err("EPERM".into()));
        assert_eq!(blocked.status, Status::Fail);
        assert!(blocked.why.contains("EPERM"));
    }

    #[test]
    fn memlock_is_moot_for_root_and_fails_like_preflight_without() {
        let eight = Ok((Some(8 << 20), Some(8 << 20)));
        let r = check_memlock(&eight, true, true, 2, 0);
        assert_eq!(r.status, Status::Ok);
        assert!(r.value.ends_with("root, CAP_IPC_LOCK; moot"), "{}", r.value);
        // Root without CAP_IPC_LOCK: starts, but glommio skips its buffer registration.
        let r = check_memlock(&eight, true, false, 2, 0);
        assert_eq!(r.status, Status::Warn);
        assert!(r.fix.unwrap().contains("IPC_LOCK"));
        // Non-root, glommio's default 10 MiB: refused by preflight, so FAIL.
        let r = check_memlock(&eight, false, false, 1, 0);
        assert_eq!(r.status, Status::Fail);
        assert!(r.fix.unwrap().contains("--io-memory-bytes"));
        // 2 x 3 MiB + 1 MiB = 7 MiB: preflight passes, but under 2 MiB spare.
        assert_eq!(
            check_memlock(&eight, false, false, 2, 3 << 20).status,
            Status::Warn
        );
        assert_eq!(
            check_memlock(&eight, false, false, 2, 2 << 20).status,
            Status::Ok
        );
        assert_eq!(
            check_memlock(&Ok((None, None)), false, false, 64, 0).status,
            Status::Ok
        );
        let unread = check_memlock(&Err("getrlimit: EPERM".into()), false, false, 1, 0);
        assert_eq!(unread.status, Status::Warn);
        assert!(unread.value.starts_with("unknown (getrlimit"));
    }

    #[test]
    fn open_file_limit_warns_below_65536_and_never_fails() {
        let r = check_nofile(&Ok((Some(20_000), Some(20_000))));
        assert_eq!(r.status, Status::Warn);
        assert!(r.fix.unwrap().contains("hard limit"));
        let r = check_nofile(&Ok((Some(1024), Some(1 << 20))));
        assert_eq!(r.status, Status::Warn);
        assert!(r.fix.unwrap().contains("ulimit -n 1048576"));
        assert_eq!(check_nofile(&Ok((Some(1 << 20), None))).status, Status::Ok);
        assert_eq!(check_nofile(&Err("x".into())).status, Status::Warn);
    }

    #[test]
    fn memory_file_systems_fail_unless_allowed_and_o_direct_follows_the_probe() {
        let ext4 = Ok(Mount {
            mount_point: "/".into(),
            fs_type: "ext4".into(),
            source: "/dev/vda".into(),
        });
        let tmpfs = Ok(Mount {
            mount_point: "/dev/shm".into(),
            fs_type: "tmpfs".into(),
            source: "tmpfs".into(),
        });
        assert_eq!(check_file_system(&ext4, false, false).status, Status::Ok);
        assert_eq!(check_file_system(&tmpfs, true, false).status, Status::Fail);
        assert_eq!(check_file_system(&tmpfs, true, true).status, Status::Warn);
        let nfs = Ok(Mount {
            fs_type: "nfs4".into(),
            ..ext4.clone().unwrap()
        });
        assert_eq!(check_file_system(&nfs, false, false).status, Status::Warn);

        let d = Path::new("/d");
        assert_eq!(
            check_direct_io(&Ok(true), false, false, d).status,
            Status::Ok
        );
        let shm = check_direct_io(&Ok(false), true, false, d);
        assert_eq!(shm.status, Status::Fail);
        assert!(shm.value.contains("in memory"));
        assert_eq!(
            check_direct_io(&Ok(false), true, true, d).status,
            Status::Warn
        );
        let full = Err(PreflightError::DiskFull {
            path: "/d".into(),
            free_bytes: 0,
        });
        let r = check_direct_io(&full, false, false, d);
        assert_eq!(r.status, Status::Fail);
        assert!(r.value.contains("full") && r.fix.unwrap().contains("free space"));
    }

    #[test]
    fn free_space_fails_only_without_room_for_the_first_segments() {
        const GIB: u64 = 1 << 30;
        // This machine: 33 GiB free of 252, default 1 GiB segments, 2 new shards.
        assert_eq!(
            check_free_space(&space(252 * GIB, 33 * GIB), 2, 2, GIB, 0.9).status,
            Status::Ok
        );
        // 300 MiB file system with 1 GiB segments: the start is refused.
        let r = check_free_space(&space(300 << 20, 260 << 20), 1, 1, GIB, 0.9);
        assert_eq!(r.status, Status::Fail);
        assert!(r.fix.unwrap().contains("--segment-bytes"));
        // Same disk, but the shard's segments exist already: it starts.
        assert_ne!(
            check_free_space(&space(300 << 20, 260 << 20), 0, 1, GIB, 0.9).status,
            Status::Fail
        );
        // 95 % used: starts, but produces are refused.
        let r = check_free_space(&space(100 * GIB, 5 * GIB), 0, 1, 64 << 20, 0.9);
        assert_eq!(r.status, Status::Warn);
        assert!(r.value.contains("DISK_FULL"), "{}", r.value);
        // Room for the first segment but not for its spare.
        let r = check_free_space(&space(100 * GIB, GIB + (GIB / 2)), 1, 1, GIB, 1.0);
        assert_eq!(r.status, Status::Warn);
        assert!(r.value.contains("spare"), "{}", r.value);
        assert_eq!(
            check_free_space(&Err("statvfs: ENOENT".into()), 1, 1, GIB, 0.9).status,
            Status::Warn
        );
    }

    #[test]
    fn disk_rows_read_cache_fua_and_scheduler_and_say_unknown_without_sysfs() {
        let d = disk("write back", "0", "none [mq-deadline] kyber bfq");
        assert_eq!(check_write_cache(&d).status, Status::Ok);
        assert!(check_write_cache(&d).value.starts_with("write back (vda)"));
        assert!(check_fua(&d).value.starts_with("0: none"));
        let s = check_scheduler(&d);
        assert_eq!(s.status, Status::Ok);
        assert!(s.value.starts_with("mq-deadline (vda"), "{}", s.value);
        let bfq = check_scheduler(&disk("write back", "0", "mq-deadline [bfq] none"));
        assert_eq!(bfq.status, Status::Warn);
        assert!(bfq.fix.unwrap().contains("/sys/block/vda/queue/scheduler"));
        assert_eq!(active_scheduler("none"), "none");

        let none: Reading<Disk> = Err("tmpfs is not on a block device".into());
        for r in [
            check_write_cache(&none),
            check_fua(&none),
            check_scheduler(&none),
        ] {
            assert_eq!(r.status, Status::Warn);
            assert_eq!(r.value, "unknown (tmpfs is not on a block device)");
        }
        let partial = Ok(Disk {
            fua: Err("cannot read /sys/block/vda/queue/fua: No such file".into()),
            ..disk("write through", "0", "none").unwrap()
        });
        assert!(check_fua(&partial)
            .value
            .starts_with("unknown (cannot read"));
    }

    #[test]
    fn cpu_rows_warn_on_idle_and_frequency_settings_that_slow_wake_ups() {
        let idle = |driver: &str| {
            Ok(CpuIdle {
                driver: driver.into(),
                governor: "menu".into(),
                guest_halt_poll_ns: None,
            })
        };
        assert_eq!(check_cpuidle(&idle("none"), true).status, Status::Warn);
        assert_eq!(check_cpuidle(&idle("haltpoll"), true).status, Status::Ok);
        assert_eq!(check_cpuidle(&idle("intel_idle"), false).status, Status::Ok);
        assert_eq!(
            check_cpuidle(&Err("no cpuidle".into()), false).status,
            Status::Warn
        );

        assert_eq!(check_halt_poll(&None, false).status, Status::Ok);
        assert_eq!(check_halt_poll(&Some(Ok(200_000)), true).status, Status::Ok);
        assert_eq!(check_halt_poll(&Some(Ok(0)), false).status, Status::Warn);

        assert_eq!(check_governor(&Ok(vec![]), true).status, Status::Ok);
        assert_eq!(
            check_governor(&Ok(vec!["performance".into()]), false).status,
            Status::Ok
        );
        let mixed = check_governor(&Ok(vec!["performance".into(), "powersave".into()]), false);
        assert_eq!(mixed.status, Status::Warn);
        assert!(mixed.fix.unwrap().contains("cpupower"));
    }

    #[test]
    fn the_mount_is_the_longest_matching_mount_point() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /dev/shm rw,nosuid shared:2 - tmpfs tmpfs rw
31 22 7:0 / /mnt/with\\040space rw - ext4 /dev/loop0 rw
32 22 0:26 / /dev/shm rw - ramfs none rw
";
        let m = mount_of(info, Path::new("/work/main/target")).unwrap();
        assert_eq!(
            (m.fs_type.as_str(), m.source.as_str()),
            ("ext4", "/dev/vda")
        );
        let m = mount_of(info, Path::new("/dev/shm/x")).unwrap();
        assert_eq!(
            m.fs_type, "ramfs",
            "the later mount over the same point wins"
        );
        let m = mount_of(info, Path::new("/mnt/with space/d")).unwrap();
        assert_eq!(m.source, "/dev/loop0");
        assert!(mount_of("", Path::new("/")).is_none());
        assert!(mount_of("garbage line\n", Path::new("/")).is_none());
    }

    #[test]
    fn dev_numbers_split_like_the_kernel() {
        assert_eq!(dev_major_minor(0xfe00), (254, 0));
        assert_eq!(dev_major_minor(0x0801), (8, 1));
        assert_eq!(dev_major_minor(0x1a), (0, 26));
    }

    #[test]
    fn the_table_counts_and_says_whether_a_broker_would_start() {
        let ok = Row::new("a", Status::Ok, "1".into(), "because");
        let fail = Row::new("bb", Status::Fail, "2".into(), "since").fix("do it");
        let t = render(std::slice::from_ref(&ok));
        assert!(
            t.contains("OK      a  1\n") && t.ends_with("would start here\n"),
            "{t}"
        );
        let t = render(&[ok, fail]);
        assert!(
            t.contains("run: do it") && t.contains("1 OK, 0 WARN, 1 FAIL"),
            "{t}"
        );
        assert!(t.contains("refuse to start"), "{t}");
        assert_eq!(human_bytes(8 << 20), "8.0 MiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(human_bytes(512), "512 B");
    }
}
