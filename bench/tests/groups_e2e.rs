//! Tiny `ringmq-bench groups` and `ringmq-bench backlog` runs on embedded brokers: the JSON
//! reports parse, every acked message was read (no losses) and the figures add up. No timing
//! thresholds: figures on a shared CI machine mean nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringmq-bench"))
}

fn temp_dir(name: &str) -> PathBuf {
    // Under cargo's target dir: on the project's disk, never tmpfs (the broker refuses tmpfs).
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the bench with `args` and returns the JSON it wrote as `file` into its --out dir.
fn run(name: &str, args: &[&str], file: &str) -> serde_json::Value {
    let dir = temp_dir(name);
    let out = dir.join("out");
    let output = bench()
        .args(args)
        .args(["--segment-mib", "32"])
        .arg("--data-root")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run ringmq-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let text = std::fs::read_to_string(out.join(file)).expect("the JSON report");
    let report: serde_json::Value = serde_json::from_str(&text).expect("the report parses");
    // The embedded broker's data dir is gone; only the output dir is left.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["out".to_string()], "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    report
}

fn u(v: &serde_json::Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("{path} in {v:#}"))
}

#[test]
fn groups_delivers_every_acked_message_and_times_commits() {
    let r = run(
        "groups",
        &[
            "groups",
            "--messages",
            "3000",
            "--warmup-secs",
            "0",
            "--producers",
            "2",
            "--consumers",
            "2",
            "--queues",
            "4",
            "--commit-interval-ms",
            "20",
        ],
        "groups.json",
    );
    assert_eq!(u(&r, "/produce/acked"), 3000, "{r:#}");
    assert_eq!(u(&r, "/produce/failed"), 0, "{r:#}");
    assert_eq!(u(&r, "/consume/lost"), 0, "{r:#}");
    assert_eq!(u(&r, "/consume/distinct"), 3000, "{r:#}");
    assert_eq!(
        u(&r, "/consume/deliveries"),
        3000 + u(&r, "/consume/duplicates"),
        "{r:#}"
    );
    assert!(u(&r, "/consume/e2e_latency/count") > 0, "{r:#}");
    assert!(u(&r, "/commit/calls") > 0, "{r:#}");
    assert_eq!(
        u(&r, "/commit/latency/count"),
        u(&r, "/commit/calls"),
        "{r:#}"
    );
    // Members closing one after another: each close commits and leaves cleanly.
    let errors = r["errors"].as_object().unwrap();
    assert!(!errors.keys().any(|k| k.starts_with("close")), "{r:#}");
    // SYNC_FLUSH, no slave: every commit is on the master's disk when acked.
    let durability = r
        .pointer("/commit/durability")
        .unwrap()
        .as_object()
        .unwrap();
    assert_eq!(durability.keys().collect::<Vec<_>>(), vec!["disk"], "{r:#}");
}

#[test]
fn backlog_reads_everything_with_each_reader() {
    let r = run(
        "backlog",
        &[
            "backlog",
            "--messages",
            "5000",
            "--queues",
            "3",
            "--members",
            "1,2",
            "--mode",
            "async-flush",
        ],
        "backlog.json",
    );
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names[0].starts_with("produce"), "{names:?}");
    assert!(names[1].starts_with("plain consumer"), "{names:?}");
    assert_eq!(&names[2..], ["group (1 member)", "group (2 members)"]);
    for p in phases {
        assert_eq!(u(p, "/messages"), 5000, "{p:#}");
        assert_eq!(u(p, "/lost"), 0, "{p:#}");
        assert_eq!(p["incomplete"], false, "{p:#}");
        let errors = p["errors"].as_object().unwrap();
        assert!(!errors.keys().any(|k| k.starts_with("close")), "{p:#}");
        assert!(p["msgs_per_sec"].as_f64().unwrap() > 0.0, "{p:#}");
        assert!(p["cpu"]["wall_secs"].as_f64().unwrap() > 0.0, "{p:#}");
    }
}
