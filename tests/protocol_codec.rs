//! Codec tests over the public API: round trips of every request and response (and of the
//! replication stream frames), incremental decoding, every preamble and header rejection,
//! compatibility with headers from brokers that predate a field, and seeded fuzz loops proving
//! bad input is an error and never a panic.

use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringmq::format::batch::{validate_batch, BatchBuilder, BatchError, BatchIter, Message};
use ringmq::protocol::generated as fb;
use ringmq::protocol::{
    error_frame, error_frame_for, BrokerInfo, Durability, EpochEntry, ErrorCode, FetchHeader,
    FetchRequest, Frame, FrameFlags, Opcode, ProduceAck, ProduceRequest, QueueRoute, QueueStat,
    ReplAck, ReplData, ReplFollowRequest, ReplFollowResponse, ReplicaStats, Request, Response,
    RouteTable, ShardStats, TopicInfo, WireError, MAX_BATCH_MESSAGES, MAX_BODY_BYTES,
    MAX_EPOCH_ENTRIES, MAX_HEADER_BYTES, PREAMBLE_BYTES,
};

fn history() -> Vec<EpochEntry> {
    vec![
        EpochEntry { epoch: 1, start: 0 },
        EpochEntry {
            epoch: 2,
            start: 1 << 30,
        },
        EpochEntry {
            epoch: 5,
            start: u64::MAX - 1,
        },
    ]
}

fn shard_stats(shard: u32, replication: ReplicaStats) -> ShardStats {
    ShardStats {
        shard,
        written: 4096 * u64::from(shard + 1),
        durable: 4096,
        visible: 4096,
        fsyncs: 3,
        appends: 9,
        unflushed_bytes: 0,
        unflushed_bytes_max: 8192,
        flush_latency_us_total: 1234,
        connections: 2,
        poisoned: shard == 1,
        replication,
    }
}

fn streaming_slave() -> ReplicaStats {
    ReplicaStats {
        role: ReplicaStats::ROLE_SLAVE,
        epoch: 7,
        link: ReplicaStats::LINK_STREAMING,
        peer_received: 1 << 20,
        peer_durable: 1 << 19,
        log_end: (1 << 20) + 512,
        lag_bytes: 512,
        lag_ms: 3,
        catchup_bytes_per_sec: 250_000_000,
        connects: 2,
    }
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Ping,
        Request::CreateTopic {
            name: "orders".into(),
            queues: 8,
        },
        Request::AlterTopic {
            name: "orders".into(),
            queues: 12,
        },
        Request::DeleteTopic {
            name: "orders".into(),
        },
        Request::ListTopics,
        Request::GetRoute {
            topic: "orders".into(),
        },
        Request::BrokerInfo,
        Request::Produce(ProduceRequest {
            topic: "orders".into(),
            queue: Some(3),
            producer_id: 0xdead_beef,
            producer_epoch: 2,
            base_sequence: 41,
            message_count: 2,
            timeout_ms: 5000,
            known_epoch: 0,
            delay: None,
            transaction: None,
        }),
        Request::Produce(ProduceRequest {
            topic: "t".into(),
            queue: None,
            producer_id: 0,
            producer_epoch: 0,
            base_sequence: 0,
            message_count: 1,
            timeout_ms: 0,
            known_epoch: u64::MAX,
            delay: None,
            transaction: None,
        }),
        Request::Fetch(FetchRequest {
            topic: "orders".into(),
            queue: 3,
            offset: u64::MAX - 1,
            max_bytes: 1 << 20,
            max_wait_ms: 500,
            group: None,
        }),
        Request::QueueStats {
            topic: "ünïcödé".into(),
        },
        Request::BrokerStats,
        Request::Promote,
        Request::ReplFollow(ReplFollowRequest {
            shard: 3,
            shards: 4,
            segment_bytes: 1 << 30,
            log_end: 123_456_789,
            epochs: history(),
            log_durable: 123_000_000,
            node_id: 77,
        }),
        // A follower that has never been written to.
        Request::ReplFollow(ReplFollowRequest {
            shard: 0,
            shards: 1,
            segment_bytes: 64 << 20,
            log_end: 0,
            epochs: vec![],
            log_durable: 0,
            node_id: 0,
        }),
    ]
}

fn all_responses() -> Vec<Response> {
    vec![
        Response::Pong,
        Response::TopicCreated {
            name: "orders".into(),
            queues: 8,
        },
        Response::TopicAltered {
            name: "orders".into(),
            queues: 12,
        },
        Response::TopicDeleted {
            name: "orders".into(),
            queues: 12,
        },
        Response::Topics(vec![]),
        Response::Topics(vec![
            TopicInfo {
                name: "a".into(),
                queues: 1,
            },
            TopicInfo {
                name: "b".into(),
                queues: 16,
            },
        ]),
        Response::Route(RouteTable {
            topic: "orders".into(),
            queues: (0..4)
                .map(|q| QueueRoute {
                    queue: q,
                    shard: q % 2,
                    address: format!("127.0.0.1:{}", 9000 + q),
                    // Both: a queue of a cluster topic and one of a single broker.
                    group: (q % 2 == 0).then(|| format!("g{q}")),
                })
                .collect(),
        }),
        Response::BrokerInfo(BrokerInfo {
            version: "0.1.0".into(),
            shards: 4,
            flush_mode: "SYNC_FLUSH".into(),
            role: "master".into(),
            config_toml: "[broker]\ncores = 4\n".into(),
            epoch: 0,
            master_address: String::new(),
            replication: String::new(),
            shard_addresses: Vec::new(),
        }),
        Response::BrokerInfo(BrokerInfo {
            version: "0.2.0".into(),
            shards: 2,
            flush_mode: "ASYNC_FLUSH".into(),
            role: "slave".into(),
            config_toml: String::new(),
            epoch: 9,
            master_address: "127.0.0.1:10911".into(),
            replication: "SYNC_MASTER/durable".into(),
            shard_addresses: vec!["127.0.0.2:10911".into(), "127.0.0.2:10912".into()],
        }),
        Response::Produced(ProduceAck {
            queue: 3,
            base_offset: 1000,
            count: 2,
            duplicate: true,
            durability: Durability::ReplicaReceived,
            epoch: 7,
            deliver_at_ms: 0,
        }),
        Response::Fetched(FetchHeader {
            queue: 3,
            next_offset: 12,
            min_offset: 0,
            end_offset: 20,
        }),
        Response::QueueStats(vec![
            QueueStat {
                queue: 0,
                min_offset: 0,
                end_offset: 10,
                bytes: 4096,
            },
            QueueStat {
                queue: 1,
                min_offset: 5,
                end_offset: u64::MAX,
                bytes: 1,
            },
        ]),
        Response::BrokerStats(vec![]),
        Response::BrokerStats(vec![
            shard_stats(0, ReplicaStats::default()),
            shard_stats(1, streaming_slave()),
        ]),
        Response::Promoted { epoch: 8 },
        Response::ReplFollowing(ReplFollowResponse {
            start: 4096,
            master_end: 1 << 40,
            want_durable: true,
            epochs: history(),
            reset: true,
        }),
        Response::ReplFollowing(ReplFollowResponse {
            start: 0,
            master_end: 0,
            want_durable: false,
            epochs: vec![],
            reset: false,
        }),
    ]
}

fn encode(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    assert_eq!(out.len(), frame.encoded_len());
    out
}

/// A preamble with the given fields (CRC 0, status 0, reserved 0), for rejection tests.
fn preamble(flags: u8, opcode: u16, request_id: u64, header_len: u32, body_len: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(PREAMBLE_BYTES);
    p.extend_from_slice(b"RQMW");
    p.push(1);
    p.push(flags);
    p.extend_from_slice(&opcode.to_le_bytes());
    p.extend_from_slice(&request_id.to_le_bytes());
    p.extend_from_slice(&header_len.to_le_bytes());
    p.extend_from_slice(&body_len.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(p.len(), PREAMBLE_BYTES);
    p
}

/// Re-encodes `frame` after replacing its header, so the CRC is right and only the header is bad.
fn with_header(mut frame: Frame, header: &[u8]) -> Frame {
    frame.header = Bytes::copy_from_slice(header);
    let mut bytes = encode(&frame);
    Frame::decode(&mut bytes).unwrap().unwrap()
}

fn sample_batch() -> Bytes {
    let mut out = BytesMut::new();
    let mut b = BatchBuilder::new(&mut out);
    b.push(
        &Message::new(&b"first"[..])
            .with_key(&b"k1"[..])
            .with_born_timestamp_ms(1),
    )
    .unwrap();
    b.push(
        &Message::new(&b"second"[..])
            .with_tag(&b"T"[..])
            .with_property(&b"p"[..], &b"v"[..]),
    )
    .unwrap();
    out.freeze()
}

#[test]
fn every_request_round_trips_through_bytes() {
    for (i, req) in all_requests().into_iter().enumerate() {
        let body = if req.opcode() == Opcode::Produce {
            sample_batch()
        } else {
            Bytes::new()
        };
        let frame = req.to_frame(i as u64 + 100, body.clone());
        let mut bytes = encode(&frame);
        let decoded = Frame::decode(&mut bytes).unwrap().unwrap();
        assert!(bytes.is_empty());
        assert_eq!(decoded, frame);
        assert_eq!(decoded.request_id, i as u64 + 100);
        assert!(!decoded.flags.is_response());
        assert_eq!(Request::from_frame(&decoded).unwrap(), req);
        assert_eq!(decoded.body, body);
    }
}

#[test]
fn every_response_round_trips_through_bytes() {
    for (i, resp) in all_responses().into_iter().enumerate() {
        let body = if resp.opcode() == Opcode::Fetch {
            sample_batch()
        } else {
            Bytes::new()
        };
        let frame = resp.to_frame(i as u64, body.clone());
        let (decoded, used) = Frame::decode_slice(&encode(&frame)).unwrap().unwrap();
        assert_eq!(used, frame.encoded_len());
        assert!(decoded.flags.is_response());
        assert_eq!(Response::from_frame(resp.opcode(), &decoded).unwrap(), resp);
        assert_eq!(decoded.body, body);
    }
}

#[test]
fn a_produce_body_is_a_valid_batch_after_the_trip() {
    let req = &all_requests()
        .into_iter()
        .find(|r| matches!(r, Request::Produce(_)))
        .unwrap();
    let mut bytes = encode(&req.to_frame(1, sample_batch()));
    let frame = Frame::decode(&mut bytes).unwrap().unwrap();
    let Request::Produce(p) = Request::from_frame(&frame).unwrap() else {
        panic!("not a produce request")
    };
    assert_eq!(
        validate_batch(&frame.body, MAX_BATCH_MESSAGES),
        Ok(p.message_count)
    );
    let payloads: Vec<&[u8]> = BatchIter::new(&frame.body)
        .map(|m| m.unwrap().payload)
        .collect();
    assert_eq!(payloads, [&b"first"[..], &b"second"[..]]);
}

#[test]
fn error_frames_round_trip_to_remote_errors() {
    for code in ErrorCode::ALL.into_iter().filter(|c| *c != ErrorCode::Ok) {
        let frame = error_frame(Opcode::Fetch.as_u16(), 5, code, "why");
        let (decoded, _) = Frame::decode_slice(&encode(&frame)).unwrap().unwrap();
        let err = Response::from_frame(Opcode::Fetch, &decoded).unwrap_err();
        let remote = err.remote().expect("remote error");
        assert_eq!((remote.code, remote.message.as_str()), (code, "why"));
        assert_eq!(err.code(), code);
    }
    // A code from a newer broker is kept, not a panic.
    let mut frame = error_frame(1, 5, ErrorCode::Internal, "new");
    frame.status = 999;
    let err = Response::from_frame(Opcode::Ping, &frame).unwrap_err();
    assert_eq!(err.remote().unwrap().code, ErrorCode::Unknown(999));
}

#[test]
fn decoding_byte_by_byte_yields_none_until_the_frame_is_complete() {
    let frames: Vec<Frame> = all_requests()
        .iter()
        .enumerate()
        .map(|(i, r)| r.to_frame(i as u64, Bytes::from_static(b"body")))
        .collect();
    let mut wire = BytesMut::new();
    for f in &frames {
        f.encode(&mut wire);
    }
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &byte in wire.iter() {
        buf.extend_from_slice(&[byte]);
        if let Some(frame) = Frame::decode(&mut buf).unwrap() {
            got.push(frame);
            assert!(buf.is_empty(), "a frame was returned before its last byte");
        }
        assert_eq!(Frame::decode_slice(&buf).unwrap(), None);
    }
    assert_eq!(got, frames);
}

#[test]
fn wrong_magic_is_rejected() {
    let mut bytes = encode(&Request::Ping.to_frame(1, Bytes::new()));
    bytes[0] = b'X';
    let len = bytes.len();
    assert!(matches!(
        Frame::decode(&mut bytes),
        Err(WireError::BadMagic { .. })
    ));
    assert_eq!(bytes.len(), len, "buffer untouched on error");
    let mut http = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    let err = Frame::decode(&mut http).unwrap_err();
    assert_eq!(
        (err.request_id(), err.code()),
        (None, ErrorCode::MalformedFrame)
    );
}

#[test]
fn unsupported_version_is_rejected_after_five_bytes() {
    let mut bytes = BytesMut::from(&b"RQMW\x02"[..]);
    assert_eq!(
        Frame::decode(&mut bytes),
        Err(WireError::UnsupportedVersion { found: 2 })
    );
    assert_eq!(
        WireError::UnsupportedVersion { found: 2 }.code(),
        ErrorCode::UnsupportedVersion
    );
}

#[test]
fn a_four_gib_header_is_rejected_from_the_preamble_alone() {
    let mut buf = BytesMut::from(&preamble(0, 1, 77, u32::MAX, 0)[..]);
    let capacity = buf.capacity();
    let err = Frame::decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        WireError::HeaderTooLarge {
            request_id: 77,
            len: u32::MAX,
            max: MAX_HEADER_BYTES
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(
        buf.capacity(),
        capacity,
        "nothing reserved for a rejected frame"
    );
    let mut one_over = BytesMut::from(&preamble(0, 1, 77, MAX_HEADER_BYTES + 1, 0)[..]);
    assert!(matches!(
        Frame::decode(&mut one_over),
        Err(WireError::HeaderTooLarge { .. })
    ));
}

#[test]
fn a_four_gib_body_is_rejected_from_the_preamble_alone() {
    let p = preamble(0, 10, 78, 0, u32::MAX);
    let mut buf = BytesMut::from(&p[..]);
    let capacity = buf.capacity();
    assert_eq!(
        Frame::decode(&mut buf),
        Err(WireError::BodyTooLarge {
            request_id: 78,
            len: u32::MAX,
            max: MAX_BODY_BYTES
        })
    );
    assert_eq!(buf.capacity(), capacity);
    assert!(matches!(
        Frame::decode_slice(&p),
        Err(WireError::BodyTooLarge { .. })
    ));
    // Exactly at the limit is fine: it just needs more bytes.
    let at_limit = preamble(0, 10, 78, 0, MAX_BODY_BYTES);
    assert_eq!(Frame::decode_slice(&at_limit), Ok(None));
}

#[test]
fn crc_mismatch_still_reports_the_request_id() {
    let frame = Request::GetRoute { topic: "t".into() }.to_frame(4242, Bytes::from_static(b"xy"));
    let mut bytes = encode(&frame);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let err = Frame::decode(&mut bytes).unwrap_err();
    assert!(
        matches!(
            err,
            WireError::CrcMismatch {
                request_id: 4242,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.request_id(), Some(4242));
    let reply = error_frame_for(frame.opcode, &err).unwrap();
    assert_eq!(
        (reply.request_id, reply.status),
        (4242, ErrorCode::CrcMismatch.as_u16())
    );
}

#[test]
fn unknown_opcode_is_reported_with_the_request_id() {
    let mut frame = Request::Ping.to_frame(9, Bytes::new());
    frame.opcode = 777;
    let (decoded, _) = Frame::decode_slice(&encode(&frame)).unwrap().unwrap();
    let err = Request::from_frame(&decoded).unwrap_err();
    assert_eq!(
        err,
        WireError::UnknownOpcode {
            request_id: 9,
            opcode: 777
        }
    );
    let reply = error_frame_for(777, &err).unwrap();
    assert_eq!(reply.opcode, 777);
    assert_eq!(ErrorCode::from_u16(reply.status), ErrorCode::UnknownOpcode);
}

#[test]
fn reserved_not_zero_is_rejected() {
    let mut bytes = encode(&Request::Ping.to_frame(3, Bytes::new()));
    bytes[30] = 1;
    assert_eq!(
        Frame::decode(&mut bytes),
        Err(WireError::ReservedNotZero {
            request_id: 3,
            found: 1
        })
    );
}

#[test]
fn a_response_frame_is_not_a_request_and_vice_versa() {
    let resp = Response::Pong.to_frame(1, Bytes::new());
    assert!(matches!(
        Request::from_frame(&resp),
        Err(WireError::WrongDirection { .. })
    ));
    let req = Request::Ping.to_frame(1, Bytes::new());
    assert!(matches!(
        Response::from_frame(Opcode::Ping, &req),
        Err(WireError::WrongDirection { .. })
    ));
    let mut oneway = req.clone();
    oneway.flags = FrameFlags::ONEWAY;
    let (decoded, _) = Frame::decode_slice(&encode(&oneway)).unwrap().unwrap();
    assert!(decoded.flags.is_oneway());
    assert_eq!(Request::from_frame(&decoded).unwrap(), Request::Ping);
}

#[test]
fn a_truncated_flatbuffers_header_is_a_bad_header() {
    for req in all_requests() {
        let frame = req.to_frame(11, Bytes::new());
        let header = frame.header.clone();
        for cut in 1..header.len() {
            let bad = with_header(frame.clone(), &header[..cut]);
            // Cutting only the zero padding after the last string's terminator leaves a
            // valid header; any other cut must be caught.
            let only_padding_cut = header[cut..].iter().all(|b| *b == 0);
            match Request::from_frame(&bad) {
                Err(WireError::BadHeader { request_id: 11, .. }) => {}
                Ok(same) if only_padding_cut && same == req => {}
                other => panic!("{req:?} header cut at {cut}: {other:?}"),
            }
        }
    }
    for resp in all_responses() {
        let frame = resp.to_frame(12, Bytes::new());
        let header = frame.header.clone();
        for cut in 1..header.len() {
            let bad = with_header(frame.clone(), &header[..cut]);
            let only_padding_cut = header[cut..].iter().all(|b| *b == 0);
            match Response::from_frame(resp.opcode(), &bad) {
                Err(WireError::BadHeader { request_id: 12, .. }) => {}
                Ok(same) if only_padding_cut && same == resp => {}
                other => panic!("{resp:?} header cut at {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_garbage_header_is_a_bad_header_or_harmless_never_a_panic() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for opcode in Opcode::ALL {
        for _ in 0..2_000 {
            let len = rng.gen_range(0..256);
            let garbage: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let frame = Frame {
                opcode: opcode.as_u16(),
                flags: FrameFlags::EMPTY,
                request_id: 1,
                status: 0,
                header: Bytes::from(garbage),
                body: Bytes::new(),
            };
            // Stream-only opcodes are refused before their header is looked at.
            let expected_error = |e: &WireError| match e {
                WireError::ReplicationStreamOnly { opcode: o, .. } => {
                    opcode.is_replication_stream() && *o == opcode.as_u16()
                }
                WireError::BadHeader { .. } => !opcode.is_replication_stream(),
                _ => false,
            };
            if let Err(e) = Request::from_frame(&frame) {
                assert!(expected_error(&e), "{e}");
            }
            if opcode == Opcode::ReplData {
                if let Err(e) = ReplData::from_frame(&frame) {
                    assert!(matches!(e, WireError::BadHeader { .. }), "{e}");
                }
            }
            if opcode == Opcode::ReplAck {
                if let Err(e) = ReplAck::from_frame(&frame) {
                    assert!(matches!(e, WireError::BadHeader { .. }), "{e}");
                }
            }
            let frame = Frame {
                flags: FrameFlags::RESPONSE,
                ..frame
            };
            if let Err(e) = Response::from_frame(opcode, &frame) {
                assert!(expected_error(&e), "{e}");
            }
        }
    }
    // All-zero and all-0xff headers of every small size.
    for len in 1..64 {
        for fill in [0x00u8, 0xff] {
            let frame = Frame {
                opcode: Opcode::Produce.as_u16(),
                flags: FrameFlags::EMPTY,
                request_id: 1,
                status: 0,
                header: Bytes::from(vec![fill; len]),
                body: Bytes::new(),
            };
            assert!(
                matches!(
                    Request::from_frame(&frame),
                    Err(WireError::BadHeader { .. })
                ),
                "{len} x {fill:#x}"
            );
        }
    }
}

/// Decodes everything it can from `bytes` and interprets each frame; any panic fails the test.
fn decode_all(bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(frame)) = Frame::decode(&mut buf) {
        let _ = Request::from_frame(&frame);
        if let Some(opcode) = Opcode::from_u16(frame.opcode) {
            let _ = Response::from_frame(opcode, &frame);
        }
        let _ = ReplData::from_frame(&frame);
        let _ = ReplAck::from_frame(&frame);
        let _ = validate_batch(&frame.body, MAX_BATCH_MESSAGES);
    }
    let _ = Frame::decode_slice(bytes);
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let mut valid = BytesMut::new();
    for (i, r) in all_requests().iter().enumerate() {
        r.to_frame(i as u64, sample_batch()).encode(&mut valid);
    }
    for (i, r) in all_responses().iter().enumerate() {
        r.to_frame(i as u64, Bytes::new()).encode(&mut valid);
    }
    sample_repl_data()
        .to_frame(1, sample_batch())
        .encode(&mut valid);
    sample_repl_ack().to_frame(2).encode(&mut valid);
    let valid = valid.freeze();
    let requests = all_requests();
    for i in 0..300_000u32 {
        match i % 3 {
            // Pure noise, half of it behind a good magic and version so the rest gets parsed.
            0 => {
                let len = rng.gen_range(0..96);
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if rng.gen_bool(0.5) && bytes.len() >= 5 {
                    bytes[..5].copy_from_slice(b"RQMW\x01");
                }
                decode_all(&bytes);
            }
            // A stream of valid frames with a few bytes changed, cut at a random point.
            1 => {
                let mut bytes = valid.to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..bytes.len());
                    bytes[at] = rng.gen();
                }
                let cut = rng.gen_range(0..=bytes.len());
                decode_all(&bytes[..cut]);
            }
            // One valid frame whose header is mutated with the CRC fixed, so header
            // verification is what gets exercised.
            _ => {
                let req = &requests[rng.gen_range(0..requests.len())];
                let mut frame = req.to_frame(1, Bytes::new());
                let mut header = frame.header.to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..header.len());
                    header[at] = rng.gen();
                }
                frame.header = Bytes::from(header);
                decode_all(&encode(&frame));
            }
        }
    }
}

#[test]
fn random_batches_never_panic_the_validator() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let good = sample_batch();
    for _ in 0..200_000 {
        let mut bytes = good.to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] = rng.gen();
        }
        let cut = rng.gen_range(0..=bytes.len());
        let bytes = &bytes[..cut];
        let validated = validate_batch(bytes, MAX_BATCH_MESSAGES);
        let iterated: Result<Vec<_>, BatchError> = BatchIter::new(bytes).collect();
        // The validator and the iterator agree on what is valid.
        match (&validated, &iterated) {
            (Ok(n), Ok(v)) => assert_eq!(*n as usize, v.len()),
            (Err(BatchError::Empty), Ok(v)) => assert!(v.is_empty()),
            (Err(a), Err(b)) => assert_eq!(a, b),
            other => panic!("validator and iterator disagree: {other:?}"),
        }
    }
}

#[test]
fn truncated_and_overlong_messages_fail_batch_validation() {
    let body = sample_batch();
    let first_len = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize + 4;
    // Truncated inside the second message.
    assert!(matches!(
        validate_batch(&body[..body.len() - 1], 100),
        Err(BatchError::Truncated { offset, .. }) if offset == first_len
    ));
    // The first message claims more bytes than the batch has.
    let mut overlong = body.to_vec();
    overlong[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        validate_batch(&overlong, 100),
        Err(BatchError::Truncated { offset: 0, .. })
    ));
    // A payload length larger than what is left of its message.
    let mut bad_payload = body.to_vec();
    let payload_len_at = first_len - 4 - b"first".len();
    bad_payload[payload_len_at..payload_len_at + 4].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(
        validate_batch(&bad_payload, 100),
        Err(BatchError::FieldOverrun {
            offset: 0,
            field: "payload",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Replication: the handshake, the stream frames, and headers from older brokers.
// ---------------------------------------------------------------------------------------------

fn sample_repl_data() -> ReplData {
    ReplData {
        position: 1 << 33,
        master_end: (1 << 33) + 4096,
        master_time_ms: 1_760_000_000_123,
        confirmed: 1 << 32,
    }
}

fn sample_repl_ack() -> ReplAck {
    ReplAck {
        received: 1 << 33,
        durable: (1 << 33) - 4096,
    }
}

/// Encodes and decodes `frame` through bytes, as a peer would see it.
fn through_bytes(frame: &Frame) -> Frame {
    let mut bytes = encode(frame);
    let decoded = Frame::decode(&mut bytes).unwrap().unwrap();
    assert!(bytes.is_empty());
    decoded
}

#[test]
fn new_opcodes_and_error_code_have_their_pinned_numbers_and_names() {
    let pinned = [
        (Opcode::Promote, 7, "PROMOTE"),
        (Opcode::ReplFollow, 20, "REPL_FOLLOW"),
        (Opcode::ReplData, 21, "REPL_DATA"),
        (Opcode::ReplAck, 22, "REPL_ACK"),
    ];
    for (opcode, n, name) in pinned {
        assert_eq!(opcode.as_u16(), n);
        assert_eq!(Opcode::from_u16(n), Some(opcode));
        assert_eq!(opcode.to_string(), name);
    }
    let nums: Vec<u16> = Opcode::ALL.iter().map(|o| o.as_u16()).collect();
    assert!(nums.windows(2).all(|w| w[0] < w[1]), "ALL in numeric order");
    assert_eq!(ErrorCode::ReplicationRefused.as_u16(), 53);
    assert_eq!(ErrorCode::from_u16(53), ErrorCode::ReplicationRefused);
    assert_eq!(
        ErrorCode::ReplicationRefused.to_string(),
        "REPLICATION_REFUSED"
    );
    assert!(!ErrorCode::ReplicationRefused.is_retriable());
}

#[test]
fn repl_data_with_a_body_round_trips_through_bytes() {
    let data = sample_repl_data();
    let body = sample_batch();
    let decoded = through_bytes(&data.to_frame(77, body.clone()));
    assert!(decoded.flags.is_oneway());
    assert!(!decoded.flags.is_response());
    assert_eq!(decoded.opcode, Opcode::ReplData.as_u16());
    assert_eq!(decoded.request_id, 77);
    assert_eq!(ReplData::from_frame(&decoded).unwrap(), data);
    assert_eq!(decoded.body, body);
}

#[test]
fn a_heartbeat_is_repl_data_with_an_empty_body() {
    let heartbeat = ReplData {
        position: 0,
        master_end: 0,
        master_time_ms: 0,
        confirmed: 0,
    };
    let decoded = through_bytes(&heartbeat.to_frame(0, Bytes::new()));
    assert_eq!(ReplData::from_frame(&decoded).unwrap(), heartbeat);
    assert!(decoded.body.is_empty());
}

#[test]
fn repl_ack_round_trips_through_bytes() {
    for ack in [
        sample_repl_ack(),
        ReplAck {
            received: 0,
            durable: 0,
        },
        ReplAck {
            received: u64::MAX,
            durable: u64::MAX,
        },
    ] {
        let decoded = through_bytes(&ack.to_frame(5));
        assert!(decoded.flags.is_oneway());
        assert_eq!(decoded.opcode, Opcode::ReplAck.as_u16());
        assert!(decoded.body.is_empty());
        assert_eq!(ReplAck::from_frame(&decoded).unwrap(), ack);
    }
}

#[test]
fn stream_frames_are_not_read_as_each_other() {
    let data = sample_repl_data().to_frame(1, Bytes::new());
    let ack = sample_repl_ack().to_frame(2);
    assert!(matches!(
        ReplAck::from_frame(&data),
        Err(WireError::OpcodeMismatch {
            request_id: 1,
            expected: 22,
            found: 21
        })
    ));
    assert!(matches!(
        ReplData::from_frame(&ack),
        Err(WireError::OpcodeMismatch {
            request_id: 2,
            expected: 21,
            found: 22
        })
    ));
    let ping = Request::Ping.to_frame(3, Bytes::new());
    assert!(matches!(
        ReplData::from_frame(&ping),
        Err(WireError::OpcodeMismatch { found: 1, .. })
    ));
}

#[test]
fn an_error_frame_on_the_stream_is_the_peers_error() {
    let frame = error_frame(
        Opcode::ReplData.as_u16(),
        4,
        ErrorCode::ReplicationRefused,
        "fenced",
    );
    let err = ReplData::from_frame(&through_bytes(&frame)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::ReplicationRefused);
    assert_eq!(err.remote().unwrap().message, "fenced");
}

#[test]
fn a_repl_data_frame_with_a_garbage_header_is_an_error_not_a_panic() {
    let good = sample_repl_data().to_frame(6, sample_batch());
    let must_fail = |header: &[u8]| match ReplData::from_frame(&with_header(good.clone(), header)) {
        Err(WireError::BadHeader {
            request_id: 6,
            opcode: 21,
            ..
        }) => {}
        other => panic!("header {header:?}: {other:?}"),
    };
    must_fail(&[]);
    for len in 1..64 {
        must_fail(&vec![0xff; len]);
    }
    // Cut at every length: caught, unless only the trailing zero padding went.
    for cut in 1..good.header.len() {
        if good.header[cut..].iter().any(|b| *b != 0) {
            must_fail(&good.header[..cut]);
        }
    }
    // Zeros are the one harmless garbage: from 4 bytes on they verify as a table whose vtable
    // lists no fields, so every field reads as its default (FlatBuffers cannot make a scalar
    // required). That is a heartbeat at position 0, not a panic or an out-of-range read.
    for len in 1..64 {
        match ReplData::from_frame(&with_header(good.clone(), &vec![0; len])) {
            Err(WireError::BadHeader { .. }) => {}
            Ok(ReplData {
                position: 0,
                master_end: 0,
                master_time_ms: 0,
                confirmed: 0,
            }) => {}
            other => panic!("{len} zero bytes: {other:?}"),
        }
    }
    // Seeded random headers and random mutations of the good one.
    let mut rng = StdRng::seed_from_u64(0x5eed_0021);
    for _ in 0..20_000 {
        let header: Vec<u8> = if rng.gen_bool(0.5) {
            let len = rng.gen_range(0..128);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            let mut h = good.header.to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..h.len());
                h[at] = rng.gen();
            }
            h
        };
        let frame = with_header(good.clone(), &header);
        if let Err(e) = ReplData::from_frame(&frame) {
            assert!(matches!(e, WireError::BadHeader { .. }), "{e}");
        }
        if let Err(e) = ReplAck::from_frame(&Frame {
            opcode: Opcode::ReplAck.as_u16(),
            ..frame
        }) {
            assert!(matches!(e, WireError::BadHeader { .. }), "{e}");
        }
    }
}

#[test]
fn a_repl_ack_frame_is_not_an_ordinary_request() {
    let frame = through_bytes(&sample_repl_ack().to_frame(31));
    let err = Request::from_frame(&frame).unwrap_err();
    assert_eq!(
        err,
        WireError::ReplicationStreamOnly {
            request_id: 31,
            opcode: 22
        }
    );
    // The broker can answer it like any other bad frame before closing.
    let reply = error_frame_for(frame.opcode, &err).unwrap();
    assert_eq!((reply.request_id, reply.opcode), (31, 22));
    assert_eq!(ErrorCode::from_u16(reply.status), ErrorCode::MalformedFrame);

    let data = through_bytes(&sample_repl_data().to_frame(32, sample_batch()));
    assert!(matches!(
        Request::from_frame(&data),
        Err(WireError::ReplicationStreamOnly {
            request_id: 32,
            opcode: 21
        })
    ));
    let mut as_response = data;
    as_response.flags = FrameFlags::RESPONSE;
    assert!(matches!(
        Response::from_frame(Opcode::ReplData, &as_response),
        Err(WireError::ReplicationStreamOnly { .. })
    ));
}

#[test]
fn the_longest_epoch_history_round_trips_and_a_longer_one_is_refused() {
    let epochs: Vec<EpochEntry> = (0..MAX_EPOCH_ENTRIES as u64)
        .map(|i| EpochEntry {
            epoch: i + 1,
            start: i << 20,
        })
        .collect();
    let req = Request::ReplFollow(ReplFollowRequest {
        shard: 1,
        shards: 2,
        segment_bytes: 1 << 30,
        log_end: u64::MAX,
        epochs: epochs.clone(),
        log_durable: u64::MAX,
        node_id: u32::MAX,
    });
    let frame = through_bytes(&req.to_frame(8, Bytes::new()));
    assert!(frame.header.len() <= MAX_HEADER_BYTES as usize);
    assert_eq!(Request::from_frame(&frame).unwrap(), req);

    // One more entry, written by hand since the encoder refuses it in debug builds.
    let mut fbb = FlatBufferBuilder::new();
    let items: Vec<fb::EpochEntry> = (0..=MAX_EPOCH_ENTRIES as u64)
        .map(|i| fb::EpochEntry::new(i + 1, i))
        .collect();
    let items = fbb.create_vector(&items);
    let args = fb::ReplFollowResponseArgs {
        start: 0,
        master_end: 0,
        want_durable: false,
        epochs: Some(items),
        reset: false,
    };
    let root = fb::ReplFollowResponse::create(&mut fbb, &args);
    fbb.finish_minimal(root);
    let resp = Response::ReplFollowing(ReplFollowResponse {
        start: 0,
        master_end: 0,
        want_durable: false,
        epochs: vec![],
        reset: false,
    });
    let frame = with_header(resp.to_frame(9, Bytes::new()), fbb.finished_data());
    let err = Response::from_frame(Opcode::ReplFollow, &frame).unwrap_err();
    assert!(
        matches!(err, WireError::BadHeader { request_id: 9, .. }),
        "{err}"
    );
}

#[test]
fn promote_round_trips_and_accepts_an_empty_header() {
    let frame = through_bytes(&Request::Promote.to_frame(1, Bytes::new()));
    assert_eq!(Request::from_frame(&frame).unwrap(), Request::Promote);
    let empty = with_header(frame, &[]);
    assert_eq!(Request::from_frame(&empty).unwrap(), Request::Promote);
    let resp = Response::Promoted { epoch: u64::MAX };
    let frame = through_bytes(&resp.to_frame(1, Bytes::new()));
    assert_eq!(Response::from_frame(Opcode::Promote, &frame).unwrap(), resp);
}

#[test]
fn broker_stats_with_replicas_round_trip_by_shard_index() {
    let mut master = streaming_slave();
    master.role = ReplicaStats::ROLE_MASTER;
    master.link = ReplicaStats::LINK_CONNECTING;
    let shards = vec![
        shard_stats(0, master),
        shard_stats(1, streaming_slave()),
        shard_stats(2, ReplicaStats::default()),
    ];
    let resp = Response::BrokerStats(shards.clone());
    let frame = through_bytes(&resp.to_frame(2, Bytes::new()));
    let Response::BrokerStats(got) = Response::from_frame(Opcode::BrokerStats, &frame).unwrap()
    else {
        panic!("not broker stats")
    };
    assert_eq!(got, shards);
    assert_eq!(
        (
            got[0].replication.role_name(),
            got[0].replication.link_name()
        ),
        ("master", "connecting")
    );
    assert_eq!(
        (
            got[1].replication.role_name(),
            got[1].replication.link_name()
        ),
        ("slave", "streaming")
    );
    assert_eq!(got[2].replication.link_name(), "none");
}

#[test]
fn replica_numbers_from_a_newer_broker_have_a_name_too() {
    let r = ReplicaStats {
        role: 9,
        link: 200,
        ..ReplicaStats::default()
    };
    assert_eq!((r.role_name(), r.link_name()), ("unknown", "unknown"));
}

/// A BrokerStats header as a broker from before replication writes it: no `replicas`.
fn old_broker_stats_header(shards: &[ShardStats]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let items: Vec<fb::ShardStats> = shards
        .iter()
        .map(|s| {
            fb::ShardStats::new(
                s.shard,
                s.written,
                s.durable,
                s.visible,
                s.fsyncs,
                s.appends,
                s.unflushed_bytes,
                s.unflushed_bytes_max,
                s.flush_latency_us_total,
                s.connections,
                s.poisoned,
            )
        })
        .collect();
    let items = fbb.create_vector(&items);
    let args = fb::BrokerStatsResponseArgs {
        shards: Some(items),
        replicas: None,
    };
    let root = fb::BrokerStatsResponse::create(&mut fbb, &args);
    fbb.finish_minimal(root);
    fbb.finished_data().to_vec()
}

#[test]
fn broker_stats_from_an_older_broker_read_default_replicas() {
    let shards = vec![
        shard_stats(0, ReplicaStats::default()),
        shard_stats(1, ReplicaStats::default()),
    ];
    let frame = with_header(
        Response::BrokerStats(vec![]).to_frame(3, Bytes::new()),
        &old_broker_stats_header(&shards),
    );
    assert_eq!(
        Response::from_frame(Opcode::BrokerStats, &frame).unwrap(),
        Response::BrokerStats(shards)
    );
}

#[test]
fn fewer_replicas_than_shards_leave_the_rest_at_defaults() {
    let mut fbb = FlatBufferBuilder::new();
    let shards: Vec<fb::ShardStats> = (0..3)
        .map(|i| fb::ShardStats::new(i, 0, 0, 0, 0, 0, 0, 0, 0, 0, false))
        .collect();
    let shards = fbb.create_vector(&shards);
    let replicas = fbb.create_vector(&[fb::ReplicaStats::new(1, 2, 7, 0, 0, 0, 0, 0, 0, 1)]);
    let args = fb::BrokerStatsResponseArgs {
        shards: Some(shards),
        replicas: Some(replicas),
    };
    let root = fb::BrokerStatsResponse::create(&mut fbb, &args);
    fbb.finish_minimal(root);
    let frame = with_header(
        Response::BrokerStats(vec![]).to_frame(3, Bytes::new()),
        fbb.finished_data(),
    );
    let Response::BrokerStats(got) = Response::from_frame(Opcode::BrokerStats, &frame).unwrap()
    else {
        panic!("not broker stats")
    };
    assert_eq!(got.len(), 3);
    assert_eq!(
        (got[0].replication.epoch, got[0].replication.link_name()),
        (7, "streaming")
    );
    assert_eq!(got[1].replication, ReplicaStats::default());
    assert_eq!(got[2].replication, ReplicaStats::default());
}

#[test]
fn broker_info_from_an_older_broker_reads_empty_replication_fields() {
    let mut fbb = FlatBufferBuilder::new();
    let version = fbb.create_string("0.1.0");
    let flush_mode = fbb.create_string("ASYNC_FLUSH");
    let role = fbb.create_string("master");
    let config_toml = fbb.create_string("");
    let args = fb::BrokerInfoResponseArgs {
        version: Some(version),
        shards: 2,
        flush_mode: Some(flush_mode),
        role: Some(role),
        config_toml: Some(config_toml),
        ..Default::default()
    };
    let root = fb::BrokerInfoResponse::create(&mut fbb, &args);
    fbb.finish_minimal(root);
    let frame = with_header(
        Response::Pong.to_frame(4, Bytes::new()),
        fbb.finished_data(),
    );
    let frame = Frame {
        opcode: Opcode::BrokerInfo.as_u16(),
        ..frame
    };
    let Response::BrokerInfo(info) = Response::from_frame(Opcode::BrokerInfo, &frame).unwrap()
    else {
        panic!("not broker info")
    };
    assert_eq!(
        (
            info.epoch,
            info.master_address.as_str(),
            info.replication.as_str()
        ),
        (0, "", "")
    );
    assert_eq!((info.shards, info.role.as_str()), (2, "master"));
}

fn produce_ack_from(
    build: impl FnOnce(&mut FlatBufferBuilder) -> fb::ProduceResponseArgs,
) -> ProduceAck {
    let mut fbb = FlatBufferBuilder::new();
    let args = build(&mut fbb);
    let root = fb::ProduceResponse::create(&mut fbb, &args);
    fbb.finish_minimal(root);
    let frame = with_header(
        Response::Pong.to_frame(5, Bytes::new()),
        fbb.finished_data(),
    );
    let frame = Frame {
        opcode: Opcode::Produce.as_u16(),
        ..frame
    };
    let Response::Produced(ack) = Response::from_frame(Opcode::Produce, &frame).unwrap() else {
        panic!("not a produce ack")
    };
    ack
}

#[test]
fn a_produce_ack_from_an_older_broker_says_unknown_durability_and_epoch_zero() {
    let ack = produce_ack_from(|_| fb::ProduceResponseArgs {
        queue: 1,
        base_offset: 10,
        count: 1,
        duplicate: false,
        ..Default::default()
    });
    assert_eq!((ack.durability, ack.epoch), (Durability::Unknown, 0));
}

#[test]
fn a_durability_level_this_build_does_not_know_reads_as_unknown() {
    let ack = produce_ack_from(|_| fb::ProduceResponseArgs {
        durability: fb::Durability(200),
        epoch: 3,
        ..Default::default()
    });
    assert_eq!((ack.durability, ack.epoch), (Durability::Unknown, 3));
}

#[test]
fn durability_levels_are_ordered_and_print_their_stable_names() {
    let ladder = [
        Durability::Unknown,
        Durability::Memory,
        Durability::Disk,
        Durability::ReplicaReceived,
        Durability::ReplicaDurable,
    ];
    assert!(ladder.windows(2).all(|w| w[0] < w[1]));
    let names: Vec<String> = ladder.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        names,
        [
            "unknown",
            "memory",
            "disk",
            "replica-received",
            "replica-durable"
        ]
    );
}
