//! Flow control: a produce the log cannot take in time, or one that arrives while the flush
//! is too far behind, is refused with SYSTEM_BUSY (retriable), stores nothing, and the
//! library producer rides through it: every message arrives exactly once.

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{read_all, test_config, TestBroker};
use ringmq::client::{Admin, ClientError, Connection, Consumer, Producer, QueueSelector};
use ringmq::format::batch::{BatchBuilder, Message};
use ringmq::protocol::{ErrorCode, ProduceRequest, Request, Response};
use ringmq::storage::FlushMode;

fn batch(n: usize, size: usize, tag: &str) -> Bytes {
    let mut out = BytesMut::new();
    let mut b = BatchBuilder::new(&mut out);
    for i in 0..n {
        let mut payload = format!("{tag}-{i}-").into_bytes();
        payload.resize(size, b'x');
        b.push(&Message::new(payload)).unwrap();
    }
    out.freeze()
}

fn produce_request(topic: &str, count: u32) -> Request {
    Request::Produce(ProduceRequest {
        topic: topic.into(),
        queue: Some(0),
        producer_id: 0,
        producer_epoch: 0,
        base_sequence: 0,
        message_count: count,
        timeout_ms: 5000,
        known_epoch: 0,
        delay: None,
        transaction: None,
    })
}

fn stored(addr: &str, topic: &str) -> usize {
    read_all(&Consumer::connect(addr).unwrap(), topic, 1).len()
}

#[test]
fn produces_are_refused_while_the_flush_lags_and_taken_again_once_it_caught_up() {
    let tmp = common::data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.storage.flush_mode = FlushMode::AsyncFlush;
    // The flusher syncs only every 3 s (no byte trigger): the lead grows between syncs.
    cfg.storage.flush_interval_ms = 3_000;
    cfg.storage.flush_bytes = 1 << 30;
    cfg.server.max_flush_lag_bytes = 16 << 20;
    let b = TestBroker::start_with(cfg, tmp);
    b.create_topic("t", 1);
    let owner = Admin::connect(&b.addr())
        .unwrap()
        .route("t")
        .unwrap()
        .queues[0]
        .address
        .clone();
    let conn = Connection::connect(&owner).unwrap();
    let body = batch(1024, 1000, "m"); // ~1 MiB
    let t = Duration::from_secs(10);
    let mut acked = 0usize;
    let refusal = loop {
        match conn.call(&produce_request("t", 1024), body.clone(), t) {
            Ok((Response::Produced(_), _)) => acked += 1024,
            Ok((other, _)) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(acked < 64 * 1024, "never refused after {acked} messages");
    };
    assert_eq!(refusal.code(), Some(ErrorCode::SystemBusy), "{refusal}");
    assert!(refusal.is_retriable());
    assert!(
        refusal.to_string().contains("max_flush_lag_bytes"),
        "{refusal}"
    );
    assert!(acked >= 16 * 1024, "refused before the bound: {acked}");
    // Nothing of the refused batch was stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(&b.addr(), "t") < acked && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stored(&b.addr(), "t"), acked);
    // The next sync brings the lead down: produces are taken again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match conn.call(&produce_request("t", 1024), body.clone(), t) {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::SystemBusy) => {
                assert!(Instant::now() < deadline, "still refused: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_produce_that_waits_too_long_for_the_log_is_refused_and_the_producer_retries_it() {
    let tmp = common::data_dir();
    let mut cfg = test_config(tmp.path());
    // One small write at a time and a 1 ms bound: a burst must queue past it.
    cfg.storage.max_writes_in_flight = 1;
    cfg.storage.write_buffer_bytes = 4096;
    cfg.server.max_queue_wait_ms = 1;
    let b = TestBroker::start_with(cfg, tmp);
    b.create_topic("t", 1);
    let owner = Admin::connect(&b.addr())
        .unwrap()
        .route("t")
        .unwrap()
        .queues[0]
        .address
        .clone();
    // A burst of raw produces from several connections, no retries.
    let results: Vec<Result<u32, ClientError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|c| {
                let owner = owner.clone();
                scope.spawn(move || {
                    let conn = Connection::connect(&owner).unwrap();
                    let pending: Vec<_> = (0..32)
                        .map(|i| {
                            conn.send(
                                &produce_request("t", 64),
                                batch(64, 1000, &format!("c{c}b{i}")),
                            )
                            .unwrap()
                        })
                        .collect();
                    pending
                        .into_iter()
                        .map(|p| p.wait(Duration::from_secs(20)).map(|_| 64))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let acked: u32 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    let busy: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!busy.is_empty(), "no produce was refused");
    for e in &busy {
        assert_eq!(e.code(), Some(ErrorCode::SystemBusy), "{e}");
        assert!(e.to_string().contains("max_queue_wait_ms"), "{e}");
    }
    eprintln!(
        "{} batches acked, {} refused SYSTEM_BUSY",
        acked / 64,
        busy.len()
    );
    assert_eq!(
        stored(&b.addr(), "t"),
        acked as usize,
        "a refused batch stored nothing"
    );
    // The library producer retries SYSTEM_BUSY with backoff: all of it arrives, once.
    let p = Producer::connect(&b.addr()).unwrap();
    let before = stored(&b.addr(), "t");
    std::thread::scope(|scope| {
        for c in 0..4 {
            let p = &p;
            scope.spawn(move || {
                for i in 0..200 {
                    let body = format!("lib-{c}-{i}");
                    p.send_async("t", QueueSelector::Queue(0), &Message::new(body), |r| {
                        r.expect("acked after retries");
                    })
                    .unwrap();
                }
            });
        }
    });
    p.flush();
    let consumer = Consumer::connect(&b.addr()).unwrap();
    let all = read_all(&consumer, "t", 1);
    let mine: Vec<_> = all
        .iter()
        .filter(|(_, _, p)| p.starts_with(b"lib-"))
        .collect();
    assert_eq!(all.len() - before, 800);
    let distinct: std::collections::BTreeSet<_> = mine.iter().map(|(_, _, p)| p).collect();
    assert_eq!(distinct.len(), 800, "every message once");
}
