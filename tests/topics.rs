//! Topic metadata: shard 0 is the table's only writer, and concurrent changes all land.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringmq::client::Admin;
use ringmq::protocol::{ErrorCode, Frame, Request, MAX_TOPIC_NAME_BYTES};

use common::TestBroker;

#[test]
fn topics_created_concurrently_from_many_connections_all_survive_a_restart() {
    let mut b = TestBroker::start();
    let addrs = b.shard_addrs();
    // Creates race on shard 0 (forwarded from the other shard too); the table is saved off
    // the executor, so without one writer at a time a create would drop another's topic.
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let addr = addrs[t % addrs.len()].clone();
            std::thread::spawn(move || {
                let admin = Admin::connect(&addr).unwrap();
                for i in 0..8 {
                    admin.create_topic(&format!("t{t}-{i}"), 1 + i % 3).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let count = |b: &TestBroker| {
        let mut names: Vec<String> = Admin::connect(&b.addr())
            .unwrap()
            .list_topics()
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        names.sort();
        names
    };
    assert_eq!(count(&b).len(), 16 * 8);
    b.restart();
    assert_eq!(count(&b).len(), 16 * 8, "the saved table lost topics");
}

/// Sends `request` on a fresh connection and reads the one frame that answers it.
fn round_trip(b: &TestBroker, request: &Request) -> Frame {
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = BytesMut::new();
    request.to_frame(1, Bytes::new()).encode(&mut out);
    s.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(f) = Frame::decode(&mut buf).expect("the broker sends valid frames") {
            return f;
        }
        let n = s.read(&mut chunk).expect("an answer");
        assert!(n > 0, "the broker closed the connection without an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn names_the_old_storage_rule_took_are_refused_on_the_wire_with_the_reason() {
    // Storage used to take up to 255 bytes and `|`; the one rule is 127 bytes of [A-Za-z0-9_.%-].
    let b = TestBroker::start();
    let longest = "t".repeat(MAX_TOPIC_NAME_BYTES);
    let cases = [
        (
            "a|b".to_string(),
            "only letters, digits and _ - . % are allowed",
        ),
        (
            "t".repeat(MAX_TOPIC_NAME_BYTES + 1),
            "longer than 127 bytes",
        ),
        ("t".repeat(255), "longer than 127 bytes"),
    ];
    for (name, reason) in cases {
        let reply = round_trip(
            &b,
            &Request::CreateTopic {
                name: name.clone(),
                queues: 1,
            },
        );
        assert_eq!(
            ErrorCode::from_u16(reply.status),
            ErrorCode::InvalidTopic,
            "{name}"
        );
        let message = String::from_utf8_lossy(&reply.body);
        assert!(message.contains(reason), "{name}: {message}");
    }
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.create_topic(&longest, 1).unwrap();
    // `%` names are the broker's: a client may not create one, a group's creation does.
    let err = admin.create_topic("%RETRY%group-1", 1).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidTopic), "{err}");
    admin.create_group("group-1", 16, 0).unwrap();
    let names: Vec<String> = admin
        .list_topics()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"%RETRY%group-1".to_string()), "{names:?}");
    assert!(names.contains(&"%DLQ%group-1".to_string()), "{names:?}");
}

/// AlterTopic grows a topic: the new queues take messages on the shards `shard_of` gives
/// them, the old ones keep theirs, the count survives a restart; shrinking, an unknown topic
/// and a broker topic are refused with the reason.
#[test]
fn a_topic_grows_its_queues_and_never_shrinks() {
    use ringmq::client::{Consumer, Producer, QueueSelector};
    use ringmq::format::batch::Message;
    let mut b = TestBroker::start();
    b.create_topic("orders", 2);
    let p = Producer::connect(&b.addr()).unwrap();
    p.send("orders", QueueSelector::Queue(1), &Message::new("old"))
        .unwrap();
    drop(p);
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.alter_topic("orders", 5).unwrap();
    admin.alter_topic("orders", 5).unwrap(); // the same count: a no-op
    let route = admin.route("orders").unwrap();
    assert_eq!(route.queues.len(), 5);
    let shards: std::collections::BTreeSet<u32> = route.queues.iter().map(|q| q.shard).collect();
    assert_eq!(
        shards.len(),
        b.shard_addrs().len(),
        "the new queues spread over the shards"
    );
    let p = Producer::connect(&b.addr()).unwrap();
    for q in 0..5 {
        p.send(
            "orders",
            QueueSelector::Queue(q),
            &Message::new(format!("q{q}")),
        )
        .unwrap();
    }
    let check = |b: &TestBroker| {
        let c = Consumer::connect(&b.addr()).unwrap();
        let all = common::read_all(&c, "orders", 5);
        let bodies: Vec<(u32, String)> = all
            .into_iter()
            .map(|(q, _, p)| (q, String::from_utf8(p).unwrap()))
            .collect();
        assert_eq!(
            bodies,
            vec![
                (0, "q0".to_string()),
                (1, "old".to_string()),
                (1, "q1".to_string()),
                (2, "q2".to_string()),
                (3, "q3".to_string()),
                (4, "q4".to_string()),
            ]
        );
    };
    check(&b);
    drop(p);
    drop(admin);
    b.restart();
    check(&b);
    let admin = Admin::connect(&b.addr()).unwrap();
    for (name, queues, code, why) in [
        ("orders", 3, ErrorCode::InvalidArgument, "not shrink"),
        ("nope", 3, ErrorCode::TopicNotFound, "does not exist"),
        ("%DLQ%x", 3, ErrorCode::InvalidTopic, "broker's own"),
    ] {
        let e = admin.alter_topic(name, queues).unwrap_err();
        assert_eq!(e.code(), Some(code), "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }
    assert_eq!(admin.route("orders").unwrap().queues.len(), 5);
}

fn code_of(e: &ringmq::client::ClientError) -> Option<ErrorCode> {
    match e {
        ringmq::client::ClientError::Remote(r) => Some(r.code),
        _ => None,
    }
}

/// What a producer, a consumer and an admin see of a deleted topic.
fn assert_deleted(b: &TestBroker, name: &str) {
    use ringmq::client::{Consumer, Producer, QueueSelector};
    use ringmq::format::batch::Message;
    let admin = Admin::connect(&b.addr()).unwrap();
    let listed: Vec<String> = admin
        .list_topics()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(!listed.contains(&name.to_string()), "{listed:?}");
    let mut cfg = ringmq::client::ProducerConfig::new(b.addr());
    cfg.retries = 0;
    let p = Producer::with_config(cfg).unwrap();
    let e = p
        .send(name, QueueSelector::Queue(0), &Message::new("late"))
        .unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::TopicNotFound), "{e}");
    let c = Consumer::connect(&b.addr()).unwrap();
    let e = c.fetch(name, 0, 0, Duration::from_millis(10)).unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::TopicNotFound), "{e}");
    let e = admin.create_topic(name, 2).unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::TopicExists), "{e}");
    assert!(e.to_string().contains("was deleted"), "{e}");
    assert_eq!(admin.delete_topic(name).unwrap(), 0, "a repeated delete");
}

/// Issue 14: `admin topic delete`. The topic is gone at once for producers, consumers and the
/// list, stays gone across a restart, and its name is not taken again; other topics keep
/// their messages. The change is a record in the topic log before it is in the table file: a
/// broker whose table file lost it (an older file put back) finds it in the log again.
#[test]
fn a_deleted_topic_is_gone_at_once_and_for_good_even_when_the_table_file_lost_the_change() {
    use ringmq::client::{Consumer, Producer, QueueSelector};
    use ringmq::format::batch::Message;
    let mut b = TestBroker::start();
    b.create_topic("doomed", 2);
    b.create_topic("kept", 2);
    let p = Producer::connect(&b.addr()).unwrap();
    for q in 0..2 {
        for t in ["doomed", "kept"] {
            p.send(t, QueueSelector::Queue(q), &Message::new(format!("{t}{q}")))
                .unwrap();
        }
    }
    drop(p);
    let before = std::fs::read(b.dir.join("topics.toml")).unwrap();
    let admin = Admin::connect(&b.addr()).unwrap();
    let e = admin.delete_topic("nope").unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::TopicNotFound), "{e}");
    let e = admin.delete_topic("%SYS%TOPICS").unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::InvalidTopic), "{e}");
    assert_eq!(admin.delete_topic("doomed").unwrap(), 2);
    drop(admin);
    assert_deleted(&b, "doomed");

    b.restart();
    assert_deleted(&b, "doomed");

    // The table file as it was before the delete: the log still has the change.
    b.stop();
    std::fs::write(b.dir.join("topics.toml"), &before).unwrap();
    b.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Admin::connect(&b.addr())
        .unwrap()
        .list_topics()
        .unwrap()
        .iter()
        .any(|t| t.name == "doomed")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the deletion in the topic log was not applied again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_deleted(&b, "doomed");
    let kept = common::read_all(&Consumer::connect(&b.addr()).unwrap(), "kept", 2);
    assert_eq!(kept.len(), 2, "{kept:?}");
}
