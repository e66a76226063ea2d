//! The slave of a replication mode: a separate `ringmq-bench serve-broker` process, in its own
//! network namespace when this process may make one, else on loopback.
//!
//! ```text
//!   root namespace (the bench)                    namespace rqbench-<pid>-<n>
//!   master (embedded)  127.78.<k>.1 on rqb<pid>-<n> <== veth ==> rq0 127.78.<k>.2  slave process
//! ```
//!
//! Contracts:
//! - The slave is this same executable (`std::env::current_exe()`) running the hidden
//!   `serve-broker --config FILE` subcommand, which prints `shard N listening on ADDR` on
//!   stderr like `ringmq broker`. In a namespace it runs under `ip netns exec`, which execs in
//!   place (checked: the child's `/proc/<pid>/comm` is this executable's), so the child's pid
//!   is the broker's and signals reach it directly.
//! - The slave runs in its own process group: a terminal's Ctrl-C reaches only the bench, which
//!   then stops the slave itself. Should the bench die without doing so (a second Ctrl-C, a
//!   SIGKILL), the kernel sends the slave SIGTERM (`PR_SET_PDEATHSIG`), and the next run
//!   deletes namespaces whose creating process is gone.
//! - [`SlaveProcess`] is stopped by pid, SIGTERM then SIGKILL after [`SLAVE_STOP_TIMEOUT`],
//!   explicitly or on drop (error paths). Dropping a [`Netns`] deletes the namespace, and with
//!   it the veth pair.
//! - Reachability is proven with RingMQ requests (a ping of the slave, the master's BrokerStats
//!   showing the link streaming), never with a bare TCP connect: on the project's VMs the root
//!   namespace hands connections to unknown addresses to a proxy that accepts them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use ringmq::client::Admin;
use ringmq::config::Config;
use ringmq::protocol::ReplicaStats;
use serde::{Deserialize, Serialize};

use crate::netns_cmd::{self, ip, sysctl};
use crate::workload::SlaveNet;

/// Prefix of the namespaces (and, shortened, the root-side veth ends) this module makes.
const NETNS_PREFIX: &str = "rqbench";
/// The veth end's name inside the namespace (the namespace has no other links but lo).
const NS_VETH: &str = "rq0";
/// How long the slave may take to print its addresses (glommio start, segment preparation).
const SLAVE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the slave may take, once listening, to answer a ping and stream from the master.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stop waits after SIGTERM before SIGKILL. The broker drains connections for up
/// to 10 s; the bench has closed its own by then, so a clean stop takes well under a second.
pub const SLAVE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Stderr lines kept for diagnostics.
const STDERR_TAIL_LINES: usize = 100;
/// Attempts at fresh namespace names before giving up.
const CREATE_ATTEMPTS: u32 = 64;

static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

/// `serve-broker`: run a broker from a config file until SIGINT/SIGTERM.
#[derive(Args)]
pub struct ServeArgs {
    /// TOML config (as written by `Config::to_toml`).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Join a broker group on etcd at these client endpoints (`HOST:PORT,...`; the failover
    /// drill's brokers), as `ringmq broker --cluster etcd=...` does.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub etcd: Option<String>,
    #[arg(long, default_value = "ringmq")]
    pub cluster_name: String,
    #[arg(long, default_value = "g")]
    pub group: String,
    #[arg(long, default_value = "n")]
    pub node: String,
    #[arg(long, default_value_t = 3)]
    pub lease_ttl_secs: u64,
}

/// The hidden `serve-broker` subcommand: the slave process of a replication mode. Prints one
/// `shard N listening on ADDR` line per shard on stderr once serving, as `ringmq broker` does.
pub fn serve(args: ServeArgs) -> Result<(), String> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let config = Config::from_file(&args.config).map_err(|e| e.to_string())?;
    let Some(etcd) = &args.etcd else {
        return ringmq::server::run_until_signalled(config);
    };
    let cluster = ringmq::cluster::ClusterConfig {
        endpoints: ringmq::cluster::etcd::Etcd::parse_endpoints(etcd),
        cluster: args.cluster_name.clone(),
        group: args.group.clone(),
        node: args.node.clone(),
        lease_ttl: Duration::from_secs(args.lease_ttl_secs),
        // `ringmq broker`'s defaults.
        in_sync_lag_bytes: 4 << 20,
        in_sync_max_ms: 5000,
        allow_unclean_election: false,
    };
    ringmq::cluster::run_until_signalled(config, cluster).map_err(|e| e.to_string())
}

/// A network namespace joined to the root namespace by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    root_veth: String,
    /// The root side's address (the master listens here) and the namespace side's.
    root_addr: String,
    ns_addr: String,
}

impl Netns {
    /// Why this process cannot make namespaces, if it cannot.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not running as root".into());
        }
        if ip(&["-V"]).is_err() {
            return Some("`ip` (iproute2) is not installed".into());
        }
        None
    }

    pub fn create() -> Result<Netns, String> {
        if let Some(why) = Self::unavailable() {
            return Err(format!("cannot make a network namespace: {why}"));
        }
        remove_stale_namespaces();
        let pid = std::process::id();
        for _ in 0..CREATE_ATTEMPTS {
            let n = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
            let name = format!("{NETNS_PREFIX}-{pid}-{n}");
            match ip(&["netns", "add", &name]) {
                Ok(()) => {}
                // A leftover of an earlier process with our pid: take the next n.
                Err(e) if e.contains("File exists") => continue,
                Err(e) => return Err(e),
            }
            let subnet = match free_subnet(pid.wrapping_add(n)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ip(&["netns", "delete", &name]);
                    return Err(e);
                }
            };
            // From here on Drop cleans up if a step fails. At most 15 bytes (IFNAMSIZ - 1).
            let ns = Netns {
                root_veth: format!("rqb{pid}-{n}"),
                root_addr: format!("127.78.{subnet}.1"),
                ns_addr: format!("127.78.{subnet}.2"),
                name,
            };
            ns.wire()?;
            return Ok(ns);
        }
        Err(format!(
            "no free namespace name after {CREATE_ATTEMPTS} attempts (see `ip netns list`)"
        ))
    }

    fn wire(&self) -> Result<(), String> {
        #[rustfmt::skip]
        ip(&[
            "link", "add", &self.root_veth, "type", "veth",
            "peer", "name", NS_VETH, "netns", &self.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.root_addr),
            "dev",
            &self.root_veth,
        ])?;
        ip(&["link", "set", &self.root_veth, "up"])?;
        // Loopback-range addresses leave a host only where route_localnet allows it. In the
        // root namespace only on our veth (`all` would change the whole machine); the /24 route
        // via the veth is longer than lo's 127.0.0.0/8, so it wins.
        sysctl(
            None,
            &format!("net.ipv4.conf.{}.route_localnet=1", self.root_veth),
        )?;
        let ns = &self.name;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", self.ns_addr),
            "dev",
            NS_VETH,
        ])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // lo keeps 127.0.0.1 alone: with its usual /8, a down veth would turn the peer's
        // address into a local one (connection refused / reset instead of unreachable).
        ip(&["-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo"])?;
        ip(&["-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo"])?;
        sysctl(Some(ns), "net.ipv4.conf.all.route_localnet=1")?;
        sysctl(
            Some(ns),
            &format!("net.ipv4.conf.{NS_VETH}.route_localnet=1"),
        )?;
        ip(&["-n", ns, "link", "set", NS_VETH, "up"])
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the namespace's veth end down (`up == false`: a partition between the two hosts:
    /// the root side loses its carrier and drops what it sends, the namespace loses its routes)
    /// or up again (the kernel restores the addresses' routes).
    pub fn set_link_up(&self, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.name, "link", "set", NS_VETH, state])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and the root end goes with it; the
        // explicit delete covers a namespace some stray process still holds open.
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("warning: {e}");
        }
        let _ = ip(&["link", "delete", &self.root_veth]);
    }
}

/// A /24 of 127.78.0.0/16 that no address of the root namespace is in, starting from `seed`.
fn free_subnet(seed: u32) -> Result<u32, String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    (0..254)
        .map(|i| (seed + i) % 254 + 1)
        .find(|k| !text.contains(&format!(" 127.78.{k}.")))
        .ok_or_else(|| "every 127.78.<k>.0/24 is in use in this namespace".to_string())
}

/// Deletes namespaces made by this module (`rqbench-<pid>-<n>`) whose creating process is
/// gone (a bench killed from outside never ran Drop).
fn remove_stale_namespaces() {
    netns_cmd::remove_stale_namespaces(|name| {
        let parts: Vec<&str> = name.split('-').collect();
        let ours = parts.len() == 3 && parts[0] == NETNS_PREFIX && parts[2].parse::<u32>().is_ok();
        ours.then(|| parts[1].parse().ok()).flatten()
    });
}

/// Where the slave runs and which addresses the two brokers listen on.
#[derive(Debug)]
pub enum SlaveHost {
    Loopback,
    Netns(Netns),
}

impl SlaveHost {
    /// `auto`: a namespace if one can be made (else loopback, with a note why); `netns`: a
    /// namespace or an error; `loopback`: loopback.
    pub fn choose(want: SlaveNet) -> Result<SlaveHost, String> {
        match want {
            SlaveNet::Loopback => Ok(SlaveHost::Loopback),
            SlaveNet::Netns => Netns::create().map(SlaveHost::Netns),
            SlaveNet::Auto => {
                if Netns::unavailable().is_some() {
                    return Ok(SlaveHost::Loopback);
                }
                match Netns::create() {
                    Ok(ns) => Ok(SlaveHost::Netns(ns)),
                    Err(e) => {
                        eprintln!("note: {e}; the slave runs on loopback instead");
                        Ok(SlaveHost::Loopback)
                    }
                }
            }
        }
    }

    /// The address the master listens on (and advertises): reachable from the slave.
    pub fn master_host(&self) -> &str {
        match self {
            SlaveHost::Loopback => "127.0.0.1",
            SlaveHost::Netns(ns) => &ns.root_addr,
        }
    }

    pub fn slave_host(&self) -> &str {
        match self {
            SlaveHost::Loopback => "127.0.0.1",
            SlaveHost::Netns(ns) => &ns.ns_addr,
        }
    }

    pub fn netns(&self) -> Option<&str> {
        match self {
            SlaveHost::Loopback => None,
            SlaveHost::Netns(ns) => Some(ns.name()),
        }
    }
}

/// The slave as the report describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaveInfo {
    /// `netns` or `loopback`.
    pub net: String,
    /// The network namespace the slave ran in (deleted after the run).
    pub netns: Option<String>,
    /// The slave process's pid (gone after the run).
    pub pid: u32,
    /// Shard 0 of the slave, and the master address it followed.
    pub address: String,
    pub master_address: String,
    /// The slave's temporary data dir (removed after the run).
    pub data_dir: String,
}

impl SlaveInfo {
    /// One line: `separate process (pid 123) in network namespace rqbench-1-0, 127.78.1.2:40000
    /// following 127.78.1.1:40001`.
    pub fn describe(&self) -> String {
        let place = match &self.netns {
            Some(ns) => format!("in network namespace {ns}"),
            None => "on loopback".to_string(),
        };
        format!(
            "separate process (pid {}) {place}, {} following {}",
            self.pid, self.address, self.master_address
        )
    }
}

/// A running slave process; stopped (SIGTERM, then SIGKILL) by [`SlaveProcess::stop`] or on
/// drop.
pub struct SlaveProcess {
    /// The broker's pid (also once it has been reaped, for messages).
    pid: u32,
    child: Option<Child>,
    addrs: Vec<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Reads the slave's stderr until it closes (when the slave exits).
    reader: Option<JoinHandle<()>>,
}

impl SlaveProcess {
    /// Starts `serve-broker --config config` (inside `host`'s namespace if it has one),
    /// confined to `cores` (all of the process, so its shards take exactly these cores), and
    /// waits for its addresses.
    pub fn spawn(config: &Path, host: &SlaveHost, cores: &[usize]) -> Result<SlaveProcess, String> {
        Self::spawn_with(config, &[], host, cores)
    }

    /// [`SlaveProcess::spawn`] with more `serve-broker` flags (`extra`: the cluster's).
    pub fn spawn_with(
        config: &Path,
        extra: &[String],
        host: &SlaveHost,
        cores: &[usize],
    ) -> Result<SlaveProcess, String> {
        // SAFETY: the set is zeroed, then filled with indices checked against CPU_SETSIZE.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cores {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(format!("core {c} is out of range"));
            }
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        let confine = !cores.is_empty();
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let mut cmd = match host.netns() {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("serve-broker")
            .arg("--config")
            .arg(config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Ctrl-C in a terminal goes to the foreground process group: not to the slave,
            // which the bench stops itself once the load has stopped.
            .process_group(0);
        // SAFETY: prctl and sched_setaffinity are async-signal-safe system calls that only
        // read `set`, a copy owned by the closure. The death signal survives the exec of `ip`
        // and of the broker (neither is set-uid); it is tied to the spawning thread, which is
        // the bench's main thread. The affinity is inherited across both execs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let size = std::mem::size_of::<libc::cpu_set_t>();
                if confine && libc::sched_setaffinity(0, size, &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the slave ({}): {e}", exe.display()))?;
        let pid = child.id();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
        let (tx, rx) = mpsc::channel::<String>();
        let pipe = child.stderr.take().expect("stderr is piped");
        let keep = tail.clone();
        let reader = std::thread::Builder::new()
            .name("bench-slave-stderr".into())
            .spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    {
                        let mut t = keep.lock().unwrap_or_else(|p| p.into_inner());
                        if t.len() == STDERR_TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line.clone());
                    }
                    // After start-up nobody receives: warnings then go to our stderr.
                    if tx.send(line.clone()).is_err()
                        && (line.contains(" WARN ") || line.contains(" ERROR "))
                    {
                        eprintln!("[slave {pid}] {line}");
                    }
                }
            })
            .map_err(|e| format!("cannot spawn a thread: {e}"))?;
        let mut slave = SlaveProcess {
            pid,
            child: Some(child),
            addrs: Vec::new(),
            tail,
            reader: Some(reader),
        };
        let deadline = Instant::now() + SLAVE_START_TIMEOUT;
        while slave.addrs.is_empty() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(addr) = line
                        .strip_prefix("shard ")
                        .and_then(|l| l.split(" listening on ").nth(1))
                    {
                        slave.addrs.push(addr.trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(slave.failure(&format!(
                        "printed no address within {SLAVE_START_TIMEOUT:?}"
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = slave.reap();
                    return Err(slave.failure(&format!("exited ({status}) before serving")));
                }
            }
        }
        drop(rx);
        // Under `ip netns exec` the pid must be the broker's, or signals would miss it.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let ours: String = exe
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect())
            .unwrap_or_default();
        if comm.trim() != ours {
            return Err(slave.failure(&format!(
                "has pid {pid}, which runs {:?}, not {ours:?}: `ip netns exec` forked instead of \
                 exec'ing",
                comm.trim()
            )));
        }
        Ok(slave)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Shard 0's address.
    pub fn address(&self) -> &str {
        &self.addrs[0]
    }

    /// The last lines the slave wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|l| format!("  {l}\n")).collect()
    }

    fn failure(&mut self, what: &str) -> String {
        let pid = self.pid;
        let _ = self.stop_inner();
        // The slave is gone, so its stderr is closed: the tail is complete once the reader ends.
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        format!(
            "the slave process {pid} {what}; its stderr:\n{}",
            self.stderr_tail()
        )
    }

    fn reap(&mut self) -> String {
        match self.child.take().map(|mut c| c.wait()) {
            Some(Ok(s)) => s.to_string(),
            Some(Err(e)) => e.to_string(),
            None => "already reaped".into(),
        }
    }

    /// Waits until the slave answers a ping from here and every shard of the master at
    /// `master` streams to it (BrokerStats `replication.link == 2`).
    pub fn wait_streaming(
        &mut self,
        master: &str,
        interrupted: fn() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        let slave_addr = self.address().to_string();
        let mut last = String::from("nothing tried yet");
        let mut pinged = false;
        while Instant::now() < deadline {
            if interrupted() {
                return Err("interrupted while waiting for the slave".into());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(self.failure(&format!("exited ({status}) while starting to follow")));
            }
            if !pinged {
                match Admin::connect(&slave_addr).and_then(|a| a.ping()) {
                    Ok(_) => pinged = true,
                    Err(e) => last = format!("ping of the slave at {slave_addr}: {e}"),
                }
            }
            if pinged {
                match Admin::connect(master).and_then(|a| a.broker_stats()) {
                    Ok(s)
                        if !s.is_empty()
                            && s.iter()
                                .all(|s| s.replication.link == ReplicaStats::LINK_STREAMING) =>
                    {
                        return Ok(());
                    }
                    Ok(s) => {
                        let links: Vec<&str> =
                            s.iter().map(|s| s.replication.link_name()).collect();
                        last = format!("the master's links: {links:?}");
                    }
                    Err(e) => last = format!("stats of the master at {master}: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(self.failure(&format!(
            "did not stream from the master {master} within {STREAMING_TIMEOUT:?} (last: {last})"
        )))
    }

    /// SIGTERM, then SIGKILL after [`SLAVE_STOP_TIMEOUT`]; reaps the process, so its pid is
    /// gone on return. Returns how it exited.
    pub fn stop(mut self) -> Result<ExitStatus, String> {
        self.stop_inner()
    }

    /// SIGKILL at once (the crash drills); reaps the process, so its pid is gone on return.
    pub fn kill9(mut self) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("already stopped".into());
        };
        signal(child.id(), libc::SIGKILL);
        child
            .wait()
            .map_err(|e| format!("waiting for the killed broker {}: {e}", self.pid))
    }

    fn stop_inner(&mut self) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("already stopped".into());
        };
        let pid = child.id();
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + SLAVE_STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("waiting for the slave {pid}: {e}")),
            }
        }
        eprintln!("warning: the slave {pid} ignored SIGTERM for {SLAVE_STOP_TIMEOUT:?}; SIGKILL");
        signal(pid, libc::SIGKILL);
        child
            .wait()
            .map_err(|e| format!("waiting for the slave {pid}: {e}"))
    }
}

impl Drop for SlaveProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_inner();
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so it cannot
    // have been reused by another process.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}
