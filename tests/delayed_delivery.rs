//! Delayed delivery for producers: a delay level or a deliver-at time, served by the same
//! scheduler as retries; bounds and bad requests refused.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use common::TestBroker;
use ringmq::client::{Connection, Consumer, Producer, QueueSelector};
use ringmq::format::batch::{BatchBuilder, Message};
use ringmq::protocol::{Delay, ErrorCode, ProduceRequest, Request};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until queue 0 of `topic` holds `count` messages; returns how long that took.
fn visible_after(consumer: &Consumer, topic: &str, count: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let f = consumer.fetch(topic, 0, 0, Duration::ZERO).expect("fetch");
        if f.end_offset >= count {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "not delivered within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_delayed_message_is_invisible_until_its_level_or_its_time() {
    let b = TestBroker::start();
    b.create_topic("later", 1);
    let addr = b.addr();
    let p = Producer::connect(&addr).unwrap();
    let consumer = Consumer::connect(&addr).unwrap();
    let sent = Instant::now();
    let r = p
        .send_delayed(
            "later",
            QueueSelector::Queue(0),
            &Message::new("a"),
            Delay::Level(1),
        )
        .unwrap();
    assert!(r.deliver_at_ms >= now_ms() + 900, "due about 1 s from now");
    assert_eq!(
        consumer
            .fetch("later", 0, 0, Duration::ZERO)
            .unwrap()
            .end_offset,
        0
    );
    visible_after(&consumer, "later", 1, Duration::from_secs(10));
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_millis(990), "level 1 is 1 s");
    eprintln!("level 1: visible {waited:?} after sending");
    // 6.5 s ahead: a 5 s hop, then 1 s hops; delivered at its time, never before.
    let at = now_ms() + 6_500;
    let sent = Instant::now();
    let r = p
        .send_delayed(
            "later",
            QueueSelector::Queue(0),
            &Message::new("b"),
            Delay::At(at),
        )
        .unwrap();
    assert_eq!(r.deliver_at_ms, at);
    visible_after(&consumer, "later", 2, Duration::from_secs(15));
    let f = consumer.fetch("later", 0, 0, Duration::ZERO).unwrap();
    let bodies: Vec<_> = f
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).to_string())
        .collect();
    assert!(
        now_ms() >= at,
        "delivered {} ms before its time: {bodies:?}",
        at - now_ms()
    );
    let late = now_ms() - at;
    eprintln!(
        "deliver-at 6.5 s: visible {:?} after sending, {late} ms after its time",
        sent.elapsed()
    );
    let f = consumer.fetch("later", 0, 0, Duration::ZERO).unwrap();
    let bodies: Vec<_> = f.messages.iter().map(|m| m.payload.to_vec()).collect();
    assert_eq!(bodies, [b"a".to_vec(), b"b".to_vec()]);
    assert!(
        f.messages
            .iter()
            .all(|m| m.properties.iter().all(|(k, _)| !k.starts_with(b"%"))),
        "the schedule's bookkeeping stays behind"
    );
}

#[test]
fn delays_out_of_bounds_and_idempotent_delayed_sends_are_refused() {
    let b = TestBroker::start();
    b.create_topic("later", 1);
    let addr = b.addr();
    let p = Producer::connect(&addr).unwrap();
    for delay in [Delay::Level(19), Delay::At(now_ms() + 4 * 24 * 3600 * 1000)] {
        let err = p
            .send_delayed("later", QueueSelector::Queue(0), &Message::new("x"), delay)
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(ErrorCode::InvalidArgument),
            "{delay:?}: {err}"
        );
    }
    // A deliver-at time in the past: delivered at once.
    let r = p
        .send_delayed(
            "later",
            QueueSelector::Queue(0),
            &Message::new("now"),
            Delay::At(1),
        )
        .unwrap();
    assert_eq!(r.deliver_at_ms, 0);
    let mut body = BytesMut::new();
    BatchBuilder::new(&mut body)
        .push(&Message::new("x"))
        .unwrap();
    let conn = Connection::connect(
        &b.shard_addrs()[ringmq::shard::router::shard_of("later", 0, b.shard_addrs().len())],
    )
    .unwrap();
    let request = Request::Produce(ProduceRequest {
        topic: "later".into(),
        queue: Some(0),
        producer_id: 7,
        producer_epoch: 0,
        base_sequence: 0,
        message_count: 1,
        timeout_ms: 5000,
        known_epoch: 0,
        delay: Some(Delay::Level(1)),
        transaction: None,
    });
    let err = conn
        .call(&request, body.freeze(), Duration::from_secs(5))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
}
