//! A short `ringmq-bench transactions` run on an embedded broker: the table and the JSON hold
//! non-zero figures for every phase, every committed (and checked-back) message was read back
//! exactly once, no rolled back one, and no check-back resolved before its timeout. No upper
//! timing thresholds: figures on a shared CI machine mean nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

const MESSAGES: u64 = 300;
const CHECKED: u64 = 20;
const TIMEOUT_MS: u64 = 200;

fn temp_dir(name: &str) -> PathBuf {
    // Under cargo's target dir: on the project's disk, never tmpfs (the broker refuses tmpfs).
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn u(v: &serde_json::Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("{path} in {v:#}"))
}

/// The cells of the table row whose first cell is `name`.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row {name:?} in\n{table}"))
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}

/// A latency cell ("382 µs", "1.20 ms", "0.21 s") in µs.
fn us(cell: &str) -> f64 {
    let (n, unit) = cell.split_once(' ').unwrap_or_else(|| panic!("{cell:?}"));
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("{cell:?}"));
    match unit {
        "µs" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => panic!("{cell:?}"),
    }
}

#[test]
fn transactions_bench_commits_once_rolls_back_never_and_times_check_backs() {
    let dir = temp_dir("transactions");
    let out = dir.join("out");
    let timeout = TIMEOUT_MS.to_string();
    let (messages, checked) = (MESSAGES.to_string(), CHECKED.to_string());
    let output = Command::new(env!("CARGO_BIN_EXE_ringmq-bench"))
        .args(["transactions", "--producers", "2", "--queues", "3"])
        .args(["--messages", &messages, "--warmup-secs", "0", "--rollback"])
        .args(["--check-messages", &checked, "--check-gap-ms", "5"])
        .args(["--transaction-timeout-ms", &timeout])
        .args(["--transaction-check-interval-ms", &timeout])
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
    assert!(stderr.contains("[transactions]"), "{stderr}");

    // The table: msgs/s and every latency cell non-zero, for each operation.
    for name in ["plain SYNC send -> ack", "half + commit", "half + rollback"] {
        let cells = row(&stdout, name);
        let rate: f64 = cells[1].parse().unwrap_or_else(|_| panic!("{cells:?}"));
        assert!(rate > 0.0, "{name}: {cells:?}");
        assert_eq!(cells[2], messages, "{name}: {cells:?}");
        for c in &cells[3..] {
            assert!(us(c) > 0.0, "{name}: {cells:?}");
        }
    }
    for name in ["half -> ack", "end (commit) -> ack"] {
        let cells = row(&stdout, name);
        assert_eq!(cells[2], messages, "{name}: {cells:?}");
        assert!(us(cells[3]) > 0.0, "{name}: {cells:?}");
    }
    // A check-back cannot come before the half's timeout ran out. The broker starts that clock
    // when it stores the half, which is before the producer sees the ack (by at most the half's
    // ack latency), while the bench measures from the ack: so the bound is the timeout less the
    // slowest half ack.
    let visible = row(
        &stdout,
        "half ack -> committed message visible to a consumer",
    );
    assert_eq!(visible[1], checked, "{visible:?}");

    let text = std::fs::read_to_string(out.join("transactions.json")).expect("the JSON report");
    let r: serde_json::Value = serde_json::from_str(&text).expect("the report parses");
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["plain", "commit", "rollback"], "{r:#}");
    for p in phases {
        assert_eq!(u(p, "/completed"), MESSAGES, "{p:#}");
        assert_eq!(u(p, "/failed"), 0, "{p:#}");
        assert!(p["msgs_per_sec"].as_f64().unwrap() > 0.0, "{p:#}");
        assert!(u(p, "/total_latency/p50_us") > 0, "{p:#}");
    }
    assert!(
        r["tx_over_plain_throughput"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    assert_eq!(u(&r, "/check/halves"), CHECKED, "{r:#}");
    assert_eq!(u(&r, "/check/resolved"), CHECKED, "{r:#}");
    assert_eq!(u(&r, "/check/to_check/count"), CHECKED, "{r:#}");
    let earliest_due = (TIMEOUT_MS * 1000).saturating_sub(u(&r, "/check/half_latency/max_us"));
    assert!(u(&r, "/check/to_check/min_us") >= earliest_due, "{r:#}");
    assert!(u(&r, "/check/to_visible/min_us") >= earliest_due, "{r:#}");

    // Read back: commit, plain and checked-back ids once each; nothing of the rollback phase.
    let audits = r["audits"].as_array().unwrap();
    assert_eq!(audits.len(), 4, "{r:#}");
    for a in audits {
        let topic = a["topic"].as_str().unwrap();
        let want = match topic.split(' ').next().unwrap() {
            "rollback" => 0,
            "check" => CHECKED,
            _ => MESSAGES,
        };
        assert_eq!(u(a, "/expected"), want, "{a:#}");
        assert_eq!(u(a, "/distinct"), want, "{a:#}");
        assert_eq!(u(a, "/duplicates"), 0, "{a:#}");
        assert_eq!(u(a, "/lost"), 0, "{a:#}");
        assert_eq!(u(a, "/unexpected"), 0, "{a:#}");
        assert_eq!(a["ok"], true, "{a:#}");
    }
    // Only the output dir is left: the embedded broker's data dir is gone.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["out".to_string()], "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
