//! `ringmq-bench drill kill` end to end: a real broker process killed with SIGKILL under load,
//! restarted and audited; and `drill partition`: a master and a slave process in two network
//! namespaces, the link cut under load and healed; and `drill failover`: the master of a broker
//! group on etcd killed under load. The verdicts themselves are unit-tested in
//! `bench/src/drill.rs` and `bench/src/drill_partition.rs`.
//!
//! The partition test makes network namespaces: run it under `flock /tmp/ringmq-netns.lock`.

use std::path::Path;
use std::process::Command;

fn drill(flush_mode: &str, name: &str) -> (bool, String, String) {
    drill_with(
        &[
            "kill",
            "--flush-mode",
            flush_mode,
            "--rounds",
            "2",
            "--kill-after-ms-min",
            "200",
            "--kill-after-ms-max",
            "600",
        ],
        name,
    )
}

fn drill_with(args: &[&str], name: &str) -> (bool, String, String) {
    // Under cargo's target dir: on the project's disk, never tmpfs (the broker refuses tmpfs).
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("drill-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringmq-bench"))
        .arg("drill")
        .args(args)
        .args(["--message-bytes", "128", "--seed", "5"])
        .arg("--data-root")
        .arg(&root)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ringmq-bench drill");
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
    assert!(
        left.is_empty(),
        "the drill left its data dir behind: {left:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verdict_rows(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| round"))
        .collect()
}

#[test]
fn a_sync_flush_broker_killed_twice_loses_no_acked_message() {
    let (ok, stdout, stderr) = drill("sync_flush", "sync");
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = verdict_rows(&stdout);
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        assert!(row.ends_with("| PASS |"), "{row}");
        // Each round acked something, so the audit checked something.
        let acked: u64 = row.split('|').nth(3).unwrap().trim().parse().unwrap();
        assert!(acked > 0, "{row}");
    }
}

#[test]
fn an_async_flush_broker_loses_at_most_what_it_reported_unflushed() {
    let (ok, stdout, stderr) = drill("async_flush", "async");
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = verdict_rows(&stdout);
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows.iter().all(|r| r.ends_with("| PASS |")), "{stdout}");
}

/// The namespaces `ringmq-bench` makes (`rqbench-<pid>-<n>`) that exist now.
fn bench_namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("rqbench-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_sync_master_cut_off_its_slave_acks_nothing_it_cannot_keep() {
    let before = bench_namespaces();
    let (ok, stdout, stderr) = drill_with(
        &[
            "partition",
            "--rounds",
            "1",
            "--partition-ms",
            "1500",
            "--replica-timeout-ms",
            "500",
            "--load-around-cut-ms",
            "500",
            "--in-flight-grace-ms",
            "300",
        ],
        "partition",
    );
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    if let Some(skip) = stdout.lines().find(|l| l.starts_with("SKIP")) {
        // Not root or no iproute2 (under CI=true the drill itself fails instead).
        eprintln!("{skip}");
        return;
    }
    let rows = verdict_rows(&stdout);
    assert_eq!(rows.len(), 1, "{stdout}");
    let cells: Vec<&str> = rows[0].split('|').map(str::trim).collect();
    assert_eq!(cells.last(), Some(&""), "{stdout}");
    assert_eq!(cells[cells.len() - 2], "PASS", "{stdout}\n{stderr}");
    let acked: u64 = cells[3].parse().unwrap();
    assert!(acked > 0, "{stdout}");
    // Proof the cut happened: the master answered sends during it with a replica status.
    let during_cut = cells[6];
    assert!(
        during_cut.contains("FLUSH_SLAVE_TIMEOUT") || during_cut.contains("SLAVE_NOT_AVAILABLE"),
        "no send failed with a replica status during the cut: {stdout}"
    );
    assert!(
        stdout.contains("sync_master"),
        "the default mode is SYNC_MASTER: {stdout}"
    );
    let left: Vec<String> = bench_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(
        left.is_empty(),
        "the drill left namespaces behind: {left:?}"
    );
}

#[test]
fn a_killed_master_of_a_group_on_etcd_is_replaced_and_no_acked_message_is_lost() {
    let (ok, stdout, stderr) = drill_with(
        &[
            "failover",
            "--rounds",
            "1",
            "--lease-ttl-secs",
            "2",
            "--after-failover-ms",
            "300",
        ],
        "failover",
    );
    if !ok && stderr.contains("etcd is not installed") {
        let msg = "SKIP: etcd is not installed (apt-get install etcd-server)";
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{msg} (CI=true: a skipped test is a failure)"
        );
        eprintln!("{msg}");
        return;
    }
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let rows = verdict_rows(&stdout);
    assert_eq!(rows.len(), 1, "{stdout}");
    let cells: Vec<&str> = rows[0].split('|').map(str::trim).collect();
    assert_eq!(cells[cells.len() - 2], "PASS", "{stdout}\n{stderr}");
    let by_new: u64 = cells[4].parse().unwrap();
    assert!(by_new > 0, "the new master acked nothing: {stdout}");
    assert!(cells[5].ends_with(" ms"), "no failover time: {stdout}");
    assert_eq!(cells[6], "0", "acked messages lost: {stdout}");
    assert!(stdout.contains("median"), "{stdout}");
}
