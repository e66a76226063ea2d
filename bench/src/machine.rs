//! Facts about the machine for the report, and pinning load threads to cores.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineFacts {
    /// `std::thread::available_parallelism` (what `nproc` says).
    pub cores: usize,
    /// Cores this process may run on (its affinity mask).
    pub allowed_cores: Vec<usize>,
    /// /proc/sys/kernel/osrelease
    pub kernel: String,
    /// File system of the embedded broker's data dir (statfs f_type); None for a remote broker.
    pub data_fs: Option<String>,
}

impl MachineFacts {
    pub fn collect(data_root: Option<&Path>) -> MachineFacts {
        MachineFacts {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            allowed_cores: allowed_cores(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            data_fs: data_root.map(fs_type),
        }
    }
}

/// `git rev-parse HEAD` in the current directory, if git and a repository are there.
pub fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The file system type of `path` by statfs magic number.
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs fills the zeroed struct; `c` is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    let magic = st.f_type as u64;
    match magic {
        0xEF53 => "ext2/ext3/ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        0x6573_5546 => "fuse".into(),
        m => format!("unknown (f_type 0x{m:x})"),
    }
}

/// Cores in this thread's affinity mask.
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Restricts the calling thread (and every thread it spawns later) to `cores`.
pub fn pin_current_thread(cores: &[usize]) -> Result<(), String> {
    if cores.is_empty() {
        return Ok(());
    }
    // SAFETY: the set is zeroed, then filled with valid indices; sched_setaffinity reads it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(format!("core {c} is out of range"));
        }
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(format!(
            "cannot pin to cores {cores:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Parses `1`, `1,2` or `all` into a core list, checked against `allowed`.
pub fn parse_core_list(s: &str, allowed: &[usize]) -> Result<Vec<usize>, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(allowed.to_vec());
    }
    let list = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("--load-cores {s:?} is not `all` or a list like 1,2"))?;
    for c in &list {
        if !allowed.contains(c) {
            return Err(format!(
                "--load-cores: core {c} is not available (available: {allowed:?})"
            ));
        }
    }
    Ok(list)
}

/// How the cores were split between the broker (and its slave) and the load generator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CoreSplit {
    /// Cores running broker shards (None: remote broker, unknown). With a slave: the master's.
    pub broker_cores: Option<Vec<usize>>,
    /// Replication modes: cores of the slave's shards (a separate process).
    #[serde(default)]
    pub slave_cores: Option<Vec<usize>>,
    pub load_cores: Vec<usize>,
    /// Load threads share cores with the broker (the master).
    pub shared: bool,
    /// Load threads share cores with the slave.
    #[serde(default)]
    pub shared_with_slave: bool,
}

impl CoreSplit {
    /// `broker_shards` cores go to an embedded broker (the first ones, as
    /// `CoreSelection::Count` picks them), the load gets the rest or `load_override`.
    pub fn plan(
        allowed: &[usize],
        broker_shards: Option<usize>,
        load_override: Option<&str>,
    ) -> Result<CoreSplit, String> {
        let broker_cores = match broker_shards {
            Some(n) if n > allowed.len() => {
                return Err(format!(
                    "--broker-cores {n}: only {} cores are available ({allowed:?})",
                    allowed.len()
                ))
            }
            Some(n) => Some(allowed[..n].to_vec()),
            None => None,
        };
        let load_cores = match load_override {
            Some(s) => parse_core_list(s, allowed)?,
            None => {
                let rest: Vec<usize> = allowed
                    .iter()
                    .copied()
                    .filter(|c| !matches!(&broker_cores, Some(b) if b.contains(c)))
                    .collect();
                if rest.is_empty() {
                    allowed.to_vec()
                } else {
                    rest
                }
            }
        };
        let shared = broker_cores
            .as_ref()
            .is_some_and(|b| load_cores.iter().any(|c| b.contains(c)));
        Ok(CoreSplit {
            broker_cores,
            slave_cores: None,
            load_cores,
            shared,
            shared_with_slave: false,
        })
    }

    /// A master with `shards` shards on the first cores, its slave (as many shards) on the
    /// cores after them (wrapping around when there are too few, so on 2 cores: master 0,
    /// slave 1), and the load on the cores neither uses, else on those the master leaves,
    /// else on all; or on `load_override`.
    pub fn plan_with_slave(
        allowed: &[usize],
        shards: usize,
        load_override: Option<&str>,
    ) -> Result<CoreSplit, String> {
        if shards == 0 || shards > allowed.len() {
            return Err(format!(
                "--broker-cores {shards}: only {} cores are available ({allowed:?})",
                allowed.len()
            ));
        }
        let master = allowed[..shards].to_vec();
        let slave: Vec<usize> = (0..shards)
            .map(|i| allowed[(shards + i) % allowed.len()])
            .collect();
        let load_cores = match load_override {
            Some(s) => parse_core_list(s, allowed)?,
            None => {
                let free = |skip_slave: bool| -> Vec<usize> {
                    allowed
                        .iter()
                        .copied()
                        .filter(|c| !(master.contains(c) || skip_slave && slave.contains(c)))
                        .collect()
                };
                [free(true), free(false), allowed.to_vec()]
                    .into_iter()
                    .find(|l| !l.is_empty())
                    .expect("allowed is not empty")
            }
        };
        Ok(CoreSplit {
            shared: load_cores.iter().any(|c| master.contains(c)),
            shared_with_slave: load_cores.iter().any(|c| slave.contains(c)),
            broker_cores: Some(master),
            slave_cores: Some(slave),
            load_cores,
        })
    }

    pub fn describe(&self) -> String {
        let mut s = match (&self.broker_cores, &self.slave_cores) {
            (Some(b), None) => format!("broker shards on cores {b:?}"),
            (Some(b), Some(sl)) => {
                let with_master = sl.iter().any(|c| b.contains(c));
                format!(
                    "master shards on cores {b:?}; slave (separate process) on cores {sl:?}{}",
                    if with_master {
                        " (shared with the master)"
                    } else {
                        ""
                    }
                )
            }
            (None, _) => "remote broker".to_string(),
        };
        let shared_with = match (self.shared, self.shared_with_slave, &self.slave_cores) {
            (true, true, _) => " (shared with the master and the slave)",
            (true, false, None) => " (shared with the broker)",
            (true, false, Some(_)) => " (shared with the master)",
            (false, true, _) => " (shared with the slave)",
            (false, false, _) => "",
        };
        let _ = write!(
            s,
            "; load threads on cores {:?}{shared_with}",
            self.load_cores
        );
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stat_line_with_spaces_in_comm_parses() {
        let line = "42 (shard 0) S 1 2 3 4 5 6 7 8 9 10 100 50 0 0";
        assert_eq!(task_ticks(line), Some(("shard 0", 150)));
    }

    use super::*;

    #[test]
    fn split_gives_the_load_the_cores_the_broker_leaves() {
        let s = CoreSplit::plan(&[0, 1], Some(1), None).unwrap();
        assert_eq!(s.broker_cores, Some(vec![0]));
        assert_eq!(s.load_cores, vec![1]);
        assert!(!s.shared);
        let s = CoreSplit::plan(&[0, 1], Some(2), None).unwrap();
        assert_eq!(s.load_cores, vec![0, 1]);
        assert!(s.shared);
        let s = CoreSplit::plan(&[0, 1], None, None).unwrap();
        assert_eq!(s.load_cores, vec![0, 1]);
        assert!(!s.shared);
        assert!(CoreSplit::plan(&[0, 1], Some(3), None).is_err());
        assert!(CoreSplit::plan(&[0, 1], Some(1), Some("7")).is_err());
        assert_eq!(
            CoreSplit::plan(&[0, 1], Some(1), Some("all"))
                .unwrap()
                .load_cores,
            vec![0, 1]
        );
    }

    #[test]
    fn a_slave_gets_the_core_after_the_master() {
        let s = CoreSplit::plan_with_slave(&[0, 1], 1, None).unwrap();
        assert_eq!(s.broker_cores, Some(vec![0]));
        assert_eq!(s.slave_cores, Some(vec![1]));
        assert_eq!(s.load_cores, vec![1]);
        assert!(!s.shared && s.shared_with_slave);
        assert_eq!(
            s.describe(),
            "master shards on cores [0]; slave (separate process) on cores [1]; load threads \
             on cores [1] (shared with the slave)"
        );
        let s = CoreSplit::plan_with_slave(&[0, 1, 2, 3], 1, None).unwrap();
        assert_eq!(s.slave_cores, Some(vec![1]));
        assert_eq!(s.load_cores, vec![2, 3]);
        assert!(!s.shared && !s.shared_with_slave);
        let s = CoreSplit::plan_with_slave(&[0], 1, None).unwrap();
        assert_eq!(s.slave_cores, Some(vec![0]));
        assert!(s.shared && s.shared_with_slave);
        assert!(s.describe().contains("(shared with the master)"));
        assert!(CoreSplit::plan_with_slave(&[0, 1], 3, None).is_err());
    }

    #[test]
    fn facts_are_collected() {
        let f = MachineFacts::collect(Some(Path::new(".")));
        assert!(f.cores >= 1);
        assert!(!f.allowed_cores.is_empty());
        assert!(!f.kernel.is_empty());
        assert!(f.data_fs.is_some());
    }
}

/// CPU seconds of this process split into the broker's shard threads (and their io_uring
/// workers) and the rest (the load threads and the clients' own threads), from
/// `/proc/self/task/*/stat` and getrusage. A worker that exited within the interval is counted
/// as load (its ticks are in the process' total only).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    process_secs: f64,
    broker_secs: f64,
    at: Option<Instant>,
}

/// CPU use over an interval, in % of one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    pub wall_secs: f64,
    /// Everything but the broker's shard threads: load threads and client threads.
    pub load_cpu_secs: f64,
    pub load_cpu_pct: f64,
    /// The broker's shard threads (`shard-N`) and their io_uring workers (`iou-wrk-N`).
    pub broker_cpu_secs: f64,
    pub broker_cpu_pct: f64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a `stat` line, in clock ticks, with its comm.
fn task_ticks(stat: &str) -> Option<(&str, u64)> {
    // comm is in parentheses and may hold spaces; the fields after it are space separated.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = &stat[open + 1..close];
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After comm: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

impl CpuSnapshot {
    pub fn take() -> CpuSnapshot {
        // SAFETY: getrusage fills the zeroed struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let process_secs = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(ru.ru_utime) + tv(ru.ru_stime)
        } else {
            0.0
        };
        let mut broker_ticks = 0u64;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                    continue;
                };
                if let Some((comm, ticks)) = task_ticks(&stat) {
                    // io_uring's workers (`iou-wrk-N`) run the shards' punted I/O (fdatasync);
                    // the clients use no io_uring.
                    if comm.starts_with("shard-") || comm.starts_with("iou-wrk") {
                        broker_ticks += ticks;
                    }
                }
            }
        }
        CpuSnapshot {
            process_secs,
            broker_secs: broker_ticks as f64 / clock_ticks(),
            at: Some(Instant::now()),
        }
    }

    /// From `self` to `later`.
    pub fn until(&self, later: &CpuSnapshot) -> CpuUse {
        let wall_secs = match (self.at, later.at) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let broker = (later.broker_secs - self.broker_secs).max(0.0);
        let load = (later.process_secs - self.process_secs - broker).max(0.0);
        let pct = |s: f64| {
            if wall_secs > 0.0 {
                100.0 * s / wall_secs
            } else {
                0.0
            }
        };
        CpuUse {
            wall_secs,
            load_cpu_secs: load,
            load_cpu_pct: pct(load),
            broker_cpu_secs: broker,
            broker_cpu_pct: pct(broker),
        }
    }
}
