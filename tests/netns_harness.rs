//! The two-host harness itself (tests/common/netns.rs): a broker in one namespace is reachable
//! from the other and from nowhere else, link_down partitions and link_up heals, and nothing
//! is left behind. Skips when not root.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::netns::{in_ns, NsBroker, TwoHosts, BROKER_PORT};
use ringmq::client::connection::Connection;
use ringmq::client::Admin;
use ringmq::protocol::{Request, Response};

/// True when a RingMQ broker answers a ping at `addr` from the calling thread's namespace.
/// A connect alone proves nothing in the root namespace: there, a proxy accepts everything.
fn broker_answers(addr: &str) -> bool {
    let Ok(conn) = Connection::connect_timeout(addr, Duration::from_millis(300)) else {
        return false;
    };
    matches!(
        conn.call(&Request::Ping, Bytes::new(), Duration::from_millis(500)),
        Ok((Response::Pong, _))
    )
}

fn connect_from(ns: &str, addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("ip:port");
    in_ns(ns, move || TcpStream::connect_timeout(&addr, timeout))
}

fn netns_names() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn net_namespace_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_broker_on_host_a_is_reachable_from_host_b_and_not_from_the_root_namespace() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let dir = common::data_dir();
    let broker = NsBroker::start(net.ns_a(), net.addr_a(), dir.path(), &[]);
    assert_eq!(broker.addr(), format!("{}:{BROKER_PORT}", net.addr_a()));
    let ns_a_inode = std::fs::metadata(format!("/var/run/netns/{}", net.ns_a()))
        .unwrap()
        .ino();
    assert_eq!(
        net_namespace_of(broker.pid()),
        format!("net:[{ns_a_inode}]"),
        "the pid is the broker's, and it runs in ns a"
    );

    let addr = broker.addr().to_string();
    let rtt = in_ns(net.ns_b(), move || Admin::connect(&addr)?.ping())
        .unwrap_or_else(|e| panic!("ping from ns b: {e}\n{}", broker.stderr_tail()));
    assert!(rtt < Duration::from_secs(1));
    let addr = broker.addr().to_string();
    assert!(in_ns(net.ns_b(), move || broker_answers(&addr)));
    assert!(
        !broker_answers(broker.addr()),
        "the root namespace must not reach a broker inside ns a"
    );
    broker.stop();
}

#[test]
fn link_down_partitions_the_hosts_and_link_up_heals_them() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let dir = common::data_dir();
    let broker = NsBroker::start(net.ns_a(), net.addr_a(), dir.path(), &[]);
    let addr = broker.addr().to_string();
    let admin = in_ns(net.ns_b(), move || Admin::connect(&addr).unwrap());
    // The socket belongs to ns b; this thread stays in the root namespace.
    admin.ping().unwrap();

    net.link_down();
    let refused = connect_from(net.ns_b(), broker.addr(), Duration::from_millis(500));
    assert!(refused.is_err(), "connected across a partition");

    net.link_up();
    connect_from(net.ns_b(), broker.addr(), Duration::from_millis(500))
        .expect("connect after link_up");
    admin
        .ping()
        .expect("an idle connection survives a short partition");
    broker.stop();
}

#[test]
fn dropping_the_hosts_removes_their_namespaces_and_kill9_ends_the_broker() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let names = [net.ns_a().to_string(), net.ns_b().to_string()];
    let listed = netns_names();
    assert!(
        names.iter().all(|n| listed.contains(n.as_str())),
        "{listed}"
    );

    let dir = common::data_dir();
    let broker = NsBroker::start(net.ns_b(), net.addr_b(), dir.path(), &[]);
    let pid = broker.pid();
    broker.kill9();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );

    drop(net);
    let listed = netns_names();
    assert!(
        names.iter().all(|n| !listed.contains(n.as_str())),
        "{listed}"
    );
}

#[test]
fn a_broker_that_cannot_start_reports_its_stderr() {
    let Some(net) = TwoHosts::create() else {
        return;
    };
    let dir = common::data_dir();
    let err = match NsBroker::try_start(net.ns_a(), net.addr_a(), dir.path(), &["--no-such-flag"]) {
        Ok(_) => panic!("a broker started with an unknown flag"),
        Err(e) => e,
    };
    assert!(err.contains("exited"), "{err}");
    assert!(
        err.contains("--no-such-flag"),
        "the stderr tail is missing: {err}"
    );
}
