//! The blocking etcd client against real etcd processes (tests/common/etcd.rs): leases that
//! keep or lose their keys, the three election transactions, prefix reads, failover to
//! another member, and errors that name every endpoint when none answers. A few tests use
//! fake servers on loopback for answers etcd never gives (garbage, silence).
//!
//! Without an `etcd` binary the etcd tests print SKIP (a failure under `CI=true`).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use ringmq::cluster::etcd::{Etcd, EtcdError};

/// Polls `f` every 50 ms until it is true or `within` passed; whether it became true.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a 1 s lease may take to expire: its TTL, etcd's 500 ms expiry check, a raft
/// round and slack for a loaded machine.
const LEASE_GONE_WITHIN: Duration = Duration::from_secs(6);

#[test]
fn a_kept_alive_lease_keeps_its_key_and_an_abandoned_one_loses_it() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = cluster.client();
    let kept = etcd.grant_lease(1).unwrap();
    let abandoned = etcd.grant_lease(1).unwrap();
    assert_ne!(kept, abandoned);
    etcd.put("/t/lease/kept", b"k", Some(kept)).unwrap();
    etcd.put("/t/lease/abandoned", b"a", Some(abandoned))
        .unwrap();

    // Three TTLs of keepalives: the kept key stays, the abandoned one goes.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let ttl = etcd.keep_alive(kept).unwrap();
        assert!(ttl.is_some_and(|t| t >= 1), "keepalive answered {ttl:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // What `admin cluster` shows of a lease: time left and granted, or gone.
    etcd.keep_alive(kept).unwrap();
    let (left, granted) = etcd.time_to_live(kept).unwrap().expect("the kept lease");
    assert!(granted >= 1 && left <= granted, "{left}/{granted}");
    let key = etcd
        .get("/t/lease/kept")
        .unwrap()
        .expect("the kept-alive key");
    assert_eq!((key.value.as_slice(), key.lease), (&b"k"[..], kept));
    assert!(
        eventually(LEASE_GONE_WITHIN, || etcd
            .get("/t/lease/abandoned")
            .unwrap()
            .is_none()),
        "the key of an abandoned lease is still there"
    );
    assert_eq!(etcd.time_to_live(abandoned).unwrap(), None);
    assert_eq!(
        etcd.keep_alive(abandoned).unwrap(),
        None,
        "an expired lease renews"
    );
    etcd.revoke_lease(abandoned)
        .expect("revoking a gone lease is Ok");

    etcd.revoke_lease(kept).unwrap();
    assert_eq!(
        etcd.get("/t/lease/kept").unwrap(),
        None,
        "revoke deletes its keys"
    );
    assert_eq!(etcd.keep_alive(kept).unwrap(), None);
}

#[test]
fn create_if_absent_lets_the_first_win_and_tells_the_second_who_holds_the_key() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = cluster.client();
    let (a, b) = (etcd.grant_lease(30).unwrap(), etcd.grant_lease(30).unwrap());
    let key = "/t/election/group-1";
    let first = etcd
        .create_if_absent(key, b"broker-a", Some(a))
        .unwrap()
        .expect("the first create wins");
    assert_eq!((first.key.as_str(), first.lease), (key, a));
    assert!(first.create_revision > 0);
    assert_eq!(etcd.get(key).unwrap().as_ref(), Some(&first), "as created");

    let holder = etcd
        .create_if_absent(key, b"broker-b", Some(b))
        .unwrap()
        .expect_err("the second create loses");
    assert_eq!(holder, first, "the loser is told the winner's key");
    assert_eq!(etcd.get(key).unwrap().unwrap().value, b"broker-a");

    // Without leases, too; and once the holder is gone, the next create wins anew.
    let plain = etcd
        .create_if_absent("/t/plain", b"1", None)
        .unwrap()
        .unwrap();
    assert_eq!(plain.lease, 0);
    assert!(etcd
        .create_if_absent("/t/plain", b"2", None)
        .unwrap()
        .is_err());
    etcd.revoke_lease(a).unwrap();
    let second = etcd
        .create_if_absent(key, b"broker-b", Some(b))
        .unwrap()
        .expect("the key is free again");
    assert!(second.create_revision > first.create_revision);
}

#[test]
fn put_if_guard_refuses_once_the_guard_expired_or_was_recreated() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = cluster.client();
    let (guard, data) = ("/t/guard/master", "/t/guard/epoch");
    let lease = etcd.grant_lease(1).unwrap();
    let held = etcd
        .create_if_absent(guard, b"a", Some(lease))
        .unwrap()
        .unwrap();
    assert!(etcd
        .put_if_guard(guard, held.create_revision, data, b"1", None)
        .unwrap());
    assert_eq!(etcd.get(data).unwrap().unwrap().value, b"1");

    // No keepalive: the guard expires, and a write under it is refused.
    assert!(
        eventually(LEASE_GONE_WITHIN, || etcd.get(guard).unwrap().is_none()),
        "the guard never expired"
    );
    assert!(!etcd
        .put_if_guard(guard, held.create_revision, data, b"2", None)
        .unwrap());
    assert_eq!(
        etcd.get(data).unwrap().unwrap().value,
        b"1",
        "the refused put wrote"
    );

    // Another holder re-creates the guard: the old create_revision is refused, the new one
    // is not.
    let again = etcd.create_if_absent(guard, b"b", None).unwrap().unwrap();
    assert!(!etcd
        .put_if_guard(guard, held.create_revision, data, b"3", None)
        .unwrap());
    assert!(!etcd.put_if_guard(guard, 0, data, b"3", None).unwrap());
    assert!(etcd
        .put_if_guard(guard, again.create_revision, data, b"4", None)
        .unwrap());
    assert_eq!(etcd.get(data).unwrap().unwrap().value, b"4");
}

#[test]
fn delete_if_created_at_deletes_only_the_key_it_names() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = cluster.client();
    let key = "/t/resign/master";
    let old = etcd.create_if_absent(key, b"a", None).unwrap().unwrap();
    assert!(!etcd
        .delete_if_created_at(key, old.create_revision + 1)
        .unwrap());
    assert!(!etcd.delete_if_created_at(key, 0).unwrap());
    assert!(etcd.get(key).unwrap().is_some(), "a wrong revision deleted");
    assert!(etcd.delete_if_created_at(key, old.create_revision).unwrap());
    assert_eq!(etcd.get(key).unwrap(), None);
    assert!(!etcd.delete_if_created_at(key, old.create_revision).unwrap());

    // A successor's key is not deleted by the old holder's revision.
    let new = etcd.create_if_absent(key, b"b", None).unwrap().unwrap();
    assert!(!etcd.delete_if_created_at(key, old.create_revision).unwrap());
    assert_eq!(etcd.get(key).unwrap(), Some(new));
}

#[test]
fn get_prefix_returns_exactly_the_keys_under_it_sorted() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = cluster.client();
    let every_byte: Vec<u8> = (0..=255).collect();
    for key in [
        "/t/p/c", "/t/p/a", "/t/q", "/t/p/b/x", "/t/p", "/t/p/", "/t/p0",
    ] {
        etcd.put(key, &every_byte, None).unwrap();
    }
    let kvs = etcd.get_prefix("/t/p/").unwrap();
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/p/", "/t/p/a", "/t/p/b/x", "/t/p/c"]);
    assert!(kvs.iter().all(|kv| kv.value == every_byte), "binary values");
    assert!(etcd.get_prefix("/nothing/").unwrap().is_empty());
    let all = etcd.get_prefix("").unwrap();
    assert!(all.len() >= 7 && all.windows(2).all(|w| w[0].key < w[1].key));
}

#[test]
fn killing_the_member_in_use_moves_the_client_to_another() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let etcd = cluster.client();
    let lease = etcd.grant_lease(30).unwrap();
    etcd.put("/t/failover/a", b"1", Some(lease)).unwrap();
    let victim = cluster.member_at(etcd.last_endpoint());
    cluster.kill(victim);

    let started = Instant::now();
    etcd.put("/t/failover/b", b"2", None)
        .expect("a put with one member of three dead");
    eprintln!(
        "the first call after killing member {victim} took {:?}",
        started.elapsed()
    );
    assert_ne!(cluster.member_at(etcd.last_endpoint()), victim);
    assert_eq!(etcd.get("/t/failover/a").unwrap().unwrap().value, b"1");
    assert!(etcd.keep_alive(lease).unwrap().is_some());
    assert!(etcd
        .create_if_absent("/t/failover/c", b"3", None)
        .unwrap()
        .is_ok());
    assert_eq!(etcd.get_prefix("/t/failover/").unwrap().len(), 3);

    // Back on its data dir, the victim rejoins and serves what it missed.
    cluster.restart(victim);
    let only_victim = Etcd::new(
        &[cluster.endpoints()[victim].clone()],
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || only_victim
            .get("/t/failover/c")
            .is_ok_and(|kv| kv.is_some())),
        "the restarted member never caught up"
    );
}

#[test]
fn without_a_quorum_every_endpoint_is_named_in_the_error() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let etcd = Etcd::new(&[cluster.endpoint_list()], timeout).unwrap();
    etcd.put("/t/quorum", b"1", None).unwrap();
    cluster.kill(1);
    cluster.kill(2);

    // The survivor notices after an election timeout that it has no leader; until then a
    // put may wait for our timeout. Either way: Unreachable, within two timeouts per
    // endpoint, naming each.
    let started = Instant::now();
    let err = etcd.put("/t/quorum", b"2", None).unwrap_err();
    let took = started.elapsed();
    let EtcdError::Unreachable { endpoints, detail } = &err else {
        panic!("not Unreachable: {err}");
    };
    assert!(
        took <= 2 * 3 * timeout + Duration::from_millis(500),
        "{took:?}"
    );
    for e in cluster.endpoints() {
        assert!(
            endpoints.contains(&e) && detail.contains(&e),
            "{e} not named in {err}"
        );
    }
    eprintln!("{err}");

    cluster.restart(1);
    assert!(
        eventually(Duration::from_secs(10), || etcd
            .put("/t/quorum", b"3", None)
            .is_ok()),
        "no quorum again after a restart"
    );
}

/// A loopback server that runs `answer` on each connection it accepts.
fn fake_server(answer: fn(std::net::TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || answer(stream));
        }
    });
    addr
}

/// Reads the request head and body (enough for the client to have sent it all).
fn read_request(stream: &mut std::net::TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.read(&mut buf);
}

#[test]
fn dead_and_silent_endpoints_are_all_tried_once_and_named() {
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // Accepted by the kernel's backlog, never read.
    let deaf = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = fake_server(|mut s| {
        read_request(&mut s);
        std::thread::sleep(Duration::from_secs(10));
    });
    let endpoints = vec![refused, deaf.local_addr().unwrap().to_string(), silent];
    let timeout = Duration::from_millis(500);
    let etcd = Etcd::new(&endpoints, timeout).unwrap();
    let started = Instant::now();
    let err = etcd.get("/x").unwrap_err();
    let took = started.elapsed();
    assert!(took <= 2 * 3 * timeout, "took {took:?}");
    assert!(
        took >= 2 * timeout,
        "the silent ones were not waited for: {took:?}"
    );
    let EtcdError::Unreachable { detail, .. } = &err else {
        panic!("not Unreachable: {err}");
    };
    for e in &endpoints {
        assert_eq!(detail.matches(e.as_str()).count(), 1, "{e} in {detail}");
    }
    assert!(detail.contains("no answer within"), "{detail}");
}

#[test]
fn garbage_answers_are_protocol_errors() {
    let answers: [fn(std::net::TcpStream); 4] = [
        |mut s| {
            read_request(&mut s);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{{{{{");
        },
        |mut s| {
            read_request(&mut s);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n");
        },
        |mut s| {
            read_request(&mut s);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"kvs\":");
        },
        |mut s| {
            read_request(&mut s);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        },
    ];
    for (i, answer) in answers.into_iter().enumerate() {
        let addr = fake_server(answer);
        let etcd = Etcd::new(&[addr], Duration::from_secs(2)).unwrap();
        match etcd.get("/x") {
            Err(EtcdError::Protocol { .. }) => {}
            other => panic!("answer {i}: {other:?}"),
        }
    }
    // A refusal that is etcd's answer is not retried elsewhere.
    let refusing = fake_server(|mut s| {
        read_request(&mut s);
        let body = r#"{"error":"etcdserver: permission denied","code":7}"#;
        let _ = write!(
            s,
            "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    let etcd = Etcd::new(&[refusing, "127.0.0.1:1".into()], Duration::from_secs(2)).unwrap();
    match etcd.get("/x") {
        Err(EtcdError::Refused { detail, .. }) => assert!(detail.contains("permission denied")),
        other => panic!("{other:?}"),
    }
}

/// A watch on one key: created, then one message per change (a put, a delete), nothing for
/// another key, and a clear end when its member goes away.
#[test]
fn a_watch_reports_each_change_of_its_key_and_ends_when_its_member_dies() {
    use ringmq::cluster::etcd::WatchNews;
    let Some(mut cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = cluster.client();
    let mut watch = etcd.watch("/t/watch/key").unwrap();
    let next = |w: &mut ringmq::cluster::etcd::KeyWatch| w.next(Duration::from_secs(5)).unwrap();
    assert_eq!(next(&mut watch), Some(WatchNews::Created));
    etcd.put("/t/watch/other", b"x", None).unwrap();
    assert_eq!(watch.next(Duration::from_millis(300)).unwrap(), None);
    etcd.put("/t/watch/key", b"1", None).unwrap();
    assert_eq!(next(&mut watch), Some(WatchNews::Changed));
    etcd.put("/t/watch/key", b"2", None).unwrap();
    assert_eq!(next(&mut watch), Some(WatchNews::Changed));
    assert!(etcd
        .delete_if_created_at(
            "/t/watch/key",
            etcd.get("/t/watch/key").unwrap().unwrap().create_revision
        )
        .unwrap());
    assert_eq!(next(&mut watch), Some(WatchNews::Changed));
    assert_eq!(watch.next(Duration::from_millis(300)).unwrap(), None);

    cluster.kill(0);
    let end = (0..50).find_map(|_| watch.next(Duration::from_millis(100)).err());
    let e = end.expect("the watch never ended after its member died");
    assert!(
        e.to_string().contains("closed") || e.to_string().contains("receive"),
        "{e}"
    );
}
