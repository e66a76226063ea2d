//! A `ringmq broker` process on 127.0.0.1 for crash and failover drills: started on free
//! ports over a data dir, ready once every shard printed `shard N listening on ADDR`, killed
//! with SIGKILL on drop (its stderr printed when the test is panicking).
//!
//! Its pid is tracked with the namespace brokers', so [`super::watchdog`] kills it too.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a broker may take to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct BrokerProcess {
    child: Child,
    addrs: Vec<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl BrokerProcess {
    /// `ringmq broker` over `dir` on `cores` (a count, or `N,` for core N alone) with `extra`
    /// flags last; waits until every shard listens.
    pub fn start(dir: &Path, cores: &str, extra: &[&str]) -> BrokerProcess {
        Self::start_with_env(dir, cores, extra, &[])
    }

    /// Like [`BrokerProcess::start`], with `env` added to the broker's environment.
    pub fn start_with_env(
        dir: &Path,
        cores: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BrokerProcess {
        Self::start_on_port(dir, cores, 0, extra, env)
    }

    /// Like [`BrokerProcess::start_with_env`], shard i on `port + i` (0: free ports), for a
    /// client that must know the address before the broker is up.
    pub fn start_on_port(
        dir: &Path,
        cores: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BrokerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringmq"));
        let port = port.to_string();
        command.arg("broker");
        // Off unless asked for: tests run side by side and would all want the default port.
        if !extra.contains(&"--metrics-listen") {
            command.args(["--metrics-listen", "off"]);
        }
        command
            .args(["--port", &port])
            .args(["--segment-bytes", "33554432", "--cores", cores])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent. A
        // drill that aborts the broker on purpose must not leave a core file behind.
        unsafe {
            command.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn broker");
        super::netns::track_broker(child.id());
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("shard ") {
                    if let Some(addr) = line.split(" listening on ").nth(1) {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
                log2.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let shards = match cores.strip_suffix(',') {
            Some(_) => 1,
            None => cores.parse::<usize>().expect("a core count or `N,`"),
        };
        let mut broker = BrokerProcess {
            child,
            addrs: Vec::new(),
            log,
        };
        while broker.addrs.len() < shards {
            match rx.recv_timeout(START_TIMEOUT) {
                Ok(a) => broker.addrs.push(a),
                Err(e) => {
                    broker.sigkill();
                    panic!(
                        "the broker did not print its addresses ({e}); its stderr:\n{}",
                        broker.log()
                    );
                }
            }
        }
        broker
    }

    /// Shard 0's address.
    pub fn addr(&self) -> &str {
        &self.addrs[0]
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Everything the broker wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// SIGSTOP: the broker freezes where it is (what it sent is sent, nothing more is done),
    /// so a following [`BrokerProcess::kill9`] dies at a chosen point of its work.
    pub fn freeze(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill with the pid of our own unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.sigkill();
    }

    /// Waits up to `within` for the broker to exit by itself (a failpoint); `None` if it
    /// still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn sigkill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill with the pid of our own unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let running = matches!(self.child.try_wait(), Ok(None));
        self.sigkill();
        if running && std::thread::panicking() {
            eprintln!("broker stderr:\n{}", self.log());
        }
    }
}
