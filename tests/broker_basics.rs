//! A real broker on 127.0.0.1: control requests, routes over shards, restarts.

mod common;

use common::TestBroker;
use ringmq::client::Admin;
use ringmq::protocol::ErrorCode;

#[test]
fn ping_and_broker_info_answer() {
    let b = TestBroker::start();
    let admin = Admin::connect(&b.addr()).unwrap();
    admin.ping().unwrap();
    let info = admin.broker_info().unwrap();
    assert_eq!(info.shards as usize, common::available_cores().min(2));
    assert!(info.config_toml.contains("flush_mode"));
}

#[test]
fn created_topic_routes_over_all_shards_and_survives_a_restart() {
    let mut b = TestBroker::start();
    let shards = common::available_cores().min(2);
    {
        let admin = Admin::connect(&b.addr()).unwrap();
        admin.create_topic("t", 8).unwrap();
        let route = admin.route("t").unwrap();
        assert_eq!(route.queues.len(), 8);
        let mut per_shard = vec![0; shards];
        for q in &route.queues {
            per_shard[q.shard as usize] += 1;
            assert_eq!(q.address, b.shard_addrs()[q.shard as usize]);
        }
        assert!(per_shard.iter().all(|n| *n == 8 / shards), "{per_shard:?}");
    }
    b.restart();
    let admin = Admin::connect(&b.addr()).unwrap();
    let topics = admin.list_topics().unwrap();
    assert_eq!(topics.len(), 1);
    assert_eq!((topics[0].name.as_str(), topics[0].queues), ("t", 8));
    assert_eq!(admin.route("t").unwrap().queues.len(), 8);
}

#[test]
fn create_topic_through_a_non_zero_shard_is_seen_by_every_shard() {
    let b = TestBroker::start();
    let addrs = b.shard_addrs();
    let last = Admin::connect(addrs.last().unwrap()).unwrap();
    last.create_topic("via-last", 4).unwrap();
    for a in &addrs {
        let admin = Admin::connect(a).unwrap();
        assert_eq!(admin.route("via-last").unwrap().queues.len(), 4);
    }
}

#[test]
fn control_errors_have_stable_codes() {
    let b = TestBroker::start();
    let admin = Admin::connect(&b.addr()).unwrap();
    let code = |r: Result<_, ringmq::client::ClientError>| r.unwrap_err().code();
    assert_eq!(
        code(admin.route("nope").map(|_| ())),
        Some(ErrorCode::TopicNotFound)
    );
    assert_eq!(
        code(admin.create_topic("bad name", 1)),
        Some(ErrorCode::InvalidTopic)
    );
    assert_eq!(
        code(admin.create_topic("zero", 0)),
        Some(ErrorCode::InvalidArgument)
    );
    admin.create_topic("x", 2).unwrap();
    admin.create_topic("x", 2).unwrap();
    assert_eq!(
        code(admin.create_topic("x", 3)),
        Some(ErrorCode::TopicExists)
    );
}

#[test]
fn a_second_broker_on_the_same_port_is_refused() {
    let b = TestBroker::start();
    let port = b.broker.as_ref().unwrap().address().port();
    let tmp = common::data_dir();
    let mut cfg = common::test_config(tmp.path());
    cfg.server.port = port;
    cfg.server.cores = ringmq::config::CoreSelection::Count(1);
    let err = ringmq::server::Broker::start(cfg).err().expect("must fail");
    assert!(err.to_string().contains("cannot listen"), "{err}");
}
