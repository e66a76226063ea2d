//! Short `ringmq-bench compare` runs against embedded brokers (and, for a replication mode, a
//! slave process), checking the outputs exist and have their shape, and that nothing is left
//! behind. No timing thresholds: figures on a shared CI machine mean nothing.

use std::path::Path;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringmq-bench"))
}

/// Runs the bench; its stdout and stderr once it exited successfully (both in the panic
/// message otherwise).
fn run_ok(cmd: &mut Command) -> (String, String) {
    let output = cmd.output().expect("run ringmq-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    (stdout, stderr)
}

/// The cell of `row` under the column named `name` in the closed-loop table of `stdout` (the
/// one with a `replication` column), so a column added to the table moves no assertion.
fn column<'a>(stdout: &str, row: &'a str, name: &str) -> &'a str {
    let header = stdout
        .lines()
        .find(|l| l.starts_with("| mode |") && l.contains("| replication |"))
        .unwrap_or_else(|| panic!("no closed-loop table: {stdout}"));
    let at = header
        .split('|')
        .map(str::trim)
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}: {header}"));
    row.split('|').map(str::trim).nth(at).unwrap_or("")
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
    let (stdout, stderr) = run_ok(
        bench()
            .args([
                "compare",
                "--modes",
                "sync-flush,async-flush",
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
            .arg(&out),
    );

    // The tables: one row per mode in the open-loop (headline) table, the closed-loop one, the
    // e2e table and the ratio table.
    let rows = |mode: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {mode} |")))
            .count()
    };
    assert_eq!(rows("sync-flush"), 3, "{stdout}");
    assert_eq!(rows("async-flush"), 4, "{stdout}");
    let open_at = stdout.find("Latency, open loop at 70 %").expect(&stdout);
    let closed_at = stdout.find("Throughput, closed loop").expect(&stdout);
    assert!(
        open_at < closed_at,
        "the open-loop table comes first:\n{stdout}"
    );
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
        "sync-flush.open.hgrm",
        "async-flush.open.hgrm",
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
    // Each open-loop run was offered 70 % of what its closed-loop run reached.
    let open = json["open_loop"].as_array().unwrap();
    assert_eq!(open.len(), 2, "{json:#}");
    for (o, c) in open.iter().zip(modes) {
        assert_eq!(o["mode"], c["mode"]);
        let offered = o["offered_msgs_per_sec"].as_u64().unwrap();
        let closed = c["msgs_per_sec"].as_f64().unwrap();
        assert_eq!(offered, ((closed * 0.7) as u64).max(1), "{o:#}");
        assert!(o["messages"].as_u64().unwrap() > 0, "{o:#}");
    }
    assert!(
        modes[0]["offered_msgs_per_sec"].is_null(),
        "closed loop offers no rate"
    );
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

/// Runs `compare --modes sync-master-received` for about a second with `--slave-net net` and
/// checks the report and that the slave, its namespace and every data dir are gone.
fn replication_mode_leaves_nothing_behind(net: &str) {
    let dir = temp_dir(&format!("replication-{net}"));
    let out = dir.join("out");
    let (stdout, _) = run_ok(
        bench()
            .args([
                "compare",
                "--modes",
                "sync-master-received",
                "--slave-net",
                net,
                // The closed-loop run only: the replication columns are what is checked here.
                "--open-loop-share",
                "0",
                "--duration-secs",
                "1",
                "--warmup-secs",
                "0",
                "--producers",
                "2",
                "--message-bytes",
                "100",
                "--segment-mib",
                "32",
            ])
            .arg("--data-root")
            .arg(&dir)
            .arg("--out")
            .arg(&out),
    );

    // The row: throughput, no errors, and the replication columns.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| sync-master-received |"))
        .unwrap_or_else(|| panic!("no row: {stdout}"));
    let cell = |name: &str| column(&stdout, row, name);
    assert!(cell("msgs/s").parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(cell("errors"), "0", "{row}");
    assert_eq!(cell("replication"), "sync_master/received", "{row}");
    cell("slave max lag bytes")
        .parse::<u64>()
        .expect("max lag bytes");
    cell("slave max lag ms").parse::<u64>().expect("max lag ms");
    assert_eq!(cell("link"), "up", "{row}");
    assert!(
        stdout.contains("slave (separate process) on cores"),
        "{stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let m = &json["modes"][0];
    assert_eq!(m["mode"], "sync-master-received");
    assert_eq!(m["replication"], "sync_master/received");
    assert_eq!(m["broker_replication"], "SYNC_MASTER/received");
    assert!(m["msgs_per_sec"].as_f64().unwrap() > 0.0);
    let lag = &m["replica_lag"];
    assert!(
        lag["max_lag_bytes"].is_u64() && lag["max_lag_ms"].is_u64(),
        "{lag}"
    );
    assert_eq!(lag["link_stayed_up"], true, "{lag}");
    assert!(lag["polls"].as_u64().unwrap() > 0, "{lag}");

    // The slave process is gone (reaped, not a zombie), and so is its namespace.
    let slave = &m["slave"];
    let pid = slave["pid"].as_u64().expect("slave pid");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the slave {pid} is still there"
    );
    match slave["netns"].as_str() {
        Some(ns) => {
            assert_eq!(slave["net"], "netns");
            assert!(
                stdout.contains(&format!("in network namespace {ns}")),
                "{stdout}"
            );
            let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
            let list = String::from_utf8_lossy(&list.stdout);
            assert!(
                !list
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(ns)),
                "namespace {ns} left behind:\n{list}"
            );
        }
        None => {
            assert_eq!(slave["net"], "loopback");
            assert!(stdout.contains("on loopback"), "{stdout}");
        }
    }
    if net == "loopback" {
        assert!(slave["netns"].is_null());
    }

    // Master's and slave's data dirs are gone.
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

/// As root with iproute2 the slave runs in a network namespace; elsewhere `auto` falls back to
/// loopback and the same checks apply.
#[test]
fn a_replication_mode_reports_the_slave_and_leaves_nothing_behind() {
    replication_mode_leaves_nothing_behind("auto");
}

#[test]
fn a_replication_mode_runs_with_the_slave_on_loopback() {
    replication_mode_leaves_nothing_behind("loopback");
}

#[test]
fn run_open_loop_with_async_sends() {
    let dir = temp_dir("run");
    let (stdout, _) = run_ok(
        bench()
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
            .arg(&dir),
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| async-flush |"))
        .unwrap_or_else(|| panic!("no row: {stdout}"));
    // Every one of the 1000 messages was acked: msgs/s column is non-zero, errors column 0.
    assert!(
        column(&stdout, row, "msgs/s").parse::<f64>().unwrap() > 0.0,
        "{row}"
    );
    assert_eq!(column(&stdout, row, "errors"), "0", "{row}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_event_loop_driver_sends_every_message_once_over_two_shards() {
    let dir = temp_dir("event-loop");
    let out = dir.join("out");
    let (_, stderr) = run_ok(
        bench()
            .args([
                "run",
                "--driver",
                "event-loop",
                "--broker-cores",
                "2",
                "--producers",
                "20",
                "--batch",
                "3",
                "--messages",
                "3000",
                "--warmup-secs",
                "0",
                "--queues",
                "4",
                "--consumers",
                "4",
                "--message-bytes",
                "64",
                "--segment-mib",
                "32",
            ])
            .arg("--data-root")
            .arg(&dir)
            .arg("--out")
            .arg(&out),
    );
    assert!(stderr.contains("event-loop driver"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let m = &report["modes"][0];
    // Every message acked, none failed, and the consumers of all four queues (on both shards)
    // read each exactly as often as it was acked.
    assert_eq!(m["messages"], 3000, "{m}");
    assert_eq!(m["errors"], serde_json::json!({}), "{m}");
    assert_eq!(m["e2e_latency"]["count"], 3000, "{m}");
    assert!(m["cpu"]["load_cpu_pct"].as_f64().unwrap() > 0.0, "{m}");
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

#[test]
fn sweep_runs_each_rate_and_writes_its_table_json_and_chart() {
    let dir = temp_dir("sweep");
    let out = dir.join("out");
    let (stdout, _) = run_ok(
        bench()
            .args(["sweep", "--mode", "async-flush", "--rates", "200,400"])
            .args([
                "--duration-secs",
                "1",
                "--warmup-secs",
                "0",
                "--segment-mib",
                "32",
            ])
            .arg("--data-root")
            .arg(&dir)
            .arg("--out")
            .arg(&out),
    );
    for rate in ["200", "400"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("| {rate} |"))),
            "no row for {rate}:\n{stdout}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let targets: Vec<u64> = rows
        .iter()
        .map(|r| r["target_msgs_per_sec"].as_u64().unwrap())
        .collect();
    assert_eq!(targets, [200, 400], "{report:#}");
    for r in rows {
        assert!(r["msgs_per_sec"].as_f64().unwrap() > 0.0, "{r:#}");
        assert!(r["latency"]["p99_us"].as_u64().unwrap() > 0, "{r:#}");
    }
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<circle").count(), 6, "2 rates x 3 percentiles");
    // Only the output dir is left: the embedded brokers' data dirs are gone.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["out"], "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stalls_measures_start_up_and_rolls_against_the_steady_state() {
    let dir = temp_dir("stalls");
    let out = dir.join("out");
    let (stdout, _) = run_ok(
        bench()
            .args([
                "stalls",
                "--startup-segment-mib",
                "8",
                "--startup-secs",
                "1",
            ])
            .args(["--steady-after-secs", "1", "--startup-duration-secs", "2"])
            .args(["--startup-rate", "500"])
            .args(["--segment-mib", "1", "--roll-rate", "1000"])
            .args(["--roll-message-bytes", "2048", "--roll-producers", "2"])
            .args(["--roll-duration-secs", "3", "--roll-warmup-secs", "0"])
            .arg("--data-root")
            .arg(&dir)
            .arg("--out")
            .arg(&out),
    );
    for phase in ["startup", "roll"] {
        let rows = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {phase} |")))
            .count();
        assert_eq!(rows, 2, "{phase}: a stalled and a steady row\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stalls.json")).unwrap()).unwrap();
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "{report:#}");
    let count = |p: &serde_json::Value, w: &str| p[w]["latency"]["count"].as_u64().unwrap();
    // Open loop: every intended send is made once and lands in exactly one window.
    let startup = &phases[0];
    assert_eq!(startup["phase"], "startup");
    assert_eq!(startup["segment_bytes"], 8 << 20);
    assert_eq!(count(startup, "stalled") + count(startup, "steady"), 1000);
    assert_eq!(count(startup, "stalled"), 500, "{startup:#}");
    // 2 KiB x 1000/s fills a 1 MiB segment about every half second.
    let roll = &phases[1];
    assert_eq!(roll["phase"], "roll");
    assert_eq!(count(roll, "stalled") + count(roll, "steady"), 3000);
    let rolls = roll["rolls"].as_array().unwrap();
    assert!(rolls.len() >= 3, "{roll:#}");
    assert!(
        count(roll, "stalled") > 0 && count(roll, "steady") > 0,
        "{roll:#}"
    );
    assert!(roll["p99_ratio"].as_f64().is_some(), "{roll:#}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["out"], "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
