//! The client side of the de-dup window (issue 11 item 6): a producer never has more than
//! `PRODUCER_WINDOW_BATCHES` batches of one queue unacknowledged, the number the broker
//! remembers per producer and queue, so every batch it may re-send is still recognised.
//!
//! A fake broker answers GetRoute and swallows produce requests without answering, so the
//! producer's window fills and must stop there.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ringmq::client::{Producer, ProducerConfig, QueueSelector};
use ringmq::format::batch::Message;
use ringmq::protocol::limits::PRODUCER_WINDOW_BATCHES;
use ringmq::protocol::{Frame, QueueRoute, Request, Response, RouteTable};

struct FakeBroker {
    addr: String,
    produce_requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeBroker {
    fn start(queues: u32) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let produce_requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (addr, count, stop) = (addr.clone(), produce_requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (addr, count, stop) = (addr.clone(), count.clone(), stop.clone());
                            let probe = s.try_clone().unwrap();
                            conns.push(probe);
                            std::thread::spawn(move || serve(s, &addr, queues, &count, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for c in conns {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            })
        };
        FakeBroker {
            addr,
            produce_requests,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes every connection and stops listening.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: TcpStream, addr: &str, queues: u32, count: &AtomicUsize, stop: &AtomicBool) {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 64 << 10];
    while !stop.load(Ordering::Acquire) {
        while let Ok(Some(frame)) = Frame::decode(&mut buf) {
            match Request::from_frame(&frame) {
                Ok(Request::GetRoute { topic }) => {
                    let route = RouteTable {
                        topic,
                        queues: (0..queues)
                            .map(|q| QueueRoute {
                                queue: q,
                                shard: 0,
                                address: addr.to_string(),
                                group: None,
                            })
                            .collect(),
                    };
                    let mut out = BytesMut::new();
                    Response::Route(route)
                        .to_frame(frame.request_id, Bytes::new())
                        .encode(&mut out);
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
                Ok(Request::Produce(_)) => {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn a_producer_never_has_more_unacknowledged_batches_of_a_queue_than_the_brokers_window() {
    let mut broker = FakeBroker::start(1);
    let mut cfg = ProducerConfig::new(broker.addr.clone());
    cfg.batch_bytes = 1; // every message is a batch of its own
    cfg.linger = Duration::ZERO;
    cfg.retries = 0;
    cfg.request_timeout = Duration::from_secs(120); // no re-sends while we look
    let producer = Arc::new(Producer::with_config(cfg).unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (producer, sent) = (producer.clone(), sent.clone());
        std::thread::spawn(move || {
            for i in 0..PRODUCER_WINDOW_BATCHES * 3 {
                producer
                    .send_async(
                        "t",
                        QueueSelector::Queue(0),
                        &Message::new(format!("{i}")),
                        |_| {},
                    )
                    .unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.produce_requests.load(Ordering::SeqCst) < PRODUCER_WINDOW_BATCHES {
        assert!(Instant::now() < deadline, "the window never filled");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Give a producer that ignored the window every chance to send more: it may not.
    std::thread::sleep(Duration::from_millis(300));
    let seen = broker.produce_requests.load(Ordering::SeqCst);
    assert_eq!(
        seen, PRODUCER_WINDOW_BATCHES,
        "{seen} batches of one queue unacknowledged at once"
    );
    assert!(sent.load(Ordering::SeqCst) < PRODUCER_WINDOW_BATCHES * 3);
    // The broker goes away: the window fails (retries = 0) and the sender runs to its end.
    broker.stop();
    sender.join().unwrap();
    producer.flush();
}
