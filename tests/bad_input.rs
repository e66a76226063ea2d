//! Bad input never takes the broker down: each case gets an error reply where one is possible
//! and a closed connection, while other connections keep working. Real sockets on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::TestBroker;
use ringmq::client::Admin;
use ringmq::protocol::{ErrorCode, Frame, Request, PREAMBLE_BYTES};

fn connect(b: &TestBroker) -> TcpStream {
    let s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads until the broker closes the connection; returns every frame it sent first.
fn read_until_closed(s: &mut TcpStream) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the broker did not close the connection: {e}"),
        }
    }
    let mut frames = Vec::new();
    while let Some(f) = Frame::decode(&mut buf).expect("the broker sends valid frames") {
        frames.push(f);
    }
    frames
}

fn encoded(request: &Request, request_id: u64) -> Vec<u8> {
    let mut out = BytesMut::new();
    request.to_frame(request_id, Bytes::new()).encode(&mut out);
    out.to_vec()
}

/// The broker still answers a fresh client.
fn assert_alive(b: &TestBroker) {
    Admin::connect(&b.addr()).unwrap().ping().unwrap();
}

fn status(f: &Frame) -> ErrorCode {
    ErrorCode::from_u16(f.status)
}

#[test]
fn garbage_bytes_close_the_connection() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    s.write_all(&[0xAB; 100]).unwrap();
    let frames = read_until_closed(&mut s);
    assert!(frames.iter().all(|f| f.status != 0));
    assert_alive(&b);
}

#[test]
fn wrong_magic_is_answered_and_closed() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let mut bytes = encoded(&Request::Ping, 7);
    bytes[0] ^= 0xFF;
    s.write_all(&bytes).unwrap();
    let frames = read_until_closed(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(status(&frames[0]), ErrorCode::MalformedFrame);
    assert_alive(&b);
}

#[test]
fn a_length_of_4_gib_is_refused_from_the_preamble_alone() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let mut bytes = encoded(&Request::Ping, 9);
    bytes[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // body_len
                                                            // Only the preamble: the broker must not wait for (or allocate) 4 GiB.
    s.write_all(&bytes[..PREAMBLE_BYTES]).unwrap();
    let frames = read_until_closed(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(status(&frames[0]), ErrorCode::FrameTooLarge);
    assert_eq!(frames[0].request_id, 9);
    assert_alive(&b);
}

#[test]
fn a_crc_mismatch_is_answered_with_the_request_id_and_closed() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let mut bytes = encoded(
        &Request::CreateTopic {
            name: "t".into(),
            queues: 1,
        },
        11,
    );
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // a header byte
    s.write_all(&bytes).unwrap();
    let frames = read_until_closed(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(status(&frames[0]), ErrorCode::CrcMismatch);
    assert_eq!(frames[0].request_id, 11);
    // Nothing was created from the corrupt frame.
    assert!(Admin::connect(&b.addr())
        .unwrap()
        .list_topics()
        .unwrap()
        .is_empty());
}

#[test]
fn an_unknown_opcode_is_answered_and_closed() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let mut frame = Request::Ping.to_frame(13, Bytes::new());
    frame.opcode = 999;
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    s.write_all(&out).unwrap();
    let frames = read_until_closed(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(status(&frames[0]), ErrorCode::UnknownOpcode);
    assert_eq!((frames[0].request_id, frames[0].opcode), (13, 999));
    assert_alive(&b);
}

#[test]
fn a_garbage_flatbuffers_header_is_answered_and_closed() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let mut frame = Request::GetRoute { topic: "t".into() }.to_frame(15, Bytes::new());
    frame.header = Bytes::from_static(&[0xFF; 24]);
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    s.write_all(&out).unwrap();
    let frames = read_until_closed(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(status(&frames[0]), ErrorCode::BadHeader);
    assert_alive(&b);
}

#[test]
fn a_frame_cut_in_half_and_left_open_is_closed_after_the_timeout() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let bytes = encoded(&Request::ListTopics, 17);
    s.write_all(&bytes[..bytes.len() / 2]).unwrap();
    let start = Instant::now();
    let frames = read_until_closed(&mut s);
    assert!(frames.is_empty());
    // test_config sets partial_frame_timeout_ms = 300.
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_alive(&b);
}

#[test]
fn a_silent_client_does_not_block_others() {
    let b = TestBroker::start();
    let silent: Vec<TcpStream> = (0..20).map(|_| connect(&b)).collect();
    let admin = Admin::connect(&b.addr()).unwrap();
    for _ in 0..10 {
        admin.ping().unwrap();
    }
    drop(silent);
    assert_alive(&b);
}

#[test]
fn pipelined_requests_on_one_connection_all_get_answers_by_id() {
    let b = TestBroker::start();
    let mut s = connect(&b);
    let mut bytes = Vec::new();
    for id in 100..200u64 {
        bytes.extend(encoded(&Request::Ping, id));
    }
    s.write_all(&bytes).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let mut ids = Vec::new();
    while ids.len() < 100 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(f) = Frame::decode(&mut buf).unwrap() {
            assert_eq!(f.status, 0);
            ids.push(f.request_id);
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, (100..200).collect::<Vec<_>>());
}

#[test]
fn a_slave_whose_master_name_does_not_resolve_keeps_serving() {
    // The follower looks the name up off the executor and treats "no such host" as a link
    // error to retry, never a panic; the shard goes on answering meanwhile.
    let tmp = common::data_dir();
    let mut cfg = common::test_config(tmp.path());
    cfg.replication.role = ringmq::replication::Role::Slave;
    cfg.replication.master = Some("no-such-host.invalid:10911".into());
    let b = TestBroker::start_with(cfg, tmp);
    let admin = Admin::connect(&b.addr()).unwrap();
    for _ in 0..5 {
        admin.ping().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let info = admin.broker_info().unwrap();
    assert_eq!(info.role, "slave");
    assert_eq!(info.master_address, "no-such-host.invalid:10911");
    for s in admin.broker_stats().unwrap() {
        assert_ne!(
            s.replication.link, 2,
            "streaming from a master that does not exist?"
        );
    }
}
