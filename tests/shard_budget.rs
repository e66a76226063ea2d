//! The shard's in-flight byte budget under produce overload, over real sockets on 127.0.0.1.
//! A file of its own, so that its 224 MiB of produces never run in parallel with the
//! memory-bound tests (which time a producer's ack while non-readers hold a shard).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{data_dir, test_config, TestBroker};
use ringmq::client::{Consumer, Producer, QueueSelector};
use ringmq::format::batch::Message;
use ringmq::protocol::MAX_BODY_BYTES;
use ringmq::server::bounds::{stats_of, ServerStatsSnapshot};

const MIB: usize = 1 << 20;

fn stats(addr: &str) -> ServerStatsSnapshot {
    let addr: SocketAddr = addr.parse().unwrap();
    stats_of(addr).expect("the listener is running in this process")
}

/// Issue 11: a produce past the shard's in-flight budget is answered SYSTEM_BUSY, and the
/// producer's retries (backoff, idempotent re-send) get every message stored exactly once.
/// The budget is set to its minimum (one max-size request) so that 8 producers with 7 MiB
/// messages in flight together exceed it.
#[test]
fn a_produce_refused_as_system_busy_is_retried_and_stored_once() {
    let tmp = data_dir();
    let mut cfg = test_config(tmp.path());
    cfg.server.cores = ringmq::config::CoreSelection::Count(1);
    cfg.server.shard_inflight_bytes = u64::from(MAX_BODY_BYTES);
    let b = TestBroker::start_with(cfg, tmp);
    b.create_topic("t", 1);
    const PRODUCERS: usize = 8;
    const SENDS: usize = 4;
    let addr = b.addr();
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let p = Producer::connect(&addr).unwrap();
                for k in 0..SENDS {
                    let mut body = vec![b'0' + i as u8; 7 * MIB];
                    body[..2].copy_from_slice(&[i as u8, k as u8]);
                    p.send("t", QueueSelector::Queue(0), &Message::new(body))
                        .expect("a SYSTEM_BUSY produce must be retried until stored");
                }
            })
        })
        .collect();
    // A deadline, so that a broker that stops reading fails the test instead of hanging it
    // (it did: idle readers' buffer capacity held the whole budget).
    let deadline = Instant::now() + Duration::from_secs(120);
    for t in threads {
        while !t.is_finished() {
            assert!(
                Instant::now() < deadline,
                "producers stuck: {:?}",
                stats(&addr)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().unwrap();
    }
    let refused = stats(&addr).shard_busy_refusals;
    assert!(
        refused > 0,
        "the produces never exceeded the shard budget, so nothing was tested"
    );
    // Every message once: read them all back.
    let c = Consumer::connect(&addr).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0;
    while seen.len() < PRODUCERS * SENDS {
        let batch = c.fetch("t", 0, offset, Duration::from_secs(1)).unwrap();
        assert!(
            !batch.messages.is_empty(),
            "only {} of the messages stored",
            seen.len()
        );
        for m in &batch.messages {
            assert!(
                seen.insert((m.payload[0], m.payload[1])),
                "message {:?} stored twice",
                &m.payload[..2]
            );
        }
        offset = batch.next_offset;
    }
    eprintln!("SYSTEM_BUSY refusals: {refused}");
}
