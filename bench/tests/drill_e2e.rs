//! `ringmq-bench drill kill` end to end: a real broker process killed with SIGKILL under load,
//! restarted and audited. The verdicts themselves are unit-tested in `bench/src/drill.rs`.

use std::path::Path;
use std::process::Command;

fn drill(flush_mode: &str, name: &str) -> (bool, String, String) {
    // Under cargo's target dir: on the project's disk, never tmpfs (the broker refuses tmpfs).
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("drill-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringmq-bench"))
        .args(["drill", "kill", "--flush-mode", flush_mode, "--rounds", "2"])
        .args(["--kill-after-ms-min", "200", "--kill-after-ms-max", "600"])
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
