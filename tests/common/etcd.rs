//! Real etcd members on 127.0.0.1 for the cluster tests: [`EtcdCluster::start`] runs `n`
//! `etcd` processes (Debian `etcd-server`) on free client and peer ports, each with its data
//! dir and log file in one temp dir, and returns once every member answers a put and a get.
//! Members can be SIGKILLed and restarted on their data dir; drop kills them all by PID.
//!
//! Without an `etcd` binary `start` prints SKIP and returns None (a panic under `CI=true`).
//! Raft timings are short (50 ms heartbeat, 500 ms election) so a failover takes about a
//! second and a 1 s lease is honoured (etcd's minimum TTL is 1.5 election timeouts).

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringmq::cluster::etcd::Etcd;

/// How long a member may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts with ports that another process took in the meantime fail; try again on new ones.
const START_ATTEMPTS: usize = 3;

/// The timeout of [`EtcdCluster::client`] (per endpoint).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    binary: PathBuf,
    /// The address the members listen on: 127.0.0.1, or a host's address in a namespace.
    host: String,
    /// The network namespace the members run in (`None`: the test's own).
    ns: Option<String>,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tmp: tempfile::TempDir,
}

/// `/usr/bin/etcd`, or `etcd` on PATH.
fn etcd_binary() -> Option<PathBuf> {
    let usr = PathBuf::from("/usr/bin/etcd");
    if usr.is_file() {
        return Some(usr);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// `n` distinct free ports on 127.0.0.1 (held together while chosen, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl EtcdCluster {
    /// `members` etcd processes forming one cluster, every one answering; None (after
    /// printing SKIP) when etcd is not installed. Panics if the cluster does not come up.
    pub fn start(members: usize) -> Option<EtcdCluster> {
        Self::start_on(None, "127.0.0.1", members)
    }

    /// Like [`EtcdCluster::start`], the members inside network namespace `ns` on `host`
    /// (one of [`super::netns::TwoHosts`]'s addresses): the other host reaches them over the
    /// veth, and a partition cuts it off. Reach them from the test with
    /// [`super::netns::in_ns`]. Ports are free in a new namespace, so the first try's are used.
    pub fn start_in(ns: &str, host: &str, members: usize) -> Option<EtcdCluster> {
        Self::start_on(Some(ns), host, members)
    }

    fn start_on(ns: Option<&str>, host: &str, members: usize) -> Option<EtcdCluster> {
        assert!(members > 0, "an etcd cluster has at least one member");
        let Some(binary) = etcd_binary() else {
            let msg = "SKIP: etcd is not installed (apt-get install etcd-server)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg} (CI=true: a skipped test is a failure)");
            }
            eprintln!("{msg}");
            return None;
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&binary, ns, host, members) {
                Ok(cluster) => return Some(cluster),
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "etcd did not start ({START_ATTEMPTS} attempts):\n{}",
            failures.join("\n\n")
        );
    }

    fn try_start(
        binary: &Path,
        ns: Option<&str>,
        host: &str,
        n: usize,
    ) -> Result<EtcdCluster, String> {
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{host}:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let tmp = super::data_dir();
        let token = format!(
            "ringmq-test-{}-{}",
            std::process::id(),
            tmp.path().file_name().unwrap_or_default().to_string_lossy()
        );
        let mut cluster = EtcdCluster {
            binary: binary.to_path_buf(),
            host: host.to_string(),
            ns: ns.map(str::to_string),
            members,
            initial_cluster,
            token,
            tmp,
        };
        for i in 0..n {
            cluster.spawn(i, "new")?;
        }
        for i in 0..n {
            if let Err(e) = cluster.wait_ready(i) {
                let logs = (0..n)
                    .map(|j| cluster.log_tail(j))
                    .collect::<Vec<_>>()
                    .join("\n");
                eprintln!("{e}\n{logs}");
                return Err(e);
            }
        }
        Ok(cluster)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.tmp
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// The last lines member `i` logged, headed by its name.
    pub fn log_tail(&self, i: usize) -> String {
        format!(
            "--- etcd member {} (last lines of {}):\n{}",
            self.members[i].name,
            self.log_path(i).display(),
            tail(&self.log_path(i), 30)
        )
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(|e| format!("open the log of member {i}: {e}"))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("clone a log fd: {e}"))?;
        let m = &self.members[i];
        let client = format!("http://{}:{}", self.host, m.client_port);
        let peer = format!("http://{}:{}", self.host, m.peer_port);
        let data_dir = self.tmp.path().join(format!("{}.etcd", m.name));
        // `ip netns exec` execs etcd in the namespace: the child's pid is etcd's.
        let mut command = match &self.ns {
            None => Command::new(&self.binary),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary);
                c
            }
        };
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.binary.display()))?;
        super::netns::track_broker(child.id());
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until member `i` answers a put and a get on its own endpoint.
    fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let endpoint = self.endpoints()[i].clone();
        let etcd =
            Etcd::new(std::slice::from_ref(&endpoint), Duration::from_secs(1)).expect("endpoint");
        let key = format!("/ringmq-test/ready/{}", self.members[i].name);
        let deadline = Instant::now() + READY_TIMEOUT;
        let etcd = std::sync::Arc::new(etcd);
        loop {
            let ask = {
                let (etcd, key) = (etcd.clone(), key.clone());
                move || etcd.put(&key, b"ready", None).and_then(|_| etcd.get(&key))
            };
            let answer = match &self.ns {
                None => ask(),
                Some(ns) => super::netns::in_ns(ns, ask),
            };
            let last = match answer {
                Ok(Some(kv)) if kv.value == b"ready" => return Ok(()),
                Ok(other) => format!("read back {other:?}"),
                Err(e) => e.to_string(),
            };
            if let Some(child) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.members[i].child = None;
                    return Err(format!(
                        "etcd member {i} ({endpoint}) exited with {status}\n{}",
                        self.log_tail(i)
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd member {i} ({endpoint}) did not answer within {READY_TIMEOUT:?}: \
                     {last}\n{}",
                    self.log_tail(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every member's client endpoint, `127.0.0.1:port`, member 0 first.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}:{}", self.host, m.client_port))
            .collect()
    }

    /// [`EtcdCluster::endpoints`] comma-joined, as `--cluster etcd=...` takes them.
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// A client over every member, [`CLIENT_TIMEOUT`] per endpoint.
    pub fn client(&self) -> Etcd {
        Etcd::new(&self.endpoints(), CLIENT_TIMEOUT).expect("the harness's endpoints")
    }

    /// The index of the member behind `endpoint` (`127.0.0.1:port`).
    pub fn member_at(&self, endpoint: &str) -> usize {
        self.endpoints()
            .iter()
            .position(|e| e == endpoint)
            .unwrap_or_else(|| panic!("{endpoint} is no member of this cluster"))
    }

    /// SIGKILLs member `i` and reaps it (nothing if it is not running).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            // SAFETY: kill with the pid of our own unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir (`--initial-cluster-state existing`) and
    /// waits until it answers; panics if it does not.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        if let Err(e) = self.spawn(i, "existing").and_then(|()| self.wait_ready(i)) {
            panic!("{e}");
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                eprintln!("{}", self.log_tail(i));
            }
        }
    }
}
