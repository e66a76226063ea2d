//! Two hosts on one machine: a pair of network namespaces joined by a veth pair, and broker
//! processes started inside them. For replication tests (master on one host, slave on the
//! other) and partitions.
//!
//! ```text
//!   netns rq-<pid>-<n>-a                      netns rq-<pid>-<n>-b
//!   lo, rq0 127.77.<s>.1/24  <==== veth ====>  rq0 127.77.<s>.2/24, lo
//! ```
//!
//! Or N hosts on one switch ([`Hosts`]): a namespace per host, each joined by a veth pair to
//! a bridge in a hub namespace that has no address of its own, for drills with many brokers
//! (and etcd and the clients on a host of their own), where one host's cable can be pulled.
//!
//! ```text
//!   rq-<pid>-<n>-h0  rq0 127.77.<s>.1/24 <== veth ==> h0 ┐
//!   rq-<pid>-<n>-h1  rq0 127.77.<s>.2/24 <== veth ==> h1 ├ bridge rqbr0 in rq-<pid>-<n>-hub
//!   ...                                                  │
//!   rq-<pid>-<n>-hK  rq0 127.77.<s>.K+1/24 <= veth ==> hK ┘
//! ```
//!
//! Only loopback-range addresses: 127.77.<s>.x on the veth ends, `route_localnet=1` in every
//! host namespace (else the kernel drops 127/8 packets on a non-loopback device), and lo holds
//! 127.0.0.1/32 instead of its usual /8 (else a down link would turn the other host's address
//! into a local one, and a partition would answer "connection refused" instead of silence).
//!
//! Usage:
//! ```ignore
//! let Some(net) = TwoHosts::create() else { return }; // prints SKIP when not root
//! let dir = common::data_dir();
//! let master = NsBroker::start(net.ns_a(), net.addr_a(), dir.path(), &[]);
//! let addr = master.addr().to_string();
//! let admin = in_ns(net.ns_b(), move || Admin::connect(&addr).unwrap());
//! admin.ping().unwrap(); // the socket lives in ns b, used from the test thread
//! net.link_down(); /* partitioned */ net.link_up(); /* healed */
//! ```
//!
//! Contracts:
//! - Each host has its own port space, so every broker listens on [`BROKER_PORT`].
//! - The test process stays in the root namespace. Reach a broker only through [`in_ns`]:
//!   on the project's VMs the root namespace routes every unknown address to a transparent
//!   proxy that *accepts* any TCP connection (and answers HTTP 400), so a client there does
//!   not get "connection refused" but a peer that speaks the wrong protocol.
//! - Dropping a [`TwoHosts`] deletes both namespaces (and so the veth); it kills nothing.
//!   Dropping a [`Hosts`] deletes every host's namespace and the hub's, likewise.
//!   Dropping an [`NsBroker`] that still runs kills it with SIGKILL, so a failing test never
//!   leaves a broker behind, and prints its stderr tail if the test is panicking. The order
//!   of the two drops does not matter: a namespace lives on until its last process exits.
//! - A test process killed from outside leaves its namespaces behind; the next
//!   [`TwoHosts::create`] or [`Hosts::create`] deletes those whose creator pid no longer
//!   exists.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

// The bench's slave host runs the same commands: one copy, in the bench crate (std only).
#[path = "../../bench/src/netns_cmd.rs"]
mod netns_cmd;
use netns_cmd::{ip, sysctl, NETNS_DIR};

/// Every broker listens here: each namespace has its own port space. RocketMQ's port.
pub const BROKER_PORT: u16 = 10911;
/// The veth end's name inside both namespaces. The pair is created directly inside the
/// namespaces, so it never exists in the root namespace and cannot clash with other tests.
const VETH: &str = "rq0";
/// How long a broker may take to print its addresses (glommio start, segment preparation).
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before SIGKILL.
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a dead broker's ports may stay bound: io_uring tears a ring down asynchronously,
/// so a listener with an accept in flight can outlive the process by a moment.
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `link_up` waits for the path to carry a TCP handshake again.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Stderr lines an `NsBroker` keeps for diagnostics.
const STDERR_TAIL_LINES: usize = 200;
/// Attempts at fresh namespace names before giving up (names taken by stale leftovers).
const CREATE_ATTEMPTS: u32 = 64;

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);

fn ip_or_panic(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// Why a namespace test cannot run: `SKIP: <why>` on stderr and None, or a panic under
/// `CI=true`.
fn skip<T>(why: &str) -> Option<T> {
    let msg = format!("SKIP: network-namespace tests need root and iproute2 (ip netns): {why}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: a skipped test is a failure)");
    }
    eprintln!("{msg}");
    None
}

/// Why this machine cannot make network namespaces here, if it cannot: not root, or no
/// iproute2 (a namespace operation refused comes later, from `ip netns add`).
fn can_make_namespaces() -> Result<(), &'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root");
    }
    if ip(&["-V"]).is_err() {
        return Err("`ip` (iproute2) is not installed");
    }
    Ok(())
}

/// A host's side of its veth end `VETH` in namespace `ns`: address `addr`/24, loopback up
/// with only 127.0.0.1/32 (so the rest of 127/8 routes out of the veth), and
/// `route_localnet=1` so loopback-range addresses may cross it; then the link up.
fn configure_host(ns: &str, addr: &str) {
    ip_or_panic(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", VETH]);
    ip_or_panic(&["-n", ns, "link", "set", "lo", "up"]);
    ip_or_panic(&["-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo"]);
    ip_or_panic(&["-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo"]);
    sysctl_or_panic(ns, "net.ipv4.conf.all.route_localnet=1");
    sysctl_or_panic(ns, &format!("net.ipv4.conf.{VETH}.route_localnet=1"));
    ip_or_panic(&["-n", ns, "link", "set", VETH, "up"]);
}

/// `sysctl -w setting` inside namespace `ns`.
fn sysctl_or_panic(ns: &str, setting: &str) {
    if let Err(e) = sysctl(Some(ns), setting) {
        panic!("{e}");
    }
}

/// Two network namespaces ("hosts") joined by a veth pair. See the module doc.
pub struct TwoHosts {
    ns_a: String,
    ns_b: String,
    addr_a: String,
    addr_b: String,
}

impl TwoHosts {
    /// Creates the two hosts, or prints `SKIP: <why>` and returns None when this machine
    /// cannot (not root, no iproute2, namespaces not permitted). Under `CI=true` a skip panics
    /// instead: CI runs as root, so a test that cannot run there is a failure, not a pass.
    /// Panics on any other failure.
    pub fn create() -> Option<TwoHosts> {
        if let Err(why) = can_make_namespaces() {
            return skip(why);
        }
        remove_stale_namespaces();
        let pid = std::process::id();
        for _ in 0..CREATE_ATTEMPTS {
            let n = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
            let ns_a = format!("rq-{pid}-{n}-a");
            let ns_b = format!("rq-{pid}-{n}-b");
            match ip(&["netns", "add", &ns_a]) {
                Ok(()) => {}
                // A leftover of an earlier process with our pid: take the next n.
                Err(e) if e.contains("File exists") => continue,
                Err(e) if e.contains("Operation not permitted") => return skip(&e),
                Err(e) => panic!("{e}"),
            }
            if let Err(e) = ip(&["netns", "add", &ns_b]) {
                let _ = ip(&["netns", "delete", &ns_a]);
                if e.contains("File exists") {
                    continue;
                }
                panic!("{e}");
            }
            // The subnet need not be unique (each pair's routes are private to it); a
            // distinct one per pair only keeps logs of parallel tests apart.
            let subnet = pid.wrapping_add(n) % 254 + 1;
            // From here on Drop cleans up if a step panics.
            let hosts = TwoHosts {
                addr_a: format!("127.77.{subnet}.1"),
                addr_b: format!("127.77.{subnet}.2"),
                ns_a,
                ns_b,
            };
            hosts.wire();
            return Some(hosts);
        }
        panic!("no free namespace names after {CREATE_ATTEMPTS} attempts (see `ip netns list`)");
    }

    fn wire(&self) {
        #[rustfmt::skip]
        ip_or_panic(&[
            "link", "add", VETH, "netns", &self.ns_a, "type", "veth",
            "peer", "name", VETH, "netns", &self.ns_b,
        ]);
        for (ns, addr) in [(&self.ns_a, &self.addr_a), (&self.ns_b, &self.addr_b)] {
            configure_host(ns, addr);
        }
        self.wait_until_connected();
    }

    /// Name of host a's namespace (for `in_ns`, `NsBroker::start`, `ip -n`).
    pub fn ns_a(&self) -> &str {
        &self.ns_a
    }

    pub fn ns_b(&self) -> &str {
        &self.ns_b
    }

    /// Host a's IP address, e.g. "127.77.3.1".
    pub fn addr_a(&self) -> &str {
        &self.addr_a
    }

    pub fn addr_b(&self) -> &str {
        &self.addr_b
    }

    /// Partitions the hosts: both veth ends go down. New connects then fail at once on both
    /// sides ("Network is unreachable": the route goes with the link); established TCP
    /// connections stay open but carry nothing (their retransmissions are dropped).
    pub fn link_down(&self) {
        for ns in [&self.ns_a, &self.ns_b] {
            ip_or_panic(&["-n", ns, "link", "set", VETH, "down"]);
        }
    }

    /// Heals a partition and returns once a TCP handshake from b to a gets through.
    /// Established connections resume at their next retransmission (backoff may make that
    /// seconds after a long partition); a new request on an idle connection goes at once.
    pub fn link_up(&self) {
        for ns in [&self.ns_a, &self.ns_b] {
            ip_or_panic(&["-n", ns, "link", "set", VETH, "up"]);
        }
        self.wait_until_connected();
    }

    /// Waits until a connect from b to a port of a gets an answer. "Connection refused" is an
    /// answer: it proves the path both ways without needing a listener.
    fn wait_until_connected(&self) {
        wait_reachable(&self.ns_b, &self.addr_a);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.ns_a, &self.ns_b] {
            // Deleting a namespace deletes its veth end, and the peer goes with it.
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// The bridge inside a [`Hosts`] hub namespace.
const BRIDGE: &str = "rqbr0";
/// Most hosts on one switch: their addresses are .1 to .N of one /24.
const HOSTS_MAX: usize = 250;

/// N hosts on one switch: a network namespace per host, each joined by a veth pair to a
/// bridge in a hub namespace. See the module doc.
pub struct Hosts {
    hub: String,
    hosts: Vec<String>,
    addrs: Vec<String>,
}

impl Hosts {
    /// Creates `n` hosts and the switch, or prints `SKIP: <why>` and returns None when this
    /// machine cannot (as [`TwoHosts::create`]; a panic under `CI=true`). Panics on any other
    /// failure; namespaces made before it are deleted.
    pub fn create(n: usize) -> Option<Hosts> {
        assert!(
            (1..=HOSTS_MAX).contains(&n),
            "{n} hosts: one switch takes 1 to {HOSTS_MAX}"
        );
        if let Err(why) = can_make_namespaces() {
            return skip(why);
        }
        remove_stale_namespaces();
        let pid = std::process::id();
        'names: for _ in 0..CREATE_ATTEMPTS {
            let k = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
            let hub = format!("rq-{pid}-{k}-hub");
            match ip(&["netns", "add", &hub]) {
                Ok(()) => {}
                Err(e) if e.contains("File exists") => continue,
                Err(e) if e.contains("Operation not permitted") => return skip(&e),
                Err(e) => panic!("{e}"),
            }
            let subnet = pid.wrapping_add(k) % 254 + 1;
            // From here on Drop deletes what was made if a step panics.
            let mut hosts = Hosts {
                hub,
                hosts: Vec::with_capacity(n),
                addrs: Vec::with_capacity(n),
            };
            for i in 0..n {
                let ns = format!("rq-{pid}-{k}-h{i}");
                match ip(&["netns", "add", &ns]) {
                    Ok(()) => {}
                    // Dropping `hosts` deletes the hub and the hosts made so far.
                    Err(e) if e.contains("File exists") => continue 'names,
                    Err(e) => panic!("{e}"),
                }
                hosts.hosts.push(ns);
                hosts.addrs.push(format!("127.77.{subnet}.{}", i + 1));
            }
            hosts.wire();
            return Some(hosts);
        }
        panic!("no free namespace names after {CREATE_ATTEMPTS} attempts (see `ip netns list`)");
    }

    fn wire(&self) {
        let hub = self.hub.as_str();
        ip_or_panic(&["-n", hub, "link", "add", BRIDGE, "type", "bridge"]);
        ip_or_panic(&["-n", hub, "link", "set", BRIDGE, "up"]);
        for (i, (ns, addr)) in self.hosts.iter().zip(&self.addrs).enumerate() {
            let port = Self::port(i);
            #[rustfmt::skip]
            ip_or_panic(&[
                "link", "add", VETH, "netns", ns, "type", "veth",
                "peer", "name", &port, "netns", hub,
            ]);
            ip_or_panic(&["-n", hub, "link", "set", &port, "master", BRIDGE]);
            ip_or_panic(&["-n", hub, "link", "set", &port, "up"]);
            configure_host(ns, addr);
        }
        for i in 1..self.hosts.len() {
            self.wait_reachable(0, i);
        }
    }

    /// The switch port (the hub's veth end) of host `i`.
    fn port(i: usize) -> String {
        format!("h{i}")
    }

    /// How many hosts there are.
    pub fn count(&self) -> usize {
        self.hosts.len()
    }

    /// Host `i`'s namespace (for `in_ns`, `NsBroker::start`, `EtcdCluster::start_in`).
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Host `i`'s IP address, e.g. "127.77.3.1" for host 0.
    pub fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    /// The switch's namespace (it holds the bridge and no address).
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// Pulls host `i`'s cable at the switch: its port goes down, so nothing gets to or from
    /// the other hosts (silence, not "refused": packets are dropped, connects time out), while
    /// inside the host its own address still works (a client there keeps its connections to
    /// a broker there; the host's end only loses its carrier).
    pub fn cut(&self, i: usize) {
        ip_or_panic(&["-n", &self.hub, "link", "set", &Self::port(i), "down"]);
    }

    /// Plugs host `i` in again and returns once a TCP handshake between it and another host
    /// gets through (established connections resume at their next retransmission).
    pub fn heal(&self, i: usize) {
        ip_or_panic(&["-n", &self.hub, "link", "set", &Self::port(i), "up"]);
        if let Some(other) = (0..self.hosts.len()).find(|j| *j != i) {
            self.wait_reachable(i, other);
        }
    }

    /// Waits until a connect from host `from` to a port of host `to` gets an answer
    /// ("connection refused" is one: it proves the path both ways without a listener).
    fn wait_reachable(&self, from: usize, to: usize) {
        wait_reachable(&self.hosts[from], &self.addrs[to]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Each host's veth end goes with its namespace, and the hub's peer with it.
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Waits until a connect from namespace `ns` to a port of `addr` gets an answer. "Connection
/// refused" is an answer: it proves the path both ways without needing a listener.
fn wait_reachable(ns: &str, addr: &str) {
    let target: SocketAddr = format!("{addr}:9").parse().expect("an IPv4 address");
    let connected = in_ns(ns, move || {
        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            match TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(last)
    });
    if let Err(e) = connected {
        panic!("{ns} cannot reach {target} within {LINK_UP_TIMEOUT:?}: {e:?}");
    }
}

/// Deletes namespaces named by this harness (`rq-<pid>-<n>-<a|b|hub|h<i>>`) whose creating process
/// is gone (a test binary killed from outside never runs Drop).
fn remove_stale_namespaces() {
    netns_cmd::remove_stale_namespaces(|name| {
        let parts: Vec<&str> = name.split('-').collect();
        let host = |p: &str| {
            p.strip_prefix('h')
                .is_some_and(|i| i.parse::<usize>().is_ok())
        };
        let ours = parts.len() == 4
            && parts[0] == "rq"
            && parts[2].parse::<u32>().is_ok()
            && (parts[3] == "a" || parts[3] == "b" || parts[3] == "hub" || host(parts[3]));
        ours.then(|| parts[1].parse().ok()).flatten()
    });
}

/// Runs `f` inside network namespace `ns` (on a fresh thread that joins it with setns) and
/// returns its result; a panic in `f` is re-raised here.
///
/// Sockets created inside `f` belong to `ns` for their whole life: return a client
/// (`Admin`, `Producer`, `Consumer`, a `TcpStream`) from `f` and use it from any thread
/// afterwards; that is how the test process talks to a broker inside a namespace. Threads
/// spawned inside `f` (such as the client's reader thread) inherit the namespace. The calling
/// thread itself never changes namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("{NETNS_DIR}/{ns}");
    let thread = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let handle = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                panic!("setns({path}): {}", std::io::Error::last_os_error());
            }
            drop(handle);
            f()
        })
        .expect("spawn a thread");
    match thread.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A `ringmq broker` process inside a namespace, listening on `<host_ip>:10911`.
///
/// It runs under `ip netns exec`, which execs the broker in place (checked at start: the
/// child's `/proc/<pid>/comm` is `ringmq`), so [`NsBroker::pid`] is the broker's pid and
/// signals reach it directly.
pub struct NsBroker {
    ns: String,
    child: Option<Child>,
    addrs: Vec<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl NsBroker {
    /// Starts a broker and waits for its addresses; panics with its stderr if it exits or
    /// stays silent for 30 s. `extra_args` go last on its command line.
    pub fn start(ns: &str, host_ip: &str, data_dir: &Path, extra_args: &[&str]) -> NsBroker {
        Self::try_start(ns, host_ip, data_dir, extra_args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, but a broker that fails to start is an `Err` with the reason and its
    /// stderr tail, for tests that expect a refusal.
    pub fn try_start(
        ns: &str,
        host_ip: &str,
        data_dir: &Path,
        extra_args: &[&str],
    ) -> Result<NsBroker, String> {
        Self::try_start_on_cores(ns, host_ip, data_dir, "1", extra_args)
    }

    /// Like `start`, the broker's one shard on `cores` (`--cores`: `1` is core 0, `1,` core
    /// 1 alone), so that the brokers of a many-host test do not all share core 0.
    pub fn start_on_cores(
        ns: &str,
        host_ip: &str,
        data_dir: &Path,
        cores: &str,
        extra_args: &[&str],
    ) -> NsBroker {
        Self::try_start_on_cores(ns, host_ip, data_dir, cores, extra_args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `try_start`, on `cores` (see [`NsBroker::start_on_cores`]).
    pub fn try_start_on_cores(
        ns: &str,
        host_ip: &str,
        data_dir: &Path,
        cores: &str,
        extra_args: &[&str],
    ) -> Result<NsBroker, String> {
        let port = BROKER_PORT.to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ringmq"), "broker"])
            .args(["--listen-host", host_ip, "--port", &port, "--cores", cores])
            .args(["--metrics-listen", "off"])
            .args(["--segment-bytes", "33554432", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot spawn `ip netns exec {ns} ringmq broker`: {e}"))?;
        let stderr = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
        let (tx, rx) = mpsc::channel();
        LIVE_BROKERS.lock().unwrap().push(child.id());
        let pipe = child.stderr.take().expect("stderr is piped");
        let tail = stderr.clone();
        std::thread::Builder::new()
            .name(format!("stderr-{ns}"))
            .spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    {
                        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                        if t.len() == STDERR_TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line.clone());
                    }
                    // Nobody listens after start: the lines only feed the tail then.
                    let _ = tx.send(line);
                }
            })
            .expect("spawn a thread");
        let mut broker = NsBroker {
            ns: ns.to_string(),
            child: Some(child),
            addrs: Vec::new(),
            stderr,
        };
        // The executor logs "starting N shard(s) ..." before main prints one
        // "shard i listening on ADDR" line per shard.
        let mut shards = 1;
        let deadline = Instant::now() + BROKER_START_TIMEOUT;
        while broker.addrs.len() < shards {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(timeout) {
                Ok(line) => {
                    if let Some(n) = line.split("starting ").nth(1) {
                        if let Some(Ok(n)) = n.split(" shard(s)").next().map(str::parse) {
                            shards = n;
                        }
                    }
                    if line.starts_with("shard ") {
                        if let Some(addr) = line.split(" listening on ").nth(1) {
                            broker.addrs.push(addr.trim().to_string());
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(broker.failure(&format!(
                        "printed no address within {BROKER_START_TIMEOUT:?}; killed"
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let child = broker.child.as_mut().expect("running");
                    let status = child.wait().map(|s| s.to_string());
                    broker.child = None;
                    return Err(broker.failure(&format!(
                        "exited ({}) before printing its addresses",
                        status.unwrap_or_else(|e| e.to_string())
                    )));
                }
            }
        }
        let pid = broker.pid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "ringmq" {
            return Err(broker.failure(&format!(
                "has pid {pid}, which is {comm:?}, not ringmq: `ip netns exec` forked instead \
                 of exec'ing, so signals to this pid would miss the broker"
            )));
        }
        Ok(broker)
    }

    /// Kills what is left (Drop) and describes the failure with the stderr tail.
    fn failure(self, what: &str) -> String {
        format!(
            "broker in {} {what}; its stderr:\n{}",
            self.ns,
            self.stderr_tail()
        )
    }

    /// Shard addresses as "ip:port", shard 0 first.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Shard 0's address, e.g. "127.77.3.1:10911".
    pub fn addr(&self) -> &str {
        &self.addrs[0]
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The last 200 lines the broker wrote to stderr (its log).
    pub fn stderr_tail(&self) -> String {
        let t = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|l| format!("{l}\n")).collect()
    }

    /// SIGKILL, then reaps it: on return the pid is gone and its ports are free again, so a
    /// new broker can listen on them at once.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
        self.wait_ports_free();
    }

    /// Returns once every address this broker listened on can be bound again in its
    /// namespace (with SO_REUSEADDR, as the broker binds), or panics after
    /// [`PORT_RELEASE_TIMEOUT`]. Only for a broker that has exited.
    fn wait_ports_free(&self) {
        let addrs: Vec<SocketAddr> = self.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let ns = self.ns.clone();
        let busy = in_ns(&self.ns, move || {
            let deadline = Instant::now() + PORT_RELEASE_TIMEOUT;
            loop {
                // std's bind sets SO_REUSEADDR: only a live listener makes it fail.
                let busy: Vec<String> = addrs
                    .iter()
                    .filter(|a| std::net::TcpListener::bind(a).is_err())
                    .map(|a| a.to_string())
                    .collect();
                if busy.is_empty() || Instant::now() >= deadline {
                    return busy;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        assert!(
            busy.is_empty(),
            "{busy:?} in {ns} still bound {PORT_RELEASE_TIMEOUT:?} after the broker exited"
        );
    }

    /// SIGTERM (a clean shutdown), SIGKILL if it is still running after 15 s; returns how it
    /// exited.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + BROKER_STOP_TIMEOUT;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "broker {} in {} ignored SIGTERM for {BROKER_STOP_TIMEOUT:?}; SIGKILL",
                    child.id(),
                    self.ns
                );
                signal(&child, libc::SIGKILL);
                break child.wait().expect("wait for the broker");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.wait_ports_free();
        status
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so it cannot
    // have been reused by another process.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

/// Pids of the broker processes started by this test binary, for [`kill_all_brokers`].
static LIVE_BROKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Adds a broker process started elsewhere (see [`super::process`]) to those
/// [`kill_all_brokers`] kills.
pub fn track_broker(pid: u32) {
    LIVE_BROKERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(pid);
}

/// SIGKILLs every broker this process started that may still run (a watchdog's last act
/// before aborting a hung test, when no `Drop` will run). A pid already reaped and reused is
/// the remote risk; tests run for seconds, not long enough for pids to wrap.
pub fn kill_all_brokers() {
    for pid in LIVE_BROKERS.lock().map(|v| v.clone()).unwrap_or_default() {
        // SAFETY: kill with a pid of a child we started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

impl Drop for NsBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "broker {} in {} killed; its stderr:\n{}",
                    child.id(),
                    self.ns,
                    self.stderr_tail()
                );
            }
        }
    }
}
