//! Every produce ack says where the bytes are (`memory`, `disk`, `replica-received`,
//! `replica-durable`) and which epoch acked it, through the library and the CLI.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use ringmq::client::{Admin, Durability, Producer, QueueSelector, SendResult};
use ringmq::config::CoreSelection;
use ringmq::format::batch::Message;
use ringmq::replication::{ReplicaAck, ReplicationMode, Role};
use ringmq::storage::FlushMode;

use common::{data_dir, test_config, TestBroker};

fn broker_with(flush_mode: FlushMode) -> TestBroker {
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.storage.flush_mode = flush_mode;
    // Under ASYNC_FLUSH nothing may reach the disk during the test, so "memory" is certain.
    cfg.storage.flush_interval_ms = 600_000;
    cfg.storage.flush_bytes = 1 << 30;
    TestBroker::start_with(cfg, tmp)
}

fn send_one(addr: &str, topic: &str) -> SendResult {
    let admin = Admin::connect(addr).unwrap();
    admin.create_topic(topic, 1).unwrap();
    Producer::connect(addr)
        .unwrap()
        .send(
            topic,
            QueueSelector::Queue(0),
            &Message::new(b"hello".to_vec()),
        )
        .unwrap()
}

#[test]
fn a_sync_flush_ack_says_disk_and_names_the_epoch() {
    let b = broker_with(FlushMode::SyncFlush);
    let r = send_one(&b.addr(), "acks");
    assert_eq!(r.durability, Durability::Disk);
    let info = Admin::connect(&b.addr()).unwrap().broker_info().unwrap();
    assert_eq!(r.epoch, info.epoch);
}

#[test]
fn an_async_flush_ack_before_any_flush_says_memory() {
    let b = broker_with(FlushMode::AsyncFlush);
    let r = send_one(&b.addr(), "acks");
    assert_eq!(r.durability, Durability::Memory);
}

/// A master on core 0 and a slave on the other core, SYNC_MASTER waiting for `ack`.
fn pair(ack: ReplicaAck) -> (TestBroker, TestBroker) {
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = CoreSelection::List(vec![0]);
    cfg.replication.mode = ReplicationMode::SyncMaster;
    cfg.replication.replica_ack = ack;
    cfg.replication.replica_timeout_ms = 5000;
    let master = TestBroker::start_with(cfg, tmp);
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = CoreSelection::List(vec![common::available_cores().min(2) - 1]);
    cfg.replication.role = Role::Slave;
    cfg.replication.master = Some(master.addr());
    let slave = TestBroker::start_with(cfg, tmp);
    (master, slave)
}

fn send_when_streaming(addr: &str, topic: &str) -> SendResult {
    Admin::connect(addr)
        .unwrap()
        .create_topic(topic, 1)
        .unwrap();
    let producer = Producer::connect(addr).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // SLAVE_NOT_AVAILABLE until the slave has connected; the producer retries that.
        match producer.send(topic, QueueSelector::Queue(0), &Message::new(b"x".to_vec())) {
            Ok(r) => return r,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("no SYNC_MASTER ack within 20 s: {e}"),
        }
    }
}

#[test]
fn a_sync_master_durable_ack_says_replica_durable() {
    let (master, _slave) = pair(ReplicaAck::Durable);
    let r = send_when_streaming(&master.addr(), "replicated");
    assert_eq!(r.durability, Durability::ReplicaDurable);
}

#[test]
fn a_sync_master_received_ack_says_at_least_replica_received() {
    let (master, _slave) = pair(ReplicaAck::Received);
    let r = send_when_streaming(&master.addr(), "replicated");
    // The slave's durable ack may have arrived too by the time the master answers.
    assert!(
        r.durability >= Durability::ReplicaReceived,
        "got {}",
        r.durability
    );
}

#[test]
fn print_acks_appends_level_and_epoch_to_each_line() {
    let b = broker_with(FlushMode::SyncFlush);
    b.create_topic("cli", 2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args([
            "produce",
            "--broker",
            &b.addr(),
            "--topic",
            "cli",
            "--print-acks",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthree\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let epoch = Admin::connect(&b.addr())
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], "ack");
        assert!(fields[1].starts_with("line="), "{line}");
        assert!(fields[2].starts_with("queue="), "{line}");
        assert!(fields[3].starts_with("offset="), "{line}");
        assert_eq!(fields[4], "level=disk", "{line}");
        assert_eq!(fields[5], format!("epoch={epoch}"), "{line}");
    }
}
