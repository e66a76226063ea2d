//! The iproute2 and sysctl commands that network-namespace code runs, and the sweep of
//! namespaces left behind by a process that died.
//!
//! One file shared by two crates: the bench's slave host (`slave.rs`) and the integration
//! tests' two hosts (`tests/common/netns.rs`, which includes this file with `#[path]`). So it
//! uses std only.

use std::path::Path;
use std::process::{Command, Stdio};

/// Where `ip netns add` keeps its namespace handles (iproute2's NETNS_RUN_DIR).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Runs `ip args...`; on failure returns its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd, &format!("`ip {}`", args.join(" ")))
}

/// Runs `sysctl -w setting` in namespace `ns` (the root namespace for `None`).
pub fn sysctl(ns: Option<&str>, setting: &str) -> Result<(), String> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "sysctl"]);
            c
        }
        None => Command::new("sysctl"),
    };
    cmd.args(["-q", "-w", setting]);
    let what = match ns {
        Some(ns) => format!("`sysctl -w {setting}` in {ns}"),
        None => format!("`sysctl -w {setting}`"),
    };
    run(cmd, &what)
}

/// Runs `cmd` (`what` names it in errors); a failure carries its exit status and stderr.
fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the namespaces that `creator_pid` calls ours (it returns the pid of the process
/// that made the namespace, from its name) whose creating process is gone: a process killed
/// from outside never ran its Drop. Live creators' namespaces are never touched.
pub fn remove_stale_namespaces(creator_pid: impl Fn(&str) -> Option<u32>) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("note: removing namespace {name}: the process {pid} that made it is gone");
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}
