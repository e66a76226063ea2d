//! What one connection may make the broker hold, over real sockets on 127.0.0.1: fetches are
//! capped, a client that never reads its responses stops being read, a half-sent frame costs
//! what it has sent, and a frame trickled in byte by byte is cut off at its deadline.
//!
//! The memory figures come from the broker's per-listener counters
//! (`ringmq::server::bounds::stats_of`), which measure the outbox and the read buffer directly,
//! apart from the budget that is meant to bound them.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{data_dir, test_config, TestBroker};
use ringmq::client::{Admin, Consumer, Producer, QueueSelector};
use ringmq::format::batch::Message;
use ringmq::protocol::limits::MAX_FETCH_BYTES;
use ringmq::protocol::{FetchRequest, Frame, Request, MAX_BODY_BYTES, PREAMBLE_BYTES};
use ringmq::server::bounds::{stats_of, ServerStatsSnapshot};

const MIB: usize = 1 << 20;

fn stats(addr: &str) -> ServerStatsSnapshot {
    let addr: SocketAddr = addr.parse().unwrap();
    stats_of(addr).expect("the listener is running in this process")
}

/// A one-queue topic holding `mib` messages of 1 MiB each.
fn topic_with(b: &TestBroker, mib: usize) {
    b.create_topic("t", 1);
    let p = Producer::connect(&b.addr()).unwrap();
    let payload = Bytes::from(vec![b'm'; MIB]);
    for _ in 0..mib {
        p.send("t", QueueSelector::Queue(0), &Message::new(payload.clone()))
            .unwrap();
    }
}

fn fetch_frame(request_id: u64, max_bytes: u32) -> Vec<u8> {
    let req = Request::Fetch(FetchRequest {
        topic: "t".into(),
        queue: 0,
        offset: 0,
        max_bytes,
        max_wait_ms: 0,
        group: None,
    });
    let mut out = BytesMut::new();
    req.to_frame(request_id, Bytes::new()).encode(&mut out);
    out.to_vec()
}

/// Whether the broker has closed `s` (EOF or reset), without blocking.
fn closed_by_broker(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match s.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn a_fetch_asking_for_a_gibibyte_gets_at_most_the_cap() {
    let b = TestBroker::start();
    topic_with(&b, 12);
    let mut c = Consumer::connect(&b.addr()).unwrap();
    c.max_bytes = 1 << 30;
    let f = c.fetch("t", 0, 0, Duration::ZERO).unwrap();
    let bytes: usize = f.messages.iter().map(|m| m.payload.len()).sum();
    assert!(!f.messages.is_empty(), "a capped fetch still returns data");
    assert!(
        bytes <= MAX_FETCH_BYTES as usize,
        "a fetch asking for 1 GiB returned {bytes} bytes of payload; the cap is {MAX_FETCH_BYTES}"
    );
    assert!(f.next_offset < 12, "the rest is left for the next fetch");
}

#[test]
fn a_client_that_never_reads_its_responses_holds_at_most_its_budget() {
    const BUDGET_BYTES: u64 = 32 << 20;
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.max_inflight_bytes_per_connection = BUDGET_BYTES;
    let b = TestBroker::start_with(cfg, tmp);
    topic_with(&b, 4);
    // 100 fetches of the whole 4 MiB queue: 400 MiB of answers if the broker kept reading.
    const FETCHES: u64 = 100;
    let before = stats(&b.addr()).requests_handled;
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let requests: Vec<u8> = (1..=FETCHES)
        .flat_map(|id| fetch_frame(id, u32::MAX))
        .collect();
    s.write_all(&requests).unwrap();

    // Wait for the broker to settle: either its reader is stopped for the budget with nothing
    // left in flight (what must happen), or it has handled every request (it kept reading).
    // The deadline only keeps a broken broker from hanging the test.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = stats(&b.addr());
        let stopped = st.readers_waiting == 1 && st.requests_in_flight == 0;
        if stopped || st.requests_handled >= before + FETCHES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker neither stopped reading nor handled every request: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = stats(&b.addr());
    assert!(
        st.outbox_bytes_max <= BUDGET_BYTES,
        "the broker buffered {} response bytes for a client that does not read; the budget is \
         {BUDGET_BYTES}: {st:?}",
        st.outbox_bytes_max
    );
    assert!(st.budget_bytes_max <= BUDGET_BYTES, "{st:?}");

    // Backpressure loses nothing: once the client reads, every fetch is answered.
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut answered = 0;
    while answered < FETCHES {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {answered} answers");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(f) = Frame::decode(&mut buf).unwrap() {
            assert_eq!(f.status, 0, "{f:?}");
            assert!(f.body.len() >= 4 * MIB, "every answer has the whole queue");
            answered += 1;
        }
    }
    let st = stats(&b.addr());
    assert!(st.outbox_bytes_max <= BUDGET_BYTES, "{st:?}");
}

#[test]
fn a_half_sent_frame_reserves_only_what_has_arrived() {
    let b = TestBroker::start();
    let mut frame = Request::ListTopics.to_frame(5, Bytes::new());
    frame.body = Bytes::from(vec![0u8; MAX_BODY_BYTES as usize]);
    let mut bytes = BytesMut::new();
    frame.encode(&mut bytes);
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The preamble announces 16 MiB; only 1 KiB of it comes.
    s.write_all(&bytes[..PREAMBLE_BYTES + 1024]).unwrap();
    let mut sink = [0u8; 64];
    // test_config's partial_frame_timeout_ms (300) closes it; then the broker has read it all.
    while !matches!(s.read(&mut sink), Ok(0) | Err(_)) {}
    let st = stats(&b.addr());
    assert_eq!(st.partial_frame_timeouts, 1, "{st:?}");
    assert!(
        st.read_buffer_bytes_max <= 512 << 10,
        "1 KiB of a frame announcing 16 MiB made the broker reserve {} bytes",
        st.read_buffer_bytes_max
    );
}

#[test]
fn a_trickled_frame_is_closed_at_its_deadline_although_bytes_keep_arriving() {
    // test_config: partial_frame_timeout_ms = 300. One byte every 50 ms would keep an idle
    // timeout that restarts on every read from ever firing.
    let b = TestBroker::start();
    let mut frame = Request::ListTopics.to_frame(7, Bytes::new());
    frame.body = Bytes::from(vec![0u8; 100_000]);
    let mut bytes = BytesMut::new();
    frame.encode(&mut bytes);
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.write_all(&bytes[..PREAMBLE_BYTES]).unwrap();
    const MAX_TRICKLED: usize = 400; // 20 s at one byte per 50 ms: 66 deadlines' worth
    let mut trickled = 0;
    let mut closed = false;
    while trickled < MAX_TRICKLED {
        std::thread::sleep(Duration::from_millis(50));
        if closed_by_broker(&mut s) {
            closed = true;
            break;
        }
        if s.write_all(&bytes[PREAMBLE_BYTES + trickled..][..1])
            .is_err()
        {
            closed = true;
            break;
        }
        trickled += 1;
    }
    assert!(
        closed,
        "the broker kept a frame open for {trickled} trickled bytes ({} s)",
        trickled / 20
    );
    assert_eq!(stats(&b.addr()).partial_frame_timeouts, 1);
    Admin::connect(&b.addr()).unwrap().ping().unwrap();
}

#[test]
fn many_clients_that_never_read_hold_at_most_the_shard_budget_and_a_producer_still_gets_acks() {
    // One shard, so the producer below talks to the shard the non-readers fill.
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = ringmq::config::CoreSelection::Count(1);
    let shard_budget = cfg.server.shard_inflight_bytes;
    let b = TestBroker::start_with(cfg, tmp);
    topic_with(&b, 8);
    // Each connection may hold 64 MiB (7 fetches of 8 MiB): 24 of them would hold ~1.3 GiB
    // of unread answers if only the per-connection budgets bounded them.
    const CONNECTIONS: u64 = 24;
    const FETCHES: u64 = 20;
    let before = stats(&b.addr()).requests_handled;
    let requests: Vec<u8> = (1..=FETCHES)
        .flat_map(|id| fetch_frame(id, u32::MAX))
        .collect();
    let conns: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let mut s = TcpStream::connect(b.addr()).unwrap();
            s.write_all(&requests).unwrap();
            s
        })
        .collect();
    // Settle: every fetch connection's reader is stopped (by its own budget or the shard's)
    // with nothing in flight, or every fetch was handled. The deadline only keeps a broken
    // broker from hanging the test.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = stats(&b.addr());
        let stopped = st.requests_in_flight == 0
            && st.readers_waiting + st.shard_readers_waiting == CONNECTIONS;
        if stopped || st.requests_handled >= before + CONNECTIONS * FETCHES {
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A well-behaved producer on another connection is still acked.
    let p = Producer::connect(&b.addr()).unwrap();
    for _ in 0..20 {
        p.send(
            "t",
            QueueSelector::Queue(0),
            &Message::new(vec![b'w'; 1024]),
        )
        .expect("a producer is acked while non-readers hold the shard's budget");
    }
    let st = stats(&b.addr());
    assert!(
        st.outbox_total_bytes_max <= shard_budget,
        "the shard held {} unread response bytes; its budget is {shard_budget}: {st:?}",
        st.outbox_total_bytes_max
    );
    assert!(
        st.shard_waits > 0,
        "the shard budget was never reached: {st:?}"
    );
    drop(conns);
}
