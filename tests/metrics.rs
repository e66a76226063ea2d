//! The Prometheus endpoint, for real: its text passes `promtool check metrics`, its values are
//! what the broker did, and a real `prometheus` server scrapes it and answers a query through
//! its HTTP API with the count of messages produced.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package (`.ci/run` installs it).
//! Without them a test prints SKIP and why; under `CI=true` that is a failure.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{data_dir, read_all, test_config, TestBroker};
use ringmq::client::{Consumer, Producer, QueueSelector};
use ringmq::config::MetricsListen;
use ringmq::format::batch::Message;

/// A broker on free ports with its metrics endpoint on a free port too.
fn broker_with_metrics() -> (TestBroker, SocketAddr) {
    broker_with_metrics_and(|_| {})
}

fn broker_with_metrics_and(
    tune: impl FnOnce(&mut ringmq::config::Config),
) -> (TestBroker, SocketAddr) {
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    tune(&mut cfg);
    cfg.server.metrics_listen = MetricsListen::Addr("127.0.0.1:0".into());
    let b = TestBroker::start_with(cfg, tmp);
    let addr = b
        .broker
        .as_ref()
        .and_then(|b| b.metrics_address())
        .expect("the metrics endpoint is on");
    (b, addr)
}

/// `GET path` over HTTP/1.0 (so the answer is never chunked): status code and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path)
}

fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, body.to_string())
}

/// Samples of the exposition: `name{labels}` -> value (a line the parser cannot read fails).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (series.to_string(), value.parse::<f64>().expect("a number"))
        })
        .collect()
}

/// The sum of every series of `name` whose labels contain all of `with` (`k="v"` strings).
fn sum_of(samples: &BTreeMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            n == name && with.iter().all(|w| labels.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Whether `tool` can run; otherwise SKIP (a failure under CI=true).
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = format!("`{tool}` is not installed (Debian package `prometheus`)");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {why}"
        );
        eprintln!("SKIP: {why}");
    }
    ok
}

/// Sends `n` one-message batches round robin; returns the batch bytes the broker should count.
fn produce(addr: &str, topic: &str, n: usize) -> u64 {
    let p = Producer::connect(addr).unwrap();
    let mut bytes = 0;
    for i in 0..n {
        let m = Message::new(format!("metrics-{i}")).with_key(format!("k{i}"));
        bytes += m.encoded_len() as u64;
        p.send(topic, QueueSelector::RoundRobin, &m).unwrap();
    }
    bytes
}

/// Scrapes until `ready` holds for the samples (shards publish every 0.5 s), or fails after
/// 10 s with the last text.
fn scrape_until(addr: SocketAddr, ready: impl Fn(&BTreeMap<String, f64>) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        if ready(&samples(&text)) {
            return text;
        }
        assert!(Instant::now() < deadline, "never ready:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_exposition_passes_promtool_and_counts_what_was_produced_and_fetched() {
    let (b, metrics) = broker_with_metrics();
    b.create_topic("m", 4);
    const N: usize = 40;
    let bytes = produce(&b.addr(), "m", N);
    let consumer = Consumer::connect(&b.addr()).unwrap();
    assert_eq!(read_all(&consumer, "m", 4).len(), N);

    let text = scrape_until(metrics, |s| {
        sum_of(s, "ringmq_fetched_messages_total", &[]) >= N as f64
    });
    let s = samples(&text);
    let topic = ["topic=\"m\""];
    assert_eq!(
        sum_of(&s, "ringmq_produced_messages_total", &topic),
        N as f64
    );
    assert_eq!(
        sum_of(&s, "ringmq_produced_bytes_total", &topic),
        bytes as f64
    );
    assert_eq!(
        sum_of(&s, "ringmq_fetched_messages_total", &topic),
        N as f64
    );
    let ok = sum_of(&s, "ringmq_produce_requests_total", &["code=\"OK\""]);
    assert_eq!(ok, N as f64);
    assert_eq!(
        sum_of(&s, "ringmq_produce_requests_total", &[]),
        ok,
        "no failures"
    );
    // SYNC_FLUSH: every append was covered by some group commit before it was acked. The
    // appends are the messages' and the topic creation's record in the topic log.
    let appends = (N + 1) as f64;
    assert_eq!(sum_of(&s, "ringmq_appends_total", &[]), appends);
    assert_eq!(sum_of(&s, "ringmq_group_commit_records_sum", &[]), appends);
    let cycles = sum_of(&s, "ringmq_flush_cycles_total", &[]);
    assert!(cycles >= 1.0);
    assert_eq!(
        sum_of(&s, "ringmq_fsync_duration_seconds_count", &[]),
        cycles
    );
    assert_eq!(
        sum_of(&s, "ringmq_fsync_duration_seconds_bucket", &["le=\"+Inf\""]),
        cycles
    );
    assert_eq!(sum_of(&s, "ringmq_unflushed_bytes", &[]), 0.0, "all synced");
    let ratio = sum_of(&s, "ringmq_disk_used_ratio", &[]);
    assert!(ratio > 0.0 && ratio < 1.0, "disk used ratio {ratio}");
    assert!(
        sum_of(&s, "ringmq_commitlog_segments", &[]) >= 2.0,
        "one per shard at least"
    );
    assert!(
        s.contains_key("ringmq_oldest_message_age_seconds{shard=\"0\"}"),
        "{text}"
    );
    assert_eq!(
        sum_of(&s, "ringmq_replica_link_state", &["state=\"none\""]),
        s.keys()
            .filter(|k| k.starts_with("ringmq_connections{"))
            .count() as f64,
        "one link state per shard, none on a lone master"
    );
    // Every family has its help and type, once.
    for name in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = name.split(' ').next().unwrap();
        let help = format!("# HELP {name} ");
        assert_eq!(text.matches(&help).count(), 1, "{name}");
    }

    promtool_check(&text);
}

/// `promtool check metrics` on `text` (skipped without promtool; see `have`).
fn promtool_check(text: &str) {
    if !have("promtool") {
        return;
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "promtool check metrics: {}{}\n--- the text ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn failed_produces_count_by_code_and_refusals_by_reason_and_unknown_topics_get_no_series() {
    let (b, metrics) = broker_with_metrics();
    b.create_topic("known", 2);
    produce(&b.addr(), "known", 3);
    // A raw produce (the client library would stop at the route lookup).
    let err = common::produce_one(&b.addr(), "no-such-topic", 0, 0)
        .expect_err("an unknown topic is refused");
    assert!(err.to_string().contains("TOPIC_NOT_FOUND"), "{err}");
    // Half a frame, then silence: closed after partial_frame_timeout_ms (300 ms in tests).
    let mut stalled = TcpStream::connect(b.addr()).unwrap();
    stalled.write_all(b"RQMW").unwrap();
    // Each shard publishes on its own every 0.5 s: wait for every count, not just the last one.
    let text = scrape_until(metrics, |s| {
        sum_of(
            s,
            "ringmq_refused_requests_total",
            &["reason=\"partial_frame_timeout\""],
        ) == 1.0
            && sum_of(s, "ringmq_produce_requests_total", &["code=\"OK\""]) == 3.0
    });
    let s = samples(&text);
    assert_eq!(
        sum_of(
            &s,
            "ringmq_produce_requests_total",
            &["code=\"TOPIC_NOT_FOUND\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum_of(&s, "ringmq_produce_requests_total", &["code=\"OK\""]),
        3.0
    );
    assert!(
        !text.contains("no-such-topic"),
        "a made-up topic got series:\n{text}"
    );
    assert_eq!(sum_of(&s, "ringmq_produced_messages_total", &[]), 3.0);
}

#[test]
fn the_endpoint_answers_only_get_metrics() {
    let (_b, metrics) = broker_with_metrics();
    assert_eq!(http_get(metrics, "/").0, 200);
    assert_eq!(http_get(metrics, "/nope").0, 404);
    assert_eq!(http_request(metrics, "POST", "/metrics").0, 405);
    // A client that sends half a request and stalls does not keep the endpoint from others
    // past its deadline.
    let mut stalled = TcpStream::connect(metrics).unwrap();
    stalled.write_all(b"GET /metr").unwrap();
    let started = Instant::now();
    assert_eq!(http_get(metrics, "/metrics").0, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_busy_metrics_port_fails_the_start_and_off_serves_none() {
    let (b, metrics) = broker_with_metrics();
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.metrics_listen = MetricsListen::Addr(metrics.to_string());
    let err = ringmq::server::Broker::start(cfg).err().expect("refused");
    assert!(err.to_string().contains("metrics"), "{err}");
    drop(b);
    let off = TestBroker::start();
    assert!(off.broker.as_ref().unwrap().metrics_address().is_none());
}

/// A `prometheus` server process, killed by its pid when dropped (also when the test fails).
struct PrometheusProcess {
    child: Child,
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> (PrometheusProcess, SocketAddr) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: ringmq\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("start prometheus");
    (PrometheusProcess { child }, web)
}

/// `query` through Prometheus' HTTP API: the raw JSON answer.
fn query_raw(prometheus: SocketAddr, query: &str) -> Option<String> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut s = TcpStream::connect_timeout(&prometheus, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /api/v1/query?query={encoded} HTTP/1.0\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    Some(raw)
}

/// `query` through Prometheus' HTTP API: the value of its single result, if it has one.
fn query(prometheus: SocketAddr, query: &str) -> Option<f64> {
    let raw = query_raw(prometheus, query)?;
    // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[t,"v"]}]}}
    let after = raw.split("\"value\":[").nth(1)?;
    let v = after.split(',').nth(1)?.split('"').nth(1)?;
    v.parse().ok()
}

#[test]
fn a_prometheus_server_scrapes_the_broker_and_answers_what_was_produced() {
    if !have("prometheus") {
        return;
    }
    let (b, metrics) = broker_with_metrics();
    let prom_dir = data_dir();
    let (prometheus, web) = start_prometheus(prom_dir.path(), metrics);
    b.create_topic("scraped", 4);
    const N: usize = 123;
    produce(&b.addr(), "scraped", N);

    let produced = "sum(ringmq_produced_messages_total{topic=\"scraped\"})";
    let success =
        "sum(ringmq_produce_requests_total{code=\"OK\"}) / sum(ringmq_produce_requests_total)";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        last = query(web, produced);
        if last == Some(N as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = std::fs::read_to_string(prom_dir.path().join("prometheus.log")).unwrap_or_default();
    assert_eq!(
        last,
        Some(N as f64),
        "prometheus never returned {N} for {produced}; its log:\n{log}"
    );
    assert_eq!(query(web, success), Some(1.0), "success rate");
    let p99 = "histogram_quantile(0.99, sum by (le) (ringmq_fsync_duration_seconds_bucket))";
    let p99 = query(web, p99).expect("an fsync p99");
    assert!(p99 > 0.0 && p99 < 10.0, "fsync p99 {p99} s");

    // Every query of the Grafana dashboard is valid PromQL over these metrics and finds data.
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/grafana-ringmq.json"),
    )
    .unwrap();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in exprs {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        // A rate needs two scrapes of a series: give it a few.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut raw = query_raw(web, &q).unwrap_or_default();
        while !raw.contains("\"value\":[") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            raw = query_raw(web, &q).unwrap_or_default();
        }
        assert!(
            raw.contains("\"status\":\"success\"") && raw.contains("\"value\":["),
            "dashboard query {q} answered {raw}"
        );
    }
    drop(prometheus);
}

/// The `"expr"` strings of a Grafana dashboard (JSON string escapes `\"` and `\\` undone).
fn dashboard_exprs(json: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find("\"expr\": \"") {
        rest = &rest[i + "\"expr\": \"".len()..];
        let mut expr = String::new();
        let mut chars = rest.char_indices();
        while let Some((j, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        expr.push(e);
                    }
                }
                '"' => {
                    rest = &rest[j..];
                    break;
                }
                c => expr.push(c),
            }
        }
        out.push(expr);
    }
    out
}

/// Consumer-group series: a group's members, a retry waiting in the schedule, a dead letter.
#[test]
fn consumer_group_series_show_members_the_schedule_and_dead_letters() {
    use ringmq::client::{Admin, GroupConfig, GroupConsumer};
    let (b, metrics) = broker_with_metrics();
    b.create_topic("jobs", 1);
    produce(&b.addr(), "jobs", 2);
    Admin::connect(&b.addr())
        .unwrap()
        .create_group("fragile", 0, 0)
        .unwrap();
    let patient = GroupConsumer::join(&b.addr(), GroupConfig::new("patient", &["jobs"])).unwrap();
    let fragile = GroupConsumer::join(&b.addr(), GroupConfig::new("fragile", &["jobs"])).unwrap();
    let take = |c: &GroupConsumer| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ms = c.poll(Duration::from_millis(200)).unwrap();
            if !ms.is_empty() || Instant::now() > deadline {
                return ms;
            }
        }
    };
    // `patient` gives one back for 2 hours (level 18); `fragile` allows no retry: its DLQ.
    let m = take(&patient);
    patient.nack(&m[0], 18, "later").unwrap();
    let m = take(&fragile);
    fragile.nack(&m[0], 0, "never").unwrap();
    // Every condition in the wait: each shard's series are as of its last snapshot (up to
    // 0.5 s old), and the coordinator's shard may be another than the schedule's: a scrape
    // that already showed the retry once showed the coordinator from before the join.
    let text = scrape_until(metrics, |s| {
        sum_of(
            s,
            "ringmq_dead_letter_messages",
            &["topic=\"%DLQ%fragile\""],
        ) == 1.0
            && sum_of(s, "ringmq_scheduled_messages", &["level=\"18\""]) == 1.0
            && sum_of(s, "ringmq_consumer_group_members", &["group=\"patient\""]) == 1.0
    });
    let s = samples(&text);
    assert_eq!(
        sum_of(&s, "ringmq_consumer_group_members", &["group=\"patient\""]),
        1.0
    );
    assert_eq!(sum_of(&s, "ringmq_scheduled_messages", &[]), 1.0);
    assert_eq!(sum_of(&s, "ringmq_dead_letter_messages", &[]), 1.0);
    promtool_check(&text);
    patient.close().unwrap();
    fragile.close().unwrap();
}

/// Transaction series: open half messages, and those rolled back after the most checks.
#[test]
fn transaction_series_show_open_halves_and_discards() {
    use ringmq::client::transaction::{CheckBack, TransactionConfig};
    use ringmq::client::TransactionalProducer;
    use ringmq::protocol::TransactionOutcome;
    // Checked at 0.2 s and 2.2 s, discarded at 4.2 s: open long enough to be seen.
    let (b, metrics) = broker_with_metrics_and(|c| {
        c.server.transaction_timeout_ms = 200;
        c.server.transaction_check_interval_ms = 2_000;
        c.server.transaction_check_max = 2;
    });
    b.create_topic("pay", 2);
    let p = TransactionalProducer::start(
        TransactionConfig::new(b.addr(), "billing"),
        std::sync::Arc::new(|_: &CheckBack| TransactionOutcome::Unknown),
    )
    .unwrap();
    let msg = [Message::new("x")];
    p.send_half("pay", QueueSelector::Queue(0), &msg).unwrap();
    let ended = p.send_half("pay", QueueSelector::Queue(1), &msg).unwrap();
    scrape_until(metrics, |s| {
        sum_of(s, "ringmq_transactions_open", &[]) == 2.0
    });
    p.end(&ended, TransactionOutcome::Rollback).unwrap();
    let text = scrape_until(metrics, |s| {
        sum_of(s, "ringmq_transactions_discarded_total", &[]) == 1.0
            && sum_of(s, "ringmq_transactions_open", &[]) == 0.0
    });
    promtool_check(&text);
}

/// Consumer-group lag: the queue's end minus the group's committed offset, also for a queue
/// another shard owns than the group's coordinator.
#[test]
fn consumer_group_lag_is_the_end_minus_the_committed_offset() {
    use ringmq::client::Admin;
    use ringmq::protocol::CommittedOffset;
    let (b, metrics) = broker_with_metrics();
    b.create_topic("jobs", 2);
    let p = Producer::connect(&b.addr()).unwrap();
    for q in 0..2u32 {
        for i in 0..(5 + q) {
            p.send(
                "jobs",
                QueueSelector::Queue(q),
                &Message::new(format!("{i}")),
            )
            .unwrap();
        }
    }
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.create_group("slow", 0, 0).unwrap();
    admin
        .commit_offsets(
            "slow",
            vec![
                CommittedOffset {
                    topic: "jobs".into(),
                    queue: 0,
                    offset: 2,
                },
                CommittedOffset {
                    topic: "jobs".into(),
                    queue: 1,
                    offset: 1,
                },
            ],
        )
        .unwrap();
    let text = scrape_until(metrics, |s| {
        sum_of(s, "ringmq_consumer_group_lag", &["queue=\"0\""]) == 3.0
            && sum_of(s, "ringmq_consumer_group_lag", &["queue=\"1\""]) == 5.0
    });
    assert_eq!(
        sum_of(
            &samples(&text),
            "ringmq_consumer_group_lag",
            &["group=\"slow\""]
        ),
        8.0
    );
    promtool_check(&text);
}
