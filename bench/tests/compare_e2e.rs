//! One short `ringmq-bench compare` against embedded brokers, checking the outputs exist and
//! have their shape. No timing thresholds: figures on a shared CI machine mean nothing.

use std::path::Path;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringmq-bench"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    // Under cargo's target dir: on the project's disk, never tmpfs (the broker refuses tmpfs).
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn compare_writes_a_row_per_mode_and_all_files() {
    let dir = temp_dir("compare");
    let out = dir.join("out");
    let output = bench()
        .args([
            "compare",
            "--duration-secs",
            "1",
            "--warmup-secs",
            "0",
            "--producers",
            "2",
            "--consumers",
            "1",
            "--message-bytes",
            "100",
            "--segment-mib",
            "32",
        ])
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

    // The table: one row per mode in the main table, the e2e table and the ratio table.
    let rows = |mode: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {mode} |")))
            .count()
    };
    assert_eq!(rows("sync-flush"), 2, "{stdout}");
    assert_eq!(rows("async-flush"), 3, "{stdout}");
    assert!(stdout.contains("Relative to sync-flush"), "{stdout}");
    assert!(stdout.contains("load threads on cores"), "{stdout}");
    // Progress lines on stderr, one per second at least.
    assert!(
        stderr.contains("[sync-flush]") && stderr.contains("msg/s"),
        "{stderr}"
    );

    for f in [
        "report.json",
        "report.md",
        "latency.svg",
        "sync-flush.hgrm",
        "async-flush.hgrm",
        "sync-flush.e2e.hgrm",
        "async-flush.e2e.hgrm",
    ] {
        let p = out.join(f);
        assert!(p.is_file(), "{} missing", p.display());
        assert!(std::fs::metadata(&p).unwrap().len() > 0, "{f} is empty");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let modes = json["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    assert_eq!(modes[0]["mode"], "sync-flush");
    assert_eq!(modes[1]["mode"], "async-flush");
    assert!(modes[0]["messages"].as_u64().unwrap() > 0);
    assert_eq!(json["ratios"].as_array().unwrap().len(), 1);
    let hgrm = std::fs::read_to_string(out.join("sync-flush.hgrm")).unwrap();
    assert!(hgrm.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
    assert!(hgrm.contains("#[Buckets = "));
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));

    // The embedded brokers' data dirs are gone.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ringmq-bench-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_open_loop_with_async_sends() {
    let dir = temp_dir("run");
    let output = bench()
        .args([
            "run",
            "--mode",
            "async-flush",
            "--send-mode",
            "async",
            "--rate",
            "2000",
            "--messages",
            "1000",
            "--warmup-secs",
            "0",
            "--producers",
            "2",
            "--message-bytes",
            "64",
            "--segment-mib",
            "32",
        ])
        .arg("--data-root")
        .arg(&dir)
        .output()
        .expect("run ringmq-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| async-flush |"))
        .unwrap_or_else(|| panic!("no row: {stdout}"));
    // Every one of the 1000 messages was acked: msgs/s column is non-zero, errors column 0.
    let cols: Vec<&str> = row.split('|').map(str::trim).collect();
    assert!(cols[2].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(cols[10], "0", "{row}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let output = bench()
        .args(["run", "--message-bytes", "4", "--producers", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--message-bytes") && stderr.contains("--producers"),
        "{stderr}"
    );
    let output = bench()
        .args(["compare", "--modes", "sync,fast"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}
