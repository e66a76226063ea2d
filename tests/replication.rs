//! Replication on one host (loopback): a master and a slave embedded in this process, one shard
//! each on its own core. The two-host drills (kill -9, partitions, rejoin) are in
//! `replication_two_hosts.rs`.

mod common;

use std::time::{Duration, Instant};

use ringmq::client::{Admin, ClientError, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::config::CoreSelection;
use ringmq::format::batch::Message;
use ringmq::protocol::ErrorCode;
use ringmq::replication::{ReplicaAck, ReplicationMode, Role};

use common::{data_dir, test_config, TestBroker};

fn core_for_slave() -> usize {
    common::available_cores().min(2) - 1
}

/// A one-shard master whose peer (its future slave) is on this host but not up yet, so it
/// starts with `force_master`.
fn master_cfg(mode: ReplicationMode, dir: &std::path::Path) -> ringmq::config::Config {
    let mut cfg = test_config(dir);
    cfg.server.cores = CoreSelection::List(vec![0]);
    cfg.replication.mode = mode;
    cfg.replication.replica_ack = ReplicaAck::Durable;
    cfg.replication.replica_timeout_ms = 2000;
    cfg.replication.peer = Some(UNREACHABLE_PEER.to_string());
    cfg.replication.force_master = true;
    cfg
}

/// A peer on this host that answers nothing (port 1 refuses connections).
const UNREACHABLE_PEER: &str = "127.0.0.1:1";

fn master(mode: ReplicationMode) -> TestBroker {
    let tmp = data_dir();
    let cfg = master_cfg(mode, tmp.path());
    TestBroker::start_with(cfg, tmp)
}

fn slave_of(master: &TestBroker) -> TestBroker {
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = CoreSelection::List(vec![core_for_slave()]);
    cfg.replication.role = Role::Slave;
    cfg.replication.master = Some(master.addr());
    TestBroker::start_with(cfg, tmp)
}

fn wait_caught_up(master: &TestBroker) {
    common::wait_caught_up(
        &Admin::connect(&master.addr()).unwrap(),
        Duration::from_secs(20),
    );
}

fn read_all(addr: &str, topic: &str, queues: u32) -> Vec<(u32, u64, Vec<u8>)> {
    common::read_all(&Consumer::connect(addr).unwrap(), topic, queues)
}

fn remote_code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Remote(r) => Some(r.code),
        _ => None,
    }
}

fn no_retries(addr: &str) -> Producer {
    let mut cfg = ProducerConfig::new(addr);
    cfg.retries = 0;
    Producer::with_config(cfg).unwrap()
}

/// Sends `n` numbered messages one by one, round robin over `queues`; returns what was acked.
fn send_sync(addr: &str, topic: &str, queues: u32, n: u32) -> Vec<(u32, u64, Vec<u8>)> {
    let producer = Producer::connect(addr).unwrap();
    (0..n)
        .map(|i| {
            let body = format!("{topic}-{i}").into_bytes();
            let r = producer
                .send(
                    topic,
                    QueueSelector::Queue(i % queues),
                    &Message::new(body.clone()),
                )
                .unwrap();
            (r.queue, r.offset, body)
        })
        .collect()
}

#[test]
fn sync_master_acks_only_what_the_slave_has_and_the_slave_serves_reads() {
    let m = master(ReplicationMode::SyncMaster);
    let s = slave_of(&m);
    m.create_topic("orders", 4);
    wait_caught_up(&m);
    let mut acked = send_sync(&m.addr(), "orders", 4, 300);
    // SYNC_MASTER with durable acks: whatever was acked is already on the slave, durable and
    // readable there, with no waiting.
    acked.sort();
    let on_slave = read_all(&s.addr(), "orders", 4);
    assert_eq!(on_slave, acked);
    assert_eq!(read_all(&m.addr(), "orders", 4), acked);

    let err = no_retries(&s.addr())
        .send("orders", QueueSelector::Queue(0), &Message::new(&b"x"[..]))
        .unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    assert!(
        err.to_string().contains(&m.addr()),
        "names the master: {err}"
    );
    let err = Admin::connect(&s.addr())
        .unwrap()
        .create_topic("local", 1)
        .unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    let info = Admin::connect(&s.addr()).unwrap().broker_info().unwrap();
    assert_eq!(info.role, "slave");
    assert_eq!(info.master_address, m.addr());
}

#[test]
fn sync_master_without_a_slave_refuses_to_ack_and_hides_the_record() {
    let m = master(ReplicationMode::SyncMaster);
    m.create_topic("t", 1);
    let err = no_retries(&m.addr())
        .send("t", QueueSelector::Queue(0), &Message::new(&b"lonely"[..]))
        .unwrap_err();
    assert_eq!(
        remote_code(&err),
        Some(ErrorCode::SlaveNotAvailable),
        "{err}"
    );
    // Stored on the master, but consumers only see what the slave has.
    assert!(read_all(&m.addr(), "t", 1).is_empty());

    let s = slave_of(&m);
    wait_caught_up(&m);
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_all(&m.addr(), "t", 1).is_empty() {
        assert!(Instant::now() < deadline, "record never became visible");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        read_all(&s.addr(), "t", 1),
        vec![(0, 0, b"lonely".to_vec())]
    );
}

#[test]
fn async_master_streams_a_backlog_to_a_new_empty_slave() {
    let m = master(ReplicationMode::AsyncMaster);
    m.create_topic("bulk", 2);
    let producer = Producer::connect(&m.addr()).unwrap();
    let payload = vec![7u8; 4000];
    for i in 0..5000u32 {
        producer
            .send_async(
                "bulk",
                QueueSelector::Queue(i % 2),
                &Message::new(payload.clone()),
                |r| {
                    r.expect("acked");
                },
            )
            .unwrap();
    }
    producer.flush();
    let s = slave_of(&m);
    wait_caught_up(&m);
    let on_master = read_all(&m.addr(), "bulk", 2);
    assert_eq!(on_master.len(), 5000);
    // The slave's visible end follows its own durability; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let on_slave = read_all(&s.addr(), "bulk", 2);
        if on_slave == on_master {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slave has {} of 5000",
            on_slave.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = Admin::connect(&s.addr()).unwrap().broker_stats().unwrap();
    assert_eq!(stats[0].replication.role, 1);
    assert_eq!(stats[0].replication.lag_bytes, 0, "{stats:?}");
}

#[test]
fn promote_turns_the_slave_into_a_master_with_a_new_epoch() {
    let m = master(ReplicationMode::AsyncMaster);
    let s = slave_of(&m);
    m.create_topic("p", 1);
    Producer::connect(&m.addr())
        .unwrap()
        .send("p", QueueSelector::Queue(0), &Message::new(&b"before"[..]))
        .unwrap();
    wait_caught_up(&m);
    let master_epoch = Admin::connect(&m.addr())
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    let admin = Admin::connect(&s.addr()).unwrap();
    let epoch = admin.promote().unwrap();
    assert!(
        epoch > master_epoch,
        "new epoch {epoch} after {master_epoch}"
    );
    assert_eq!(admin.broker_info().unwrap().role, "master");
    assert_eq!(
        admin.promote().unwrap(),
        epoch,
        "promoting a master changes nothing"
    );
    Producer::connect(&s.addr())
        .unwrap()
        .send("p", QueueSelector::Queue(0), &Message::new(&b"after"[..]))
        .unwrap();
    let got: Vec<Vec<u8>> = read_all(&s.addr(), "p", 1)
        .into_iter()
        .map(|m| m.2)
        .collect();
    assert_eq!(got, vec![b"before".to_vec(), b"after".to_vec()]);
}

#[test]
fn a_slave_with_another_shard_count_is_refused_at_start() {
    if common::available_cores() < 2 {
        eprintln!("skipping: needs 2 cores");
        return;
    }
    let m = master(ReplicationMode::AsyncMaster);
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = CoreSelection::Count(2);
    cfg.replication.role = Role::Slave;
    cfg.replication.master = Some(m.addr());
    let err = ringmq::server::Broker::start(cfg).err().expect("refused");
    assert!(err.to_string().contains("same --cores"), "{err}");
}

fn follow_request(shards: u32, segment_bytes: u64, epoch: u64) -> ringmq::protocol::Request {
    follow_from(shards, segment_bytes, epoch, 0, 0)
}

fn follow_from(
    shards: u32,
    segment_bytes: u64,
    epoch: u64,
    log_end: u64,
    log_durable: u64,
) -> ringmq::protocol::Request {
    ringmq::protocol::Request::ReplFollow(ringmq::protocol::ReplFollowRequest {
        shard: 0,
        shards,
        segment_bytes,
        log_end,
        epochs: vec![ringmq::protocol::EpochEntry { epoch, start: 0 }],
        log_durable,
        node_id: 0,
    })
}

/// An epoch newer than any `m` has: the next term, minted by another node.
fn newer_epoch(m: &TestBroker) -> u64 {
    let ours = Admin::connect(&m.addr())
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    ringmq::replication::epoch::pack(ringmq::replication::epoch::term_of(ours) + 1, 4242)
}

/// Sends one ReplFollow on a fresh connection and returns the answer.
fn follow_once(
    addr: &str,
    request: &ringmq::protocol::Request,
) -> Result<(ringmq::protocol::Response, bytes::Bytes), ClientError> {
    let conn =
        ringmq::client::connection::Connection::connect_timeout(addr, Duration::from_secs(2))
            .unwrap();
    conn.call(request, bytes::Bytes::new(), Duration::from_secs(5))
}

#[test]
fn follow_requests_that_cannot_work_are_refused_with_a_reason() {
    use ringmq::client::connection::Connection;
    let m = master(ReplicationMode::AsyncMaster);
    let seg = 32 << 20;
    let cases = [
        (follow_request(3, seg, 1), "shard layout differs"),
        (follow_request(1, seg * 2, 1), "segment_bytes differ"),
    ];
    for (request, why) in cases {
        let conn = Connection::connect_timeout(&m.addr(), Duration::from_secs(2)).unwrap();
        let err = conn
            .call(&request, bytes::Bytes::new(), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(
            remote_code(&err),
            Some(ErrorCode::ReplicationRefused),
            "{err}"
        );
        assert!(err.to_string().contains(why), "{err}");
    }
    // ReplFollow in the middle of a client connection is refused too; the broker goes on.
    let admin = Admin::connect(&m.addr()).unwrap();
    admin.ping().unwrap();
    let err = admin
        .connection()
        .call(
            &follow_request(1, seg, 1),
            bytes::Bytes::new(),
            Duration::from_secs(5),
        )
        .unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::InvalidArgument), "{err}");
    m.create_topic("still", 1);
}

/// A raw socket that follows `m` (a `ReplFollow`, then `then`), once the master streams to it.
fn fake_follower(m: &TestBroker, then: &[ringmq::protocol::Frame]) -> std::net::TcpStream {
    fake_follower_with(m, &follow_request(1, 32 << 20, 1), then)
}

fn fake_follower_with(
    m: &TestBroker,
    request: &ringmq::protocol::Request,
    then: &[ringmq::protocol::Frame],
) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(m.addr()).unwrap();
    let mut out = bytes::BytesMut::new();
    request.to_frame(1, bytes::Bytes::new()).encode(&mut out);
    for f in then {
        f.encode(&mut out);
    }
    sock.write_all(&out).unwrap();
    // The answer, then the log streams; one read is enough to see it is a session.
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(sock.read(&mut buf).unwrap() > 0);
    let admin = Admin::connect(&m.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin.broker_stats().unwrap()[0].replication.link != 2 {
        assert!(
            Instant::now() < deadline,
            "the fake follower never streamed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sock
}

#[test]
fn garbage_on_a_replication_stream_ends_that_session_only() {
    use std::io::Write;
    let m = master(ReplicationMode::AsyncMaster);
    m.create_topic("g", 1);
    Producer::connect(&m.addr())
        .unwrap()
        .send("g", QueueSelector::Queue(0), &Message::new(&b"kept"[..]))
        .unwrap();
    let mut sock = fake_follower(&m, &[]);
    let admin = Admin::connect(&m.addr()).unwrap();
    sock.write_all(&[0xAB; 64]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin.broker_stats().unwrap()[0].replication.link != 0 {
        assert!(Instant::now() < deadline, "garbage did not end the session");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(read_all(&m.addr(), "g", 1).len(), 1);
    Producer::connect(&m.addr())
        .unwrap()
        .send("g", QueueSelector::Queue(0), &Message::new(&b"more"[..]))
        .unwrap();
}

#[test]
fn every_shard_follows_its_own_shard_and_a_promotion_covers_them_all() {
    let shards = common::available_cores().min(2);
    let pair_cfg = |tmp: &tempfile::TempDir| {
        let mut cfg = test_config(tmp.path());
        cfg.server.cores = CoreSelection::Count(shards);
        cfg.replication.mode = ReplicationMode::SyncMaster;
        cfg.replication.replica_ack = ReplicaAck::Received;
        cfg
    };
    let tmp = data_dir();
    let cfg = pair_cfg(&tmp);
    let m = TestBroker::start_with(cfg, tmp);
    let tmp = data_dir();
    let mut cfg = pair_cfg(&tmp);
    cfg.replication.role = Role::Slave;
    cfg.replication.master = Some(m.addr());
    let s = TestBroker::start_with(cfg, tmp);
    m.create_topic("wide", 8);
    wait_caught_up(&m);
    let mut acked = send_sync(&m.addr(), "wide", 8, 400);
    acked.sort();
    wait_caught_up(&m);
    let stats = Admin::connect(&m.addr()).unwrap().broker_stats().unwrap();
    assert_eq!(stats.len(), shards);
    assert!(
        stats.iter().all(|st| st.replication.peer_received > 0),
        "every shard replicated something: {stats:?}"
    );
    // Received acks: the slave has everything, durable soon after.
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_all(&s.addr(), "wide", 8) != acked {
        assert!(
            Instant::now() < deadline,
            "the slave's shards did not all catch up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let admin = Admin::connect(&s.addr()).unwrap();
    let epoch = admin.promote().unwrap();
    let stats = admin.broker_stats().unwrap();
    assert!(
        stats
            .iter()
            .all(|st| st.replication.role == 0 && st.replication.epoch == epoch),
        "{stats:?}"
    );
}

#[test]
fn a_follower_cannot_acknowledge_what_it_was_not_sent() {
    let m = master(ReplicationMode::SyncMaster);
    m.create_topic("f", 1);
    // Claims to have everything there will ever be, before anything was sent.
    let lie = ringmq::protocol::ReplAck {
        received: u64::MAX,
        durable: u64::MAX,
    }
    .to_frame(0);
    let sock = fake_follower(&m, &[lie]);
    let err = no_retries(&m.addr())
        .send("f", QueueSelector::Queue(0), &Message::new(&b"unacked"[..]))
        .unwrap_err();
    // FLUSH_SLAVE_TIMEOUT, or SLAVE_NOT_AVAILABLE if the silent fake was dropped first.
    assert!(
        matches!(
            remote_code(&err),
            Some(ErrorCode::FlushSlaveTimeout | ErrorCode::SlaveNotAvailable)
        ),
        "{err}"
    );
    assert!(read_all(&m.addr(), "f", 1).is_empty(), "not visible either");
    drop(sock);
}

/// `ringmq admin replication` / `admin promote`: the stable, machine-parsable lines.
#[test]
fn the_cli_reports_replication_and_promotes() {
    let run = |addr: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
            .args(["admin", "--broker", addr])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let m = master(ReplicationMode::AsyncMaster);
    let s = slave_of(&m);
    wait_caught_up(&m);
    let line = run(&m.addr(), &["replication"]);
    let fields: std::collections::HashMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(fields["shard"], "0", "{line}");
    assert_eq!(fields["role"], "master", "{line}");
    assert_eq!(fields["link"], "streaming", "{line}");
    assert_eq!(fields["lag_bytes"], "0", "{line}");
    assert!(run(&s.addr(), &["replication"]).contains("role=slave"));
    let promoted = run(&s.addr(), &["promote"]);
    assert!(promoted.starts_with("promoted: epoch "), "{promoted}");
    assert!(run(&s.addr(), &["replication"]).contains("role=master"));
}

fn log_end(addr: &str) -> u64 {
    Admin::connect(addr).unwrap().broker_stats().unwrap()[0]
        .replication
        .log_end
}

/// Issue 11 item 2: a master that hears of a newer epoch stops acking at once, pending acks
/// included, and names the newer master.
#[test]
fn a_follower_with_a_newer_epoch_fences_the_master_fails_its_pending_acks_and_closes_its_clients() {
    let m = master(ReplicationMode::SyncMaster);
    m.create_topic("fence", 1);
    // A follower that streams and never acknowledges: the next produce waits for it.
    let silent = fake_follower(&m, &[]);
    // A client connection opened before the fence: the superseded master closes it.
    let earlier =
        ringmq::client::connection::Connection::connect_timeout(&m.addr(), Duration::from_secs(2))
            .unwrap();
    let ping = ringmq::protocol::Request::Ping;
    earlier
        .call(&ping, bytes::Bytes::new(), Duration::from_secs(5))
        .expect("pong before the fence");
    let before = log_end(&m.addr());
    let addr = m.addr();
    // With retries: the broker closes this producer's connection too, and a retry on a new
    // connection must also get NOT_MASTER (without retries, a reply racing the close could
    // leave the client waiting out its request timeout instead).
    let pending = std::thread::spawn(move || {
        Producer::connect(&addr)
            .unwrap()
            .send(
                "fence",
                QueueSelector::Queue(0),
                &Message::new(&b"pending"[..]),
            )
            .unwrap_err()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while log_end(&m.addr()) == before {
        assert!(Instant::now() < deadline, "the produce was never appended");
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = follow_once(&m.addr(), &follow_request(1, 32 << 20, newer_epoch(&m))).unwrap_err();
    assert_eq!(
        remote_code(&err),
        Some(ErrorCode::ReplicationRefused),
        "{err}"
    );
    assert!(err.to_string().contains("superseded"), "{err}");
    // The waiting produce fails at once with NOT_MASTER, not after the 2 s replica timeout.
    let err = pending.join().unwrap();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    let err = no_retries(&m.addr())
        .send(
            "fence",
            QueueSelector::Queue(0),
            &Message::new(&b"later"[..]),
        )
        .unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    assert!(
        err.to_string().contains("the master is 127.0.0.1"),
        "names the newer master: {err}"
    );
    assert!(read_all(&m.addr(), "fence", 1).is_empty());
    // The connection from before the fence is closed by the broker (not answered any more).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match earlier.call(&ping, bytes::Bytes::new(), Duration::from_secs(5)) {
            Err(e) => {
                assert!(remote_code(&e).is_none(), "closed, not answered: {e}");
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "still open 10 s after the fence");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    drop(silent);
}

/// Issue 11 item 2: a master whose peer does not answer at start takes no writes (unless
/// --force-master) until the peer is heard from.
#[test]
fn a_master_that_cannot_reach_its_peer_starts_fenced_until_it_hears_from_it() {
    let tmp = data_dir();
    let mut cfg = master_cfg(ReplicationMode::AsyncMaster, tmp.path());
    // --force-master takes writes at once.
    let mut m = TestBroker::start_with(cfg.clone(), tmp);
    m.create_topic("ro", 1);
    // Without it, the same broker starts read-only.
    cfg.replication.force_master = false;
    m.reopen_as(cfg);
    let err = no_retries(&m.addr())
        .send("ro", QueueSelector::Queue(0), &Message::new(&b"x"[..]))
        .unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(err.to_string().contains("--force-master"), "{err}");
    let err = Admin::connect(&m.addr())
        .unwrap()
        .create_topic("other", 1)
        .unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    // Its peer (from this host, at an epoch no newer than ours) follows: writes are taken.
    let sock = fake_follower(&m, &[]);
    no_retries(&m.addr())
        .send("ro", QueueSelector::Queue(0), &Message::new(&b"x"[..]))
        .unwrap();
    drop(sock);
}

/// Issue 11 item 11a: only a configured slave may open a replication stream.
#[test]
fn only_the_configured_peer_may_open_a_replication_stream() {
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = CoreSelection::List(vec![0]);
    let lone = TestBroker::start_with(cfg, tmp);
    let err = follow_once(&lone.addr(), &follow_request(1, 32 << 20, 1)).unwrap_err();
    assert_eq!(
        remote_code(&err),
        Some(ErrorCode::ReplicationRefused),
        "{err}"
    );
    assert!(
        err.to_string().contains("no replication configured"),
        "{err}"
    );

    let tmp = data_dir();
    let mut cfg = master_cfg(ReplicationMode::AsyncMaster, tmp.path());
    cfg.replication.peer = Some("127.0.0.2:1".into());
    let other = TestBroker::start_with(cfg, tmp);
    let err = follow_once(&other.addr(), &follow_request(1, 32 << 20, 1)).unwrap_err();
    assert_eq!(
        remote_code(&err),
        Some(ErrorCode::ReplicationRefused),
        "{err}"
    );
    assert!(err.to_string().contains("only this master's peer"), "{err}");
    // Neither became a session.
    for b in [&lone, &other] {
        let stats = Admin::connect(&b.addr()).unwrap().broker_stats().unwrap();
        assert_eq!(stats[0].replication.connects, 0, "{stats:?}");
    }
}

/// Issue 11 item 4: at the handshake the master credits the follower with what it says is
/// durable, not with its appended end.
#[test]
fn the_handshake_credits_only_what_the_follower_says_is_durable() {
    let m = master(ReplicationMode::SyncMaster);
    m.create_topic("d", 1);
    let err = no_retries(&m.addr())
        .send("d", QueueSelector::Queue(0), &Message::new(&b"stored"[..]))
        .unwrap_err();
    assert_eq!(
        remote_code(&err),
        Some(ErrorCode::SlaveNotAvailable),
        "{err}"
    );
    let end = log_end(&m.addr());
    let epoch = Admin::connect(&m.addr())
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    // It has the whole log appended, nothing of it durable yet.
    let ack = ringmq::protocol::ReplAck {
        received: end,
        durable: 0,
    }
    .to_frame(0);
    let sock = fake_follower_with(&m, &follow_from(1, 32 << 20, epoch, end, 0), &[ack]);
    let r = Admin::connect(&m.addr()).unwrap().broker_stats().unwrap()[0].replication;
    assert_eq!((r.peer_received, r.peer_durable), (end, 0), "{r:?}");
    assert!(
        read_all(&m.addr(), "d", 1).is_empty(),
        "not durable on the slave"
    );
    drop(sock);
}

/// Issue 11 item 5: a slave serves reads only up to what the master confirmed.
#[test]
fn a_slave_serves_only_what_the_master_confirmed() {
    let tmp = data_dir();
    let mut cfg = master_cfg(ReplicationMode::AsyncMaster, tmp.path());
    // The master acks from memory and syncs only once 1 MiB is unflushed.
    cfg.storage.flush_mode = ringmq::storage::FlushMode::AsyncFlush;
    cfg.storage.flush_interval_ms = 600_000;
    cfg.storage.flush_bytes = 1 << 20;
    let m = TestBroker::start_with(cfg, tmp);
    let s = slave_of(&m);
    m.create_topic("c", 1);
    wait_caught_up(&m);
    send_sync(&m.addr(), "c", 1, 10);
    // The slave has all ten durable (it runs SYNC_FLUSH) ...
    let admin = Admin::connect(&m.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin.broker_stats().unwrap()[0].replication;
        if r.peer_durable == r.log_end {
            break;
        }
        assert!(Instant::now() < deadline, "the slave never synced: {r:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // ... but the master confirmed none of them (not durable there): the slave shows none.
    let on_slave = read_all(&s.addr(), "c", 1);
    assert!(
        on_slave.is_empty(),
        "phantom reads on the slave: {on_slave:?}"
    );
    // 1.5 MiB more makes the master sync; its confirmed position reaches the slave.
    let producer = Producer::connect(&m.addr()).unwrap();
    for _ in 0..400 {
        producer
            .send("c", QueueSelector::Queue(0), &Message::new(vec![1u8; 4000]))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let on_master = read_all(&m.addr(), "c", 1);
        if !on_master.is_empty() && read_all(&s.addr(), "c", 1) == on_master {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slave never showed what was confirmed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 11 item 3: a SYNC_MASTER master restarted shows only what its slave had confirmed,
/// not its whole log.
#[test]
fn a_restarted_sync_master_shows_only_what_its_slave_confirmed() {
    let tmp = data_dir();
    let cfg = master_cfg(ReplicationMode::SyncMaster, tmp.path());
    let mut m = TestBroker::start_with(cfg, tmp);
    let s = slave_of(&m);
    m.create_topic("v", 1);
    wait_caught_up(&m);
    let mut acked = send_sync(&m.addr(), "v", 1, 50);
    acked.sort();
    drop(s);
    let admin = Admin::connect(&m.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin.broker_stats().unwrap()[0].replication.link != 0 {
        assert!(Instant::now() < deadline, "the slave's session never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..3 {
        let err = no_retries(&m.addr())
            .send(
                "v",
                QueueSelector::Queue(0),
                &Message::new(format!("unreplicated-{i}").into_bytes()),
            )
            .unwrap_err();
        assert_eq!(
            remote_code(&err),
            Some(ErrorCode::SlaveNotAvailable),
            "{err}"
        );
    }
    assert_eq!(read_all(&m.addr(), "v", 1), acked);
    m.restart();
    assert_eq!(read_all(&m.addr(), "v", 1), acked, "after the restart");
}

/// Issue 11 item 11b: promoting a master changes nothing and says so without a warning.
#[test]
fn a_no_op_promote_logs_no_promotion_warning() {
    use std::io::{BufRead, BufReader};
    let tmp = data_dir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args([
            "broker",
            "--metrics-listen",
            "off",
            "--port",
            "0",
            "--cores",
            "1",
            "--segment-bytes",
            "33554432",
        ])
        .arg("--data-dir")
        .arg(tmp.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the broker printed its address")
            .unwrap();
        if let Some(a) = line.strip_prefix("shard 0 listening on ") {
            break a.trim().to_string();
        }
    };
    let admin = Admin::connect(&addr).unwrap();
    let epoch = admin.broker_info().unwrap().epoch;
    assert_eq!(admin.promote().unwrap(), epoch);
    assert_eq!(admin.promote().unwrap(), epoch);
    drop(admin);
    // SAFETY: kill with our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    child.wait().unwrap();
    let log = rest.join("\n");
    assert!(log.contains("already master"), "{log}");
    assert!(!log.contains("promoted to master"), "{log}");
}

/// Issue 11 item 2: a slave promoted while it lags behind an epoch it adopted from its master
/// starts its own epoch at its own log end, so the old master, rejoining as its slave, drops
/// exactly what the new master does not have and ends with the same log.
#[test]
fn a_promoted_lagging_slave_starts_its_epoch_at_its_own_log_end() {
    let tmp_m = data_dir();
    let mut mcfg = master_cfg(ReplicationMode::AsyncMaster, tmp_m.path());
    // A slave that is behind is fed slowly, so it is still behind when promoted.
    mcfg.replication.replica_catchup_bytes_per_sec = 1 << 20;
    let mut m = TestBroker::start_with(mcfg, tmp_m);
    let tmp_s = data_dir();
    let mut scfg = test_config(tmp_s.path());
    scfg.server.cores = CoreSelection::List(vec![core_for_slave()]);
    scfg.replication.role = Role::Slave;
    scfg.replication.master = Some(m.addr());
    let mut s = TestBroker::start_with(scfg.clone(), tmp_s);
    m.create_topic("lag", 1);
    send_sync(&m.addr(), "lag", 1, 10);
    wait_caught_up(&m);
    s.stop();

    // While the slave is away: a backlog, a master restart (a new epoch at its end), more.
    let producer = Producer::connect(&m.addr()).unwrap();
    for i in 0..4000u32 {
        producer
            .send_async(
                "lag",
                QueueSelector::Queue(0),
                &Message::new(format!("backlog-{i}-{}", "b".repeat(4000)).into_bytes()),
                |r| {
                    r.expect("acked");
                },
            )
            .unwrap();
    }
    producer.flush();
    drop(producer);
    m.restart();
    send_sync(&m.addr(), "lag", 1, 5);

    // The slave comes back, adopts the master's history and is promoted while far behind.
    scfg.replication.master = Some(m.addr());
    s.reopen_as(scfg);
    let admin = Admin::connect(&m.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin.broker_stats().unwrap()[0].replication.link != 2 {
        assert!(Instant::now() < deadline, "the slave never followed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sadmin = Admin::connect(&s.addr()).unwrap();
    sadmin.promote().unwrap();
    let behind = sadmin.broker_stats().unwrap()[0].replication.log_end;
    assert!(
        behind < log_end(&m.addr()),
        "the slave was not behind when promoted ({behind})"
    );
    send_sync(&s.addr(), "lag", 1, 20);

    // The old master rejoins as the new master's slave.
    m.stop();
    let mut old_cfg = test_config(&m.dir);
    old_cfg.server.cores = CoreSelection::List(vec![0]);
    old_cfg.replication.role = Role::Slave;
    old_cfg.replication.master = Some(s.addr());
    m.reopen_as(old_cfg);
    wait_caught_up(&s);
    let on_new = read_all(&s.addr(), "lag", 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let on_old = read_all(&m.addr(), "lag", 1);
        if on_old == on_new {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the logs differ: the old master has {} messages, the new one {}",
            on_old.len(),
            on_new.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lag's age comes from the store's append announcements: every append the slave lacks
/// is dated when it was stored, so a slave that went away shows a lag at least as old as the
/// time since the first record it missed.
#[test]
fn a_gone_slave_shows_a_lag_as_old_as_the_first_record_it_missed() {
    let m = master(ReplicationMode::AsyncMaster);
    Admin::connect(&m.addr())
        .unwrap()
        .create_topic("aged", 1)
        .unwrap();
    let s = slave_of(&m);
    send_sync(&m.addr(), "aged", 1, 10);
    wait_caught_up(&m);
    drop(s);
    send_sync(&m.addr(), "aged", 1, 10);
    let missed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let stats = Admin::connect(&m.addr()).unwrap().broker_stats().unwrap();
    let waited_ms = missed_at.elapsed().as_millis() as u64;
    let lag = &stats[0].replication;
    assert!(lag.lag_bytes > 0, "{stats:?}");
    assert!(
        lag.lag_ms >= 500 && lag.lag_ms <= waited_ms + 5_000,
        "lag {} ms after waiting {waited_ms} ms: {stats:?}",
        lag.lag_ms
    );
}

/// One produce of one message on queue 0 of `topic`, saying the client has seen `known_epoch`.
fn produce_reporting(addr: &str, topic: &str, known_epoch: u64) -> Result<(), ClientError> {
    common::produce_one(addr, topic, 0, known_epoch)
}

/// Issue 11 item 2, a client's report: a produce saying the client has seen a newer master's
/// acks fences this master (read-only) until its peer says which broker is the master; with
/// the peer unreachable (a partition) it stays read-only instead of acking on.
#[test]
fn a_client_that_has_seen_a_newer_epoch_fences_the_master_until_its_peer_answers() {
    let m = master(ReplicationMode::AsyncMaster);
    Admin::connect(&m.addr())
        .unwrap()
        .create_topic("told", 1)
        .unwrap();
    let ours = Admin::connect(&m.addr())
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    // A report of our own epoch (or none) changes nothing.
    produce_reporting(&m.addr(), "told", ours).expect("own epoch: acked");
    produce_reporting(&m.addr(), "told", 0).expect("no report: acked");
    let err = produce_reporting(&m.addr(), "told", newer_epoch(&m)).unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    assert!(err.to_string().contains("a client has seen"), "{err}");
    // The peer (127.0.0.1:1) never answers: still read-only for a client that reports nothing.
    std::thread::sleep(Duration::from_millis(1500));
    let err = produce_reporting(&m.addr(), "told", 0).unwrap_err();
    assert_eq!(remote_code(&err), Some(ErrorCode::NotMaster), "{err}");
    assert_eq!(
        read_all(&m.addr(), "told", 1).len(),
        2,
        "only the two acked"
    );
}

/// A topic grown on the master grows on its slave too (the topic sync copies the count), and
/// the messages of the new queues replicate.
#[test]
fn a_slave_follows_a_topic_that_grew_on_its_master() {
    let m = master(ReplicationMode::AsyncMaster);
    m.create_topic("grow", 1);
    let s = slave_of(&m);
    send_sync(&m.addr(), "grow", 1, 3);
    wait_caught_up(&m);
    Admin::connect(&m.addr())
        .unwrap()
        .alter_topic("grow", 3)
        .unwrap();
    let sent = send_sync(&m.addr(), "grow", 3, 9);
    wait_caught_up(&m);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let queues = Admin::connect(&s.addr())
            .unwrap()
            .route("grow")
            .map(|r| r.queues.len())
            .unwrap_or(0);
        if queues == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slave has {queues} queues"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let on_slave = read_all(&s.addr(), "grow", 3);
    for msg in &sent {
        assert!(on_slave.contains(msg), "{msg:?} missing on the slave");
    }
    assert!(on_slave.iter().any(|(q, _, _)| *q == 2));
}

/// Issue 14: a slave that was away while its master's retention deleted everything past the
/// slave's log end starts over at the master's oldest segment (an empty log there) instead of
/// asking, again and again, for bytes the master no longer has; it then serves what the master
/// keeps, at the master's offsets, and follows on.
#[test]
fn a_slave_behind_the_masters_oldest_segment_starts_over_there() {
    const SEGMENT: u64 = 64 << 10;
    let tmp = data_dir();
    let mut cfg = master_cfg(ReplicationMode::AsyncMaster, tmp.path());
    cfg.storage.segment_bytes = SEGMENT;
    cfg.storage.retention_bytes = 4 * SEGMENT;
    let m = TestBroker::start_with(cfg, tmp);
    m.create_topic("kept", 1);
    let stmp = data_dir();
    let mut scfg = test_config(stmp.path());
    scfg.server.cores = CoreSelection::List(vec![core_for_slave()]);
    scfg.replication.role = Role::Slave;
    scfg.replication.master = Some(m.addr());
    scfg.storage.segment_bytes = SEGMENT;
    let mut s = TestBroker::start_with(scfg, stmp);
    let body = |i: u32| format!("{i:06}-{}", "x".repeat(2000)).into_bytes();
    let p = Producer::connect(&m.addr()).unwrap();
    let send = |range: std::ops::Range<u32>| {
        for i in range {
            p.send("kept", QueueSelector::Queue(0), &Message::new(body(i)))
                .unwrap();
        }
    };
    send(0..20);
    wait_caught_up(&m);
    let slave_end = log_end(&s.addr());
    s.stop();
    // ~2 MB: 30 segments, of which retention keeps about 4.
    send(20..1000);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let oldest = loop {
        let st = Admin::connect(&m.addr())
            .unwrap()
            .queue_stats("kept")
            .unwrap();
        if st[0].min_offset > 20 {
            break st[0].min_offset;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention kept everything"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    s.restart();
    send(1000..1010);
    wait_caught_up(&m);
    assert!(log_end(&s.addr()) > slave_end + 4 * SEGMENT);
    let min_of =
        |addr: &str| Admin::connect(addr).unwrap().queue_stats("kept").unwrap()[0].min_offset;
    // `None` when retention dropped `offset` meanwhile (both brokers run it on a timer).
    let read_from = |addr: &str, mut offset: u64| {
        let c = Consumer::connect(addr).unwrap();
        let mut out = Vec::new();
        loop {
            let f = match c.fetch("kept", 0, offset, Duration::ZERO) {
                Ok(f) => f,
                Err(e) if e.code() == Some(ringmq::protocol::ErrorCode::OffsetOutOfRange) => {
                    return None
                }
                Err(e) => panic!("fetch: {e}"),
            };
            if f.messages.is_empty() {
                return Some(out);
            }
            out.extend(f.messages.iter().map(|m| (m.offset, m.payload.to_vec())));
            offset = f.next_offset;
        }
    };
    let mut attempts = 0;
    let (on_master, on_slave) = loop {
        let (master_min, slave_min) = (min_of(&m.addr()), min_of(&s.addr()));
        assert!(
            slave_min >= oldest,
            "the slave starts at {slave_min}: the master kept {oldest} then, {master_min} now"
        );
        let from = master_min.max(slave_min);
        if let (Some(a), Some(b)) = (read_from(&m.addr(), from), read_from(&s.addr(), from)) {
            break (a, b);
        }
        attempts += 1;
        assert!(attempts < 20, "retention kept moving the oldest offset");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(on_slave, on_master, "the slave holds what the master keeps");
    assert_eq!(on_slave.last().unwrap().1, body(1009));
}

/// Issue 14: a topic deleted on the master is deleted on its slave, through the record the
/// master's topic log holds (the slave's copy of the master's topic list only ever adds), and
/// stays deleted when the slave is promoted.
#[test]
fn a_slave_follows_a_topic_deleted_on_its_master_and_keeps_it_deleted_as_master() {
    let m = master(ReplicationMode::AsyncMaster);
    m.create_topic("doomed", 2);
    m.create_topic("kept", 1);
    let s = slave_of(&m);
    send_sync(&m.addr(), "doomed", 2, 4);
    let kept = send_sync(&m.addr(), "kept", 1, 3);
    wait_caught_up(&m);
    let on_slave = |topic: &str| {
        Admin::connect(&s.addr())
            .unwrap()
            .list_topics()
            .unwrap()
            .iter()
            .any(|t| t.name == topic)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !on_slave("doomed") {
        assert!(Instant::now() < deadline, "the slave never had the topic");
        std::thread::sleep(Duration::from_millis(20));
    }
    Admin::connect(&m.addr())
        .unwrap()
        .delete_topic("doomed")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_slave("doomed") {
        assert!(
            Instant::now() < deadline,
            "the slave still lists the topic its master deleted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = Consumer::connect(&s.addr()).unwrap();
    let e = c
        .fetch("doomed", 0, 0, Duration::from_millis(10))
        .unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::TopicNotFound), "{e}");

    // Promoted, it keeps the deletion, and the other topic's messages.
    Admin::connect(&s.addr()).unwrap().promote().unwrap();
    let e = no_retries(&s.addr())
        .send("doomed", QueueSelector::Queue(0), &Message::new("late"))
        .unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::TopicNotFound), "{e}");
    let e = Admin::connect(&s.addr())
        .unwrap()
        .create_topic("doomed", 2)
        .unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::TopicExists), "{e}");
    let read = read_all(&s.addr(), "kept", 1);
    assert_eq!(read, kept);
}
