//! Produce and consume end to end over 127.0.0.1 with an in-process broker.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TestBroker;
use ringmq::client::{Admin, Connection, Consumer, Producer, QueueSelector, StartFrom};
use ringmq::format::batch::{BatchBuilder, Message};
use ringmq::protocol::{ErrorCode, FetchRequest, ProduceRequest, Request, Response};

fn drain_all(consumer: &Consumer, topic: &str, queues: u32) -> BTreeMap<(u32, u64), Bytes> {
    let mut seen = BTreeMap::new();
    for q in 0..queues {
        let mut offset = 0;
        loop {
            let f = consumer.fetch(topic, q, offset, Duration::ZERO).unwrap();
            for m in f.messages {
                assert_eq!(m.offset, offset, "queue {q}: gap or reorder");
                assert!(seen.insert((q, m.offset), m.payload).is_none());
                offset += 1;
            }
            if offset >= f.end_offset {
                break;
            }
        }
    }
    seen
}

/// A broker with topic "t" of `queues` queues holding messages 0..count, message i (its
/// number right-aligned in 200 bytes) at queue i % queues, offset i / queues. One record per
/// message (sync sends), so a small max_bytes makes small answers.
fn broker_with_numbered_messages(queues: u32, count: u32) -> TestBroker {
    let b = TestBroker::start();
    b.create_topic("t", queues);
    let p = Producer::connect(&b.addr()).unwrap();
    for i in 0..count {
        let m = Message::new(format!("{i:>200}"));
        p.send("t", QueueSelector::Queue(i % queues), &m).unwrap();
    }
    b
}

#[test]
fn sync_send_is_readable_at_its_acked_offset() {
    let b = TestBroker::start();
    b.create_topic("t", 4);
    let p = Producer::connect(&b.addr()).unwrap();
    let mut acked = Vec::new();
    for i in 0..50 {
        let r = p
            .send(
                "t",
                QueueSelector::RoundRobin,
                &Message::new(format!("m{i}")),
            )
            .unwrap();
        assert!(!r.duplicate);
        acked.push((r.queue, r.offset, format!("m{i}")));
    }
    let c = Consumer::connect(&b.addr()).unwrap();
    let seen = drain_all(&c, "t", 4);
    assert_eq!(seen.len(), 50);
    for (q, o, payload) in acked {
        assert_eq!(seen[&(q, o)], payload.as_bytes());
    }
}

#[test]
fn pipelined_async_producer_with_10k_in_flight_loses_and_duplicates_nothing() {
    let b = TestBroker::start();
    b.create_topic("t", 8);
    let p = Producer::connect(&b.addr()).unwrap();
    let acks = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    for i in 0..10_000u32 {
        let (acks, errors) = (acks.clone(), errors.clone());
        p.send_async(
            "t",
            QueueSelector::RoundRobin,
            &Message::new(format!("{i}")),
            move |r| match r {
                Ok(r) => acks.lock().unwrap().push((r.queue, r.offset, i)),
                Err(e) => errors.lock().unwrap().push(e.to_string()),
            },
        )
        .unwrap();
    }
    p.flush();
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    let acks = acks.lock().unwrap().clone();
    assert_eq!(acks.len(), 10_000);
    let c = Consumer::connect(&b.addr()).unwrap();
    let seen = drain_all(&c, "t", 8);
    assert_eq!(seen.len(), 10_000);
    for (q, o, i) in acks {
        assert_eq!(seen[&(q, o)], i.to_string().as_bytes());
    }
    // In order per queue: the payload numbers on each queue only grow (round robin).
    for q in 0..8 {
        let nums: Vec<u32> = seen
            .range((q, 0)..(q + 1, 0))
            .map(|(_, v)| std::str::from_utf8(v).unwrap().parse().unwrap())
            .collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "queue {q} out of order"
        );
    }
}

#[test]
fn oneway_sends_arrive() {
    let b = TestBroker::start();
    b.create_topic("t", 1);
    let p = Producer::connect(&b.addr()).unwrap();
    for i in 0..100 {
        p.send_oneway("t", QueueSelector::Queue(0), &Message::new(format!("{i}")))
            .unwrap();
    }
    let c = Consumer::connect(&b.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    let mut offset = 0;
    while got < 100 && Instant::now() < deadline {
        let f = c.fetch("t", 0, offset, Duration::from_millis(200)).unwrap();
        got += f.messages.len();
        offset = f.next_offset;
    }
    assert_eq!(got, 100);
}

/// Sends one batch with explicit idempotence fields over a raw connection.
fn produce_raw(
    conn: &Connection,
    producer_id: u64,
    seq: u32,
    payload: &str,
) -> Result<(u32, u64, bool), ringmq::client::ClientError> {
    let (req, body) = idempotent_batch(producer_id, seq, 1, payload.as_bytes());
    match conn.call(&req, body, Duration::from_secs(10))?.0 {
        Response::Produced(a) => Ok((a.queue, a.base_offset, a.duplicate)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retried_batch_is_stored_once_even_after_a_restart() {
    let mut b = TestBroker::start();
    b.create_topic("t", 1);
    let owner = Admin::connect(&b.addr())
        .unwrap()
        .route("t")
        .unwrap()
        .queues[0]
        .address
        .clone();
    let first = {
        let conn = Connection::connect(&owner).unwrap();
        let first = produce_raw(&conn, 42, 0, "a").unwrap();
        assert!(!first.2);
        let again = produce_raw(&conn, 42, 0, "a").unwrap();
        assert_eq!((again.0, again.1, again.2), (first.0, first.1, true));
        first
    };
    b.restart();
    let owner = Admin::connect(&b.addr())
        .unwrap()
        .route("t")
        .unwrap()
        .queues[0]
        .address
        .clone();
    let conn = Connection::connect(&owner).unwrap();
    let after = produce_raw(&conn, 42, 0, "a").unwrap();
    assert_eq!(
        (after.1, after.2),
        (first.1, true),
        "de-dup window rebuilt from the log"
    );
    // A gap in the sequence is refused clearly, with a retriable code.
    let gap = produce_raw(&conn, 42, 5, "b").unwrap_err();
    assert_eq!(gap.code(), Some(ErrorCode::SequenceGap));
    assert!(gap.is_retriable());
    let next = produce_raw(&conn, 42, 1, "b").unwrap();
    assert_eq!(next.1, first.1 + 1);
    let c = Consumer::connect(&b.addr()).unwrap();
    let seen = drain_all(&c, "t", 1);
    assert_eq!(
        seen.values().cloned().collect::<Vec<_>>(),
        vec![Bytes::from("a"), Bytes::from("b")]
    );
}

#[test]
fn long_poll_wakes_on_new_data_well_before_its_deadline() {
    // No race with the clock: the fetch is parked before the data exists (a Ping sent after
    // it on the same connection is answered first, and requests are dispatched in order), it
    // asks to wait the longest a broker allows (30 s), and it must come back with the message
    // long before that: the client gives up after 20 s, which only a broker that never wakes
    // the poll can reach.
    let b = TestBroker::start();
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.create_topic("t", 1).unwrap();
    let owner = admin.route("t").unwrap().queues[0].address.clone();
    let conn = Connection::connect(&owner).unwrap();
    let fetch = conn
        .send(
            &Request::Fetch(FetchRequest {
                topic: "t".into(),
                queue: 0,
                offset: 0,
                max_bytes: 1 << 20,
                max_wait_ms: 30_000,
                group: None,
            }),
            Bytes::new(),
        )
        .unwrap();
    let pong = conn.send(&Request::Ping, Bytes::new()).unwrap();
    assert_eq!(
        pong.wait(Duration::from_secs(10)).unwrap().0,
        Response::Pong
    );
    Producer::connect(&b.addr())
        .unwrap()
        .send("t", QueueSelector::Queue(0), &Message::new("late"))
        .unwrap();
    let (response, body) = fetch.wait(Duration::from_secs(20)).unwrap();
    let Response::Fetched(header) = response else {
        panic!("expected Fetched, got {response:?}");
    };
    assert_eq!(
        header.next_offset, 1,
        "the poll returned without the message"
    );
    assert!(!body.is_empty());
}

#[test]
fn fetch_past_the_end_waits_and_then_returns_empty() {
    let b = TestBroker::start();
    b.create_topic("t", 1);
    let c = Consumer::connect(&b.addr()).unwrap();
    let start = Instant::now();
    let f = c.fetch("t", 0, 0, Duration::from_millis(300)).unwrap();
    assert!(f.messages.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(250));
}

/// A response body of 64 KiB or more leaves the broker from its own buffer, behind the
/// responses encoded before it and ahead of those after: pipelined large and small answers on
/// one connection all arrive whole, each to its own request.
#[test]
fn large_and_small_answers_pipelined_on_one_connection_arrive_whole() {
    let b = TestBroker::start();
    b.create_topic("t", 2);
    let p = Producer::connect(&b.addr()).unwrap();
    for i in 0..400u32 {
        let q = u32::from(i % 40 == 0);
        p.send(
            "t",
            QueueSelector::Queue(q),
            &Message::new(format!("{i:>1000}")),
        )
        .unwrap();
    }
    let mut c = Consumer::connect(&b.addr()).unwrap();
    c.max_bytes = 256 << 10;
    c.read_ahead = false;
    let wanted = [(0, 0), (1, 0), (0, 100), (1, 3), (0, 200), (1, 0)];
    for _ in 0..5 {
        let fetched = c.fetch_all("t", &wanted, Duration::ZERO);
        for (&(queue, offset), f) in wanted.iter().zip(fetched) {
            let f = f.unwrap();
            let expect = if queue == 0 { 390 } else { 10 };
            assert!(!f.messages.is_empty());
            assert!(
                queue == 1 || f.messages.len() > 64,
                "{} messages",
                f.messages.len()
            );
            for (k, m) in f.messages.iter().enumerate() {
                assert_eq!((m.queue, m.offset), (queue, offset + k as u64));
                let i: u32 = std::str::from_utf8(&m.payload)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                assert_eq!(u32::from(i % 40 == 0), queue);
            }
            assert_eq!(f.end_offset, expect);
        }
    }
}

/// `Consumer::read_ahead` (the default) sends a queue's next fetch while the caller reads an
/// answer. A caller that then asks for another offset (back to an earlier one, or past the
/// next) gets what it asked for, never the answer read ahead; reading on gives every message
/// once, in order.
#[test]
fn fetch_all_reading_ahead_answers_the_offset_asked_after_a_seek() {
    let b = broker_with_numbered_messages(2, 200);
    let mut c = Consumer::connect(&b.addr()).unwrap();
    assert!(c.read_ahead, "on by default");
    c.max_bytes = 1 << 10; // a few messages per answer, more behind each
    let first = |f: &ringmq::client::consumer::Fetched| f.messages.first().map(|m| m.offset);
    let round = c.fetch_all("t", &[(0, 0), (1, 0)], Duration::ZERO);
    let n0 = round[0].as_ref().unwrap().next_offset;
    let n1 = round[1].as_ref().unwrap().next_offset;
    assert!(n0 > 0 && n0 < 100 && n1 > 0 && n1 < 100, "{n0} {n1}");
    // Read ahead: (0, n0) and (1, n1). Ask for queue 0 from the start again and skip queue 1
    // past its next answer.
    let skip = n1 + 3;
    let round = c.fetch_all("t", &[(0, 0), (1, skip)], Duration::ZERO);
    assert_eq!(
        first(round[0].as_ref().unwrap()),
        Some(0),
        "queue 0 seeks back"
    );
    assert_eq!(
        first(round[1].as_ref().unwrap()),
        Some(skip),
        "queue 1 skips"
    );
    let mut wanted = vec![(0u32, 0u64), (1, skip)];
    let mut seen: BTreeMap<(u32, u64), Bytes> = BTreeMap::new();
    let mut rounds = 0;
    while wanted.iter().any(|&(_, o)| o < 100) {
        rounds += 1;
        assert!(rounds < 1_000, "no progress: {wanted:?}");
        let fetched = c.fetch_all("t", &wanted, Duration::ZERO);
        for ((queue, offset), f) in wanted.iter_mut().zip(fetched) {
            for m in f.unwrap().messages {
                assert_eq!(m.offset, *offset, "queue {queue}: gap or reorder");
                assert!(seen.insert((m.queue, m.offset), m.payload).is_none());
                *offset += 1;
            }
        }
    }
    assert_eq!(seen.len(), 100 + (100 - skip as usize));
    for ((q, o), payload) in &seen {
        let i: u64 = std::str::from_utf8(payload)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!((i % 2, i / 2), (u64::from(*q), *o));
    }
}

#[test]
fn fetch_all_answers_every_queue_in_the_order_asked_and_keeps_a_bad_fetchs_error_its_own() {
    let b = broker_with_numbered_messages(4, 400);
    let mut c = Consumer::connect(&b.addr()).unwrap();
    // Small answers: many rounds, each with every fetch in flight.
    c.max_bytes = 1 << 10;
    // Queue 7 does not exist: its fetch fails alone.
    let mut wanted: Vec<(u32, u64)> = vec![(3, 0), (7, 0), (1, 0), (0, 0), (2, 0)];
    let mut seen: BTreeMap<(u32, u64), Bytes> = BTreeMap::new();
    let mut rounds = 0;
    while seen.len() < 400 {
        rounds += 1;
        assert!(rounds < 1_000, "no progress: {} read", seen.len());
        let fetched = c.fetch_all("t", &wanted, Duration::ZERO);
        assert_eq!(fetched.len(), wanted.len());
        for ((queue, offset), f) in wanted.iter_mut().zip(fetched) {
            if *queue == 7 {
                // Refused by the client's route table, before any request.
                let err = f.unwrap_err().to_string();
                assert!(err.contains("no queue 7"), "{err}");
                continue;
            }
            let f = f.unwrap();
            for m in f.messages {
                assert_eq!(m.queue, *queue, "an answer given to another queue's fetch");
                assert_eq!(m.offset, *offset, "queue {queue}: gap or reorder");
                assert!(seen.insert((m.queue, m.offset), m.payload).is_none());
                *offset += 1;
            }
            assert_eq!(f.next_offset, *offset);
        }
    }
    assert!(
        rounds > 10,
        "the small max_bytes made several rounds: {rounds}"
    );
    // Every message once, round robin over the queues.
    for (q, o) in seen.keys() {
        let i: u32 = std::str::from_utf8(&seen[&(*q, *o)])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!((i % 4, u64::from(i / 4)), (*q, *o));
    }
}

#[test]
fn offsets_out_of_range_and_unknown_queues_error_clearly() {
    let b = TestBroker::start();
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.create_topic("t", 2).unwrap();
    let p = Producer::connect(&b.addr()).unwrap();
    p.send("t", QueueSelector::Queue(0), &Message::new("x"))
        .unwrap();
    let conn = Connection::connect(&b.addr()).unwrap();
    let fetch = |queue, offset| {
        conn.call(
            &Request::Fetch(FetchRequest {
                topic: "t".into(),
                queue,
                offset,
                max_bytes: 1 << 20,
                max_wait_ms: 0,
                group: None,
            }),
            Bytes::new(),
            Duration::from_secs(10),
        )
    };
    let err = fetch(0, 1000).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::OffsetOutOfRange), "{err}");
    assert!(
        err.to_string().contains('1'),
        "names the valid range: {err}"
    );
    assert_eq!(
        fetch(7, 0).unwrap_err().code(),
        Some(ErrorCode::QueueNotFound)
    );
    let stats = admin.queue_stats("t").unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!((stats[0].end_offset, stats[1].end_offset), (1, 0));
}

#[test]
fn a_malformed_batch_is_refused_and_nothing_is_stored() {
    let b = TestBroker::start();
    b.create_topic("t", 1);
    let conn = Connection::connect(&b.shard_addrs()[0]).unwrap();
    // A header claiming one message, then a body that is not a valid batch.
    let (req, _) = produce_request(0, 0, 0, 1, b"");
    let err = conn
        .call(
            &req,
            Bytes::from_static(&[9, 0, 0, 0, 1]),
            Duration::from_secs(10),
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidBatch));
    let stats = Admin::connect(&b.addr()).unwrap().queue_stats("t").unwrap();
    assert_eq!(stats[0].end_offset, 0);
}

#[test]
fn a_plain_client_on_one_port_reaches_every_queue() {
    let b = TestBroker::start();
    b.create_topic("t", 8);
    // Raw produce through shard 0's port to every queue: half of them are forwarded.
    let conn = Connection::connect(&b.shard_addrs()[0]).unwrap();
    for q in 0..8u32 {
        let (req, body) = produce_request(q, 0, 0, 1, format!("q{q}").as_bytes());
        match conn.call(&req, body, Duration::from_secs(10)).unwrap().0 {
            Response::Produced(a) => assert_eq!((a.queue, a.base_offset), (q, 0)),
            other => panic!("{other:?}"),
        }
    }
    let c = Consumer::connect(&b.addr()).unwrap();
    let seen = drain_all(&c, "t", 8);
    let queues: HashSet<u32> = seen.keys().map(|(q, _)| *q).collect();
    assert_eq!(queues.len(), 8);
    let _ = c.iter("t", 0, StartFrom::Beginning).unwrap();
}

/// The owner address of queue 0 of `t`.
fn owner_of_queue_0(b: &TestBroker) -> String {
    Admin::connect(&b.addr())
        .unwrap()
        .route("t")
        .unwrap()
        .queues[0]
        .address
        .clone()
}

/// A produce request for `count` copies of `payload` on `queue` of topic `t` (`producer_id` 0:
/// not idempotent).
fn produce_request(
    queue: u32,
    producer_id: u64,
    seq: u32,
    count: u32,
    payload: &[u8],
) -> (Request, Bytes) {
    let mut buf = bytes::BytesMut::new();
    let mut bb = BatchBuilder::new(&mut buf);
    for _ in 0..count {
        bb.push(&Message::new(payload.to_vec())).unwrap();
    }
    let req = Request::Produce(ProduceRequest {
        topic: "t".into(),
        queue: Some(queue),
        producer_id,
        producer_epoch: 0,
        base_sequence: seq,
        message_count: count,
        timeout_ms: 5000,
        known_epoch: 0,
        delay: None,
        transaction: None,
    });
    (req, buf.freeze())
}

/// A produce request for one idempotent batch of `count` messages on queue 0 of `t`.
fn idempotent_batch(producer_id: u64, seq: u32, count: u32, payload: &[u8]) -> (Request, Bytes) {
    produce_request(0, producer_id, seq, count, payload)
}

/// Issue 11 item 6: the broker kept 5 batches per producer and queue while the client keeps
/// many more in flight, so a retry of an older stored batch failed with OUT_OF_ORDER_SEQUENCE.
/// Now every batch of a producer's window (the constant the client is bounded by) is found.
#[test]
fn a_retry_of_any_batch_in_the_producers_window_gets_its_original_offsets() {
    use ringmq::protocol::limits::PRODUCER_WINDOW_BATCHES;
    let b = TestBroker::start();
    b.create_topic("t", 1);
    let conn = Connection::connect(&owner_of_queue_0(&b)).unwrap();
    let send = |seq: u32| {
        let (req, body) = idempotent_batch(77, seq * 2, 2, format!("m{seq}").as_bytes());
        match conn.call(&req, body, Duration::from_secs(10)) {
            Ok((Response::Produced(a), _)) => Ok((a.base_offset, a.duplicate)),
            Ok((other, _)) => panic!("{other:?}"),
            Err(e) => Err(e),
        }
    };
    let window = PRODUCER_WINDOW_BATCHES as u32;
    let first: Vec<u64> = (0..window)
        .map(|i| {
            let (offset, dup) = send(i).unwrap();
            assert!(!dup);
            offset
        })
        .collect();
    // Oldest first: the one the old 5-batch table had forgotten longest ago.
    for i in 0..window {
        let (offset, dup) = send(i).expect("a retry inside the window");
        assert!(dup, "batch {i} stored twice");
        assert_eq!(offset, first[i as usize], "batch {i} got new offsets");
    }
    // Past the window the broker cannot give the offsets; it refuses clearly, not retriably,
    // and stores nothing.
    send(window).unwrap();
    let e = send(0).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfOrderSequence), "{e}");
    assert!(!e.is_retriable());
    let c = Consumer::connect(&b.addr()).unwrap();
    assert_eq!(drain_all(&c, "t", 1).len(), 2 * (window as usize + 1));
}

/// Issue 11 item 8, broker side: batches pipelined on one connection are appended in the order
/// they arrived, also while appends wait for room in the log (writes in flight at their cap,
/// segment rolls). Before the fix a later batch could overtake one waiting for room, and was
/// refused as a sequence gap.
#[test]
fn pipelined_batches_of_one_connection_are_appended_in_arrival_order_across_segment_rolls() {
    use std::sync::Condvar;
    const BATCHES: u32 = 3000;
    const IN_FLIGHT: usize = 1024;
    let tmp = common::data_dir();
    let mut cfg = common::test_config(tmp.path());
    cfg.server.cores = ringmq::config::CoreSelection::Count(1);
    cfg.storage.flush_mode = ringmq::storage::FlushMode::AsyncFlush;
    // 64 MiB in flight on a busy disk can wait past the flow-control bounds; this test is about
    // the order of what the log takes, so it takes everything (tests/flow_control.rs has them).
    cfg.server.max_queue_wait_ms = 0;
    cfg.server.max_flush_lag_bytes = 0;
    let b = TestBroker::start_with(cfg, tmp);
    b.create_topic("t", 1);
    let conn = Connection::connect(&owner_of_queue_0(&b)).unwrap();
    let payload = vec![b'p'; 1000];
    let outstanding = Arc::new((Mutex::new(0usize), Condvar::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    for i in 0..BATCHES {
        {
            let (lock, cv) = &*outstanding;
            let mut n = lock.lock().unwrap();
            while *n >= IN_FLIGHT {
                n = cv.wait(n).unwrap();
            }
            *n += 1;
        }
        // 64 messages of 1000 B: 3000 batches are ~200 MB, six 32 MiB segments.
        let (req, body) = idempotent_batch(5, i * 64, 64, &payload);
        let (outstanding, errors) = (outstanding.clone(), errors.clone());
        conn.send_callback(&req, body, move |r| {
            if let Err(e) = r {
                errors.lock().unwrap().push(format!("batch {i}: {e}"));
            }
            let (lock, cv) = &*outstanding;
            *lock.lock().unwrap() -= 1;
            cv.notify_all();
        })
        .unwrap();
    }
    let (lock, cv) = &*outstanding;
    let mut n = lock.lock().unwrap();
    while *n > 0 {
        n = cv.wait(n).unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} of {BATCHES} batches refused, first: {:?}",
        errors.len(),
        errors.first()
    );
}

/// Issue 11 item 11c: a batch with an older producer epoch than the broker has seen for that
/// producer and queue is refused with its own code (it was STORAGE_ERROR).
#[test]
fn a_fenced_producer_epoch_is_answered_with_producer_fenced() {
    let b = TestBroker::start();
    b.create_topic("t", 1);
    let conn = Connection::connect(&owner_of_queue_0(&b)).unwrap();
    let send = |epoch: u16, seq: u32| {
        let (mut req, body) = idempotent_batch(9, seq, 1, b"e");
        if let Request::Produce(p) = &mut req {
            p.producer_epoch = epoch;
        }
        conn.call(&req, body, Duration::from_secs(10)).map(|_| ())
    };
    send(1, 0).unwrap();
    let e = send(0, 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
    assert!(!e.is_retriable());
    // A newer epoch restarts the sequence.
    send(2, 0).unwrap();
}
