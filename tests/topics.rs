//! Topic metadata: shard 0 is the table's only writer, and concurrent changes all land.

mod common;

use ringmq::client::Admin;

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
