//! `ringmq tune --check` as a process: on the real disk it passes (exit 0) with every row
//! present; on tmpfs the O_DIRECT row is FAIL and so is the exit code, as a broker's start
//! would be refused there. Where /dev/shm is missing the tmpfs test prints SKIP (a failure
//! under `CI=true`).

use std::path::Path;
use std::process::{Command, Output};

/// Every row the table must have, in order.
const ROWS: [&str; 14] = [
    "broker config",
    "kernel",
    "io_uring",
    "memlock",
    "open files",
    "data dir file system",
    "O_DIRECT in data dir",
    "free space",
    "disk write cache",
    "disk FUA",
    "I/O scheduler",
    "cpuidle",
    "kvm halt_poll_ns",
    "CPU frequency governor",
];

fn tune_check(data_dir: &Path, extra: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["tune", "--check", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("run ringmq tune --check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "{stdout}{}(exit {:?})",
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    (out, stdout)
}

/// The status of the row named `setting`, from the table.
fn status_of<'a>(table: &'a str, setting: &str) -> Option<&'a str> {
    table.lines().find_map(|l| {
        let (status, rest) = l.split_once("  ")?;
        let status = status.trim();
        let named = rest.trim_start().strip_prefix(setting)?;
        (["OK", "WARN", "FAIL"].contains(&status) && named.starts_with("  ")).then_some(status)
    })
}

#[test]
fn on_the_real_disk_every_row_is_there_and_the_check_passes() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("data");
    // Small segments: the check is about this host, not about the free space of a busy disk.
    let (out, table) = tune_check(&data, &["--segment-bytes", "67108864"]);
    for row in ROWS {
        assert!(status_of(&table, row).is_some(), "row {row:?} missing");
    }
    assert_eq!(status_of(&table, "O_DIRECT in data dir"), Some("OK"));
    assert_eq!(status_of(&table, "data dir file system"), Some("OK"));
    assert!(!table.contains("\nFAIL"), "a FAIL row on the real disk");
    assert!(table.contains("0 FAIL: a broker with this config would start here"));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !data.exists(),
        "the check left the data dir it created behind"
    );
}

#[test]
fn on_tmpfs_the_o_direct_row_fails_and_so_does_the_exit_code() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        let why = "/dev/shm is missing: no tmpfs to check";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {why}"
        );
        eprintln!("SKIP on_tmpfs_the_o_direct_row_fails: {why}");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let (out, table) = tune_check(dir.path(), &["--segment-bytes", "67108864"]);
    assert_eq!(status_of(&table, "O_DIRECT in data dir"), Some("FAIL"));
    assert!(table.contains("in memory"), "says why");
    assert!(table.contains("would refuse to start"));
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAIL"));

    // The broker's own escape hatch turns it into a warning, as it does for a start.
    let (out, table) = tune_check(
        dir.path(),
        &["--segment-bytes", "67108864", "--allow-non-direct-io"],
    );
    assert_eq!(status_of(&table, "O_DIRECT in data dir"), Some("WARN"));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_config_the_broker_would_refuse_fails_the_check() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = dir.path().join("broker.toml");
    std::fs::write(&cfg, "[storage]\ndisk_reject_ratio = 90.0\n").unwrap();
    let (out, table) = tune_check(dir.path(), &["--config", cfg.to_str().unwrap()]);
    assert_eq!(status_of(&table, "broker config"), Some("FAIL"));
    assert!(
        table.contains("disk_reject_ratio is 90"),
        "names the problem"
    );
    assert_ne!(out.status.code(), Some(0));
}
