//! A cluster topic spread over two broker groups on a real etcd cluster (3 members on
//! 127.0.0.1), brokers as real processes: every broker routes it (a slave of another group
//! too), each group's master serves only its own queues and refuses the others' with
//! NOT_MASTER naming their group, and a producer given a single broker follows failovers of
//! both groups by itself, every acked message stored once in the group that serves its
//! queue. Consumer groups on such a topic are refused (not built yet).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::process::BrokerProcess;
use common::{free_port, wait_until};
use ringmq::client::{
    Admin, Consumer, GroupConfig, GroupConsumer, Producer, ProducerConfig, QueueSelector,
};
use ringmq::cluster::etcd::Etcd;
use ringmq::format::batch::Message;
use ringmq::protocol::ErrorCode;

const TOPIC: &str = "orders";
const QUEUES: u32 = 4;

/// A SYNC_MASTER member `node` of broker group `group` on core `core`, one shard.
fn member(
    group: &str,
    node: &str,
    dir: &Path,
    core: usize,
    port: u16,
    etcd: &str,
) -> BrokerProcess {
    let cluster = format!("etcd={etcd}");
    let extra = [
        "--cluster",
        &cluster,
        "--group",
        group,
        "--node",
        node,
        "--replication",
        "sync_master",
        "--lease-ttl-secs",
        "2",
    ];
    BrokerProcess::start_on_port(dir, &format!("{core},"), port, &extra, &[])
}

fn in_sync(etcd: &Etcd, group: &str) -> String {
    etcd.get(&format!("/ringmq/ringmq/groups/{group}/in_sync"))
        .ok()
        .flatten()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default()
}

/// Queue -> (group, address) as the broker at `addr` routes the topic.
fn route_of(addr: &str) -> Option<Vec<(String, String)>> {
    let route = Admin::connect(addr).ok()?.route(TOPIC).ok()?;
    Some(
        route
            .queues
            .iter()
            .map(|q| (q.group.clone().unwrap_or_default(), q.address.clone()))
            .collect(),
    )
}

/// One message to `queue` of the topic, sent straight to `addr` (no routes asked).
fn produce_at(addr: &str, queue: u32) -> Result<(), ringmq::client::ClientError> {
    common::produce_one(addr, TOPIC, queue, 0)
}

/// Messages in each queue of the topic on the broker at `addr` itself.
fn local_ends(addr: &str) -> Vec<u64> {
    let stats = Admin::connect(addr).unwrap().queue_stats(TOPIC).unwrap();
    (0..QUEUES)
        .map(|q| {
            stats
                .iter()
                .find(|s| s.queue == q)
                .map_or(0, |s| s.end_offset)
        })
        .collect()
}

#[test]
fn a_cluster_topic_is_served_by_each_groups_master_and_its_producer_follows_a_failover() {
    let _watchdog = common::watchdog(Duration::from_secs(150));
    let Some(etcd) = EtcdCluster::start(3) else {
        return;
    };
    let endpoints = etcd.endpoint_list();
    let client = Etcd::new(&etcd.endpoints(), Duration::from_secs(1)).unwrap();
    let tmp = common::data_dir();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let dir = |n: &str| tmp.path().join(n);

    // g1: a1 (master), a2; g2: b1 (master), b2. Masters on different cores.
    let a1 = member("g1", "a1", &dir("a1"), 0, ports[0], &endpoints);
    wait_until("a1 elected", Duration::from_secs(15), || {
        a1.log().contains("cluster: master of group g1")
    });
    let b1 = member("g2", "b1", &dir("b1"), 1, ports[2], &endpoints);
    wait_until("b1 elected", Duration::from_secs(15), || {
        b1.log().contains("cluster: master of group g2")
    });
    let a2 = member("g1", "a2", &dir("a2"), 1, ports[1], &endpoints);
    let b2 = member("g2", "b2", &dir("b2"), 0, ports[3], &endpoints);

    // Created through etcd: each group's master creates it, the command waits for both.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args([
            "admin",
            "cluster",
            "--etcd",
            &endpoints,
            "topic-create",
            TOPIC,
        ])
        .args(["--queues", &QUEUES.to_string(), "--groups", "g1,g2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("group g1: ready") && text.contains("group g2: ready"),
        "{text}"
    );
    wait_until("a2 and b2 in sync", Duration::from_secs(20), || {
        in_sync(&client, "g1").contains("\"a2\"") && in_sync(&client, "g2").contains("\"b2\"")
    });

    // Every broker routes it alike: even queues to g1's master, odd ones to g2's.
    let want: Vec<(String, String)> = (0..QUEUES)
        .map(|q| match q % 2 {
            0 => ("g1".to_string(), addr(0)),
            _ => ("g2".to_string(), addr(2)),
        })
        .collect();
    for i in 0..4 {
        wait_until(
            &format!("broker {i} to route the topic"),
            Duration::from_secs(10),
            || route_of(&addr(i)).as_ref() == Some(&want),
        );
    }

    // A queue of the other group is refused, and nothing is stored for it.
    let refused = produce_at(&addr(0), 1).expect_err("g1's master took a message for g2's queue");
    assert_eq!(refused.code(), Some(ErrorCode::NotMaster), "{refused}");
    assert!(refused.to_string().contains("group g2"), "{refused}");
    produce_at(&addr(2), 1).expect("g2's master takes its own queue");
    // Consumer groups are coordinated per broker: refused on a topic that spans groups.
    let refused = GroupConsumer::join(&addr(0), GroupConfig::new("cg", &[TOPIC]))
        .err()
        .expect("a consumer group joined a topic of two groups");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::InvalidArgument),
        "{refused}"
    );

    // A pipelined producer given one broker only (a slave of g1): its routes come from it.
    // g2's master is killed first, then (once g2 acks again) g1's: the second new master's
    // epoch is above the first's, and a producer that told g2's promoted master of it would
    // fence it (epochs are per group). Sending ends once g1 acks again too.
    let mut config = ProducerConfig::new(addr(1));
    config.linger = Duration::from_millis(1);
    let producer = Producer::with_config(config).unwrap();
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    // Per group, when its master was killed and the first ack of its queues sent after that.
    let killed: [Arc<Mutex<Option<Instant>>>; 2] = Default::default();
    let back: [Arc<Mutex<Option<Instant>>>; 2] = Default::default();
    let (mut a1, mut b1) = (Some(a1), Some(b1));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after_both = 0;
    let mut n = 0u64;
    while after_both < 500 {
        assert!(Instant::now() < deadline, "the failovers took over 60 s");
        let (acks, failed) = (acked.clone(), failed.clone());
        let queue = (n % u64::from(QUEUES)) as u32;
        let g = (queue % 2) as usize;
        let sent_after_kill = killed[g].lock().unwrap().is_some();
        let back_g = back[g].clone();
        producer
            .send_async(
                TOPIC,
                QueueSelector::Queue(queue),
                &Message::new(n.to_string().into_bytes()),
                move |r| match r {
                    Ok(_) => {
                        acks.lock().unwrap().push(n);
                        if sent_after_kill {
                            back_g.lock().unwrap().get_or_insert_with(Instant::now);
                        }
                    }
                    Err(e) => failed.lock().unwrap().push(format!("{n}: {e}")),
                },
            )
            .unwrap();
        n += 1;
        let so_far = acked.lock().unwrap().len();
        if so_far >= 800 && b1.is_some() {
            b1.take().unwrap().kill9();
            *killed[1].lock().unwrap() = Some(Instant::now());
        }
        if back[1].lock().unwrap().is_some() && a1.is_some() {
            a1.take().unwrap().kill9();
            *killed[0].lock().unwrap() = Some(Instant::now());
        }
        if back[0].lock().unwrap().is_some() {
            after_both += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    producer.flush();
    wait_until("every send to finish", Duration::from_secs(60), || {
        acked.lock().unwrap().len() + failed.lock().unwrap().len() == n as usize
    });
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "sends failed: {failed:?}");
    for (g, name) in [(1, "g2"), (0, "g1")] {
        let (killed, back) = (killed[g].lock().unwrap(), back[g].lock().unwrap());
        eprintln!(
            "{name} failover: kill -> first ack of its queues sent after it {:?}",
            back.unwrap().saturating_duration_since(killed.unwrap())
        );
    }

    // a2 took over g1 and b2 g2, and routes say so.
    let want_after: Vec<(String, String)> = (0..QUEUES)
        .map(|q| match q % 2 {
            0 => ("g1".to_string(), addr(1)),
            _ => ("g2".to_string(), addr(3)),
        })
        .collect();
    wait_until("routes to name b2", Duration::from_secs(10), || {
        route_of(&addr(1)).as_ref() == Some(&want_after)
    });

    // Every acked message once, in the group that serves its queue; g1 holds none of g2's.
    let consumer = Consumer::connect(&addr(1)).unwrap();
    let mut count: HashMap<u64, usize> = HashMap::new();
    for (q, _, payload) in common::read_all(&consumer, TOPIC, QUEUES) {
        let Ok(n) = String::from_utf8_lossy(&payload).parse::<u64>() else {
            continue; // the one message produced straight to g2 above
        };
        assert_eq!(
            u64::from(q),
            n % u64::from(QUEUES),
            "message {n} in queue {q}"
        );
        *count.entry(n).or_default() += 1;
    }
    for n in acked.lock().unwrap().iter() {
        assert_eq!(count.get(n), Some(&1), "acked message {n}");
    }
    let g1_ends = local_ends(&addr(1));
    assert_eq!(
        (g1_ends[1], g1_ends[3]),
        (0, 0),
        "g1 stored g2's queues: {g1_ends:?}"
    );
    let g2_ends = local_ends(&addr(3));
    assert_eq!(
        (g2_ends[0], g2_ends[2]),
        (0, 0),
        "g2 stored g1's queues: {g2_ends:?}"
    );

    // What a person sees.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmq"))
        .args(["admin", "cluster", "--etcd", &endpoints])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("topic=orders queues=4 groups=g1,g2"),
        "{text}"
    );
    drop((a2, b2));
}
