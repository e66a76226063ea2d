//! What producers and consumers share: the bootstrap list, cached routes, and one connection
//! per shard address.
//!
//! # Fail-over
//! A broker address string may be a comma-separated list (a master and its slave, say). The
//! cluster asks one of them, the current bootstrap, for routes; routes then name each shard's
//! own address. When a request fails in a way another broker of the list may not
//! ([`ClientError::is_failover`]: NOT_MASTER, SHUTTING_DOWN, a closed or refused connection),
//! [`Cluster::fail_over`] drops every cached route (they point at the old master) and, when the
//! failed peer was the bootstrap or one of its shards, moves the bootstrap to the next address
//! of the list. Callers retry (with their own backoff), and the next [`Cluster::route`] asks
//! the new bootstrap. With one address nothing changes: there is nothing else to try.
//!
//! A cluster topic (its route names a broker group per queue: a cluster on etcd) is routed by
//! whichever broker is asked, and its queues are served by other brokers than the bootstrap.
//! Once such a route was seen the same fail-over applies with a single address too: routes
//! are dropped and asked for again (the bootstrap broker follows the cluster's masters), and
//! a queue whose group has no master now fails as NOT_MASTER and its route is asked again.
//!
//! Every fail-over bumps a generation. A request remembers the generation it was sent at, and
//! a failure reported for an older one is not acted on again: the many requests in flight on a
//! dead connection all fail, and only the first may move the bootstrap (the others would move
//! it on again, past the broker that just took over).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::client::connection::Connection;
use crate::client::ClientError;
use crate::protocol::{ErrorCode, RemoteError, Request, Response, RouteTable};

/// The addresses of a broker address string: comma-separated, blanks around them ignored.
/// Never empty (an empty string stays one empty address, so the connect error names it).
pub fn parse_brokers(brokers: &str) -> Vec<String> {
    let list: Vec<String> = brokers
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if list.is_empty() {
        vec![brokers.trim().to_string()]
    } else {
        list
    }
}

pub struct Cluster {
    /// The bootstrap list, in the order given.
    bootstraps: Vec<String>,
    /// The index in `bootstraps` of the current bootstrap, and the fail-over generation.
    current: Mutex<(usize, u64)>,
    /// A copy of the generation in `current`, read without the lock.
    generation: AtomicU64,
    request_timeout: Duration,
    routes: Mutex<HashMap<String, Arc<RouteTable>>>,
    connections: Mutex<HashMap<String, Arc<Connection>>>,
    /// A route of a cluster topic was seen: its queues live on other brokers than the
    /// bootstrap, so failing over (dropping routes) pays even with one address.
    spans_groups: AtomicBool,
}

impl Cluster {
    /// Connects to the first address of `brokers` that answers (in list order), so a wrong
    /// address fails fast; the error names every address tried.
    pub fn connect(brokers: &str, request_timeout: Duration) -> Result<Cluster, ClientError> {
        let c = Cluster::lazy(brokers, request_timeout);
        let mut failures = Vec::new();
        for (i, addr) in c.bootstraps.iter().enumerate() {
            match c.connection(addr) {
                Ok(_) => {
                    c.current.lock().expect("bootstrap lock").0 = i;
                    return Ok(c);
                }
                Err(e) => failures.push(e),
            }
        }
        Err(connect_error(&c.bootstraps, failures))
    }

    /// Connects on first use: for a producer with a spool, which must start (and spool)
    /// while no broker answers.
    pub fn lazy(brokers: &str, request_timeout: Duration) -> Cluster {
        Cluster {
            bootstraps: parse_brokers(brokers),
            current: Mutex::new((0, 0)),
            generation: AtomicU64::new(0),
            request_timeout,
            routes: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            spans_groups: AtomicBool::new(false),
        }
    }

    /// The bootstrap list.
    pub fn brokers(&self) -> &[String] {
        &self.bootstraps
    }

    /// Whether there is another broker to fail over to: the list has more than one address,
    /// or a cluster topic's route named other brokers.
    pub fn can_fail_over(&self) -> bool {
        self.bootstraps.len() > 1 || self.spans_groups.load(Ordering::Acquire)
    }

    /// The broker routes are asked of now.
    pub fn bootstrap(&self) -> String {
        let i = self.current.lock().expect("bootstrap lock").0;
        self.bootstraps[i].clone()
    }

    /// The fail-over generation: remember it when sending, pass it to [`Cluster::fail_over`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The connection to `addr`, opened on first use.
    pub fn connection(&self, addr: &str) -> Result<Arc<Connection>, ClientError> {
        if let Some(c) = self.connections.lock().expect("conn lock").get(addr) {
            return Ok(c.clone());
        }
        let c = Arc::new(Connection::connect(addr)?);
        // A connection replaced here (two threads connected at once) is dropped after the lock
        // is released: see `forget`.
        let replaced = self
            .connections
            .lock()
            .expect("conn lock")
            .insert(addr.to_string(), c.clone());
        drop(replaced);
        Ok(c)
    }

    /// Drops a connection that failed, so the next use reconnects.
    ///
    /// The connection is dropped after the lock is released: dropping the last reference joins
    /// its reader thread, and that thread may itself be in a response callback calling
    /// `forget` (a broker killed with requests in flight on two connections deadlocked here).
    pub fn forget(&self, addr: &str) {
        let removed = self.connections.lock().expect("conn lock").remove(addr);
        // Closed, not only dropped: another thread may hold it, blocked in a write to a
        // broker that takes no bytes (a cable pulled), and would stay blocked for minutes.
        if let Some(c) = &removed {
            c.close("forgotten after a failure (presumed dead)");
        }
        drop(removed);
    }

    /// `peer` failed a request sent at generation `seen` in a way another broker of the list
    /// may not: forgets every cached route, and moves the bootstrap to the
    /// next address when `peer` is the bootstrap or one of its shards (an address its routes
    /// named). Nothing happens with a single address, or when someone already failed over
    /// since `seen`. Returns whether it failed over.
    ///
    /// The connection to `peer` is kept: a lost one is forgotten by [`Cluster::note_failure`],
    /// and one that answered NOT_MASTER is healthy (closing it failed the other requests on
    /// it, a route asked of the same broker among them) and may serve it again once it is
    /// promoted.
    pub fn fail_over(&self, peer: &str, seen: u64) -> bool {
        if !self.can_fail_over() {
            return false;
        }
        let routes = {
            let mut current = self.current.lock().expect("bootstrap lock");
            if current.1 != seen {
                return false;
            }
            let routes = std::mem::take(&mut *self.routes.lock().expect("routes lock"));
            let of_bootstrap = self.bootstraps[current.0] == peer
                || routes
                    .values()
                    .any(|r| r.queues.iter().any(|q| q.address == peer));
            let from = self.bootstraps[current.0].clone();
            if of_bootstrap {
                current.0 = (current.0 + 1) % self.bootstraps.len();
            }
            current.1 += 1;
            self.generation.store(current.1, Ordering::Release);
            log::info!(
                "fail-over: {peer} failed; routes dropped, bootstrap {from} -> {}",
                self.bootstraps[current.0]
            );
            routes
        };
        drop(routes);
        true
    }

    /// After a request to `peer`, sent at generation `seen`, failed with `e`: forgets a lost
    /// connection and, when `e` is a fail-over error and the list has another broker, fails
    /// over. Returns whether the caller should retry on the next broker.
    ///
    /// No answer within the request timeout counts as a lost connection here: the broker is
    /// presumed dead (a frozen host, a pulled cable: its kernel may still take the connection
    /// and the bytes), so the connection is closed and, with a list, the next broker asked. (A
    /// route asked of a frozen master otherwise failed the send that needed it, since a
    /// timeout alone is no reason to fail over.)
    pub fn note_failure(&self, peer: &str, seen: u64, e: &ClientError) -> bool {
        let lost = matches!(
            e,
            ClientError::ConnectionClosed(_)
                | ClientError::Connect { .. }
                | ClientError::Timeout(_)
        );
        if lost {
            self.forget(peer);
        }
        if self.can_fail_over() && (e.is_failover() || lost) {
            self.fail_over(peer, seen);
            return true;
        }
        false
    }

    /// Sends `request` to the bootstrap broker and waits (up to the request timeout plus
    /// `extra`); a lost connection is forgotten so the next call reconnects. With a list, a
    /// broker that cannot take it (see [`ClientError::is_failover`]) is failed over from and
    /// the next one asked, each address at most once.
    pub fn call_bootstrap(
        &self,
        request: &Request,
        extra: Duration,
    ) -> Result<(Response, Bytes), ClientError> {
        self.ask_bootstrap(request, self.request_timeout + extra)
            .map(|(answer, _)| answer)
    }

    /// [`Cluster::call_bootstrap`]'s loop; also returns the fail-over generation the answer
    /// was asked at.
    fn ask_bootstrap(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<((Response, Bytes), u64), ClientError> {
        let mut tries = self.bootstraps.len();
        loop {
            let seen = self.generation();
            let addr = self.bootstrap();
            let outcome = self
                .connection(&addr)
                .and_then(|conn| conn.call(request, Bytes::new(), timeout));
            tries -= 1;
            match outcome {
                Ok(answer) => return Ok((answer, seen)),
                Err(e) if self.note_failure(&addr, seen, &e) && tries > 0 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The route table of `topic`, asked of the bootstrap broker once and cached. With a
    /// list, a bootstrap that does not answer is failed over from and the next one asked,
    /// each address at most once.
    pub fn route(&self, topic: &str) -> Result<Arc<RouteTable>, ClientError> {
        if let Some(r) = self.routes.lock().expect("routes lock").get(topic) {
            return Ok(r.clone());
        }
        let request = Request::GetRoute {
            topic: topic.to_string(),
        };
        let (answer, seen) = self.ask_bootstrap(&request, self.request_timeout)?;
        let route = match answer {
            (Response::Route(r), _) => Arc::new(r),
            (other, _) => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        if route.queues.iter().any(|q| q.group.is_some()) {
            self.spans_groups.store(true, Ordering::Release);
        }
        let current = self.current.lock().expect("bootstrap lock");
        // Not cached when a fail-over happened meanwhile: it may be the old master's.
        if current.1 == seen {
            self.routes
                .lock()
                .expect("routes lock")
                .insert(topic.to_string(), route.clone());
        }
        Ok(route)
    }

    /// Whether a route of a cluster topic (spread over broker groups) was seen.
    pub fn spans_groups(&self) -> bool {
        self.spans_groups.load(Ordering::Acquire)
    }

    /// The broker group that serves `queue` of `topic`, as the cached route says (`None` for
    /// a topic of one broker, or when no route is cached now).
    pub fn group_of(&self, topic: &str, queue: u32) -> Option<String> {
        let routes = self.routes.lock().expect("routes lock");
        routes
            .get(topic)?
            .queues
            .iter()
            .find(|r| r.queue == queue)?
            .group
            .clone()
    }

    /// The address of the shard that owns `queue` of `topic`.
    pub fn owner_address(&self, topic: &str, queue: u32) -> Result<String, ClientError> {
        let route = self.route(topic)?;
        let owner = route
            .queues
            .iter()
            .find(|r| r.queue == queue)
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!(
                    "topic {topic} has {} queue(s); there is no queue {queue}",
                    route.queues.len()
                ))
            })?;
        if owner.address.is_empty() {
            // Asked again next time: the group may have elected a master meanwhile.
            self.routes.lock().expect("routes lock").remove(topic);
            return Err(ClientError::Remote(RemoteError {
                code: ErrorCode::NotMaster,
                message: format!(
                    "queue {queue} of topic {topic}: its broker group {} has no master now",
                    owner.group.as_deref().unwrap_or("?")
                ),
            }));
        }
        Ok(owner.address.clone())
    }

    /// The connection to the shard that owns `queue` of `topic`.
    pub fn connection_for(&self, topic: &str, queue: u32) -> Result<Arc<Connection>, ClientError> {
        self.connection(&self.owner_address(topic, queue)?)
    }
}

/// The error of a connect to none of `addrs`: one address's own, or one naming them all.
pub(crate) fn connect_error(addrs: &[String], mut failures: Vec<ClientError>) -> ClientError {
    if failures.len() == 1 {
        return failures.pop().expect("one failure");
    }
    let why: Vec<String> = failures.iter().map(|e| e.to_string()).collect();
    ClientError::Connect {
        addr: format!("any of {}", addrs.join(", ")),
        source: std::io::Error::other(why.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_list_is_split_on_commas_and_blanks_are_ignored() {
        assert_eq!(parse_brokers("127.0.0.1:1"), vec!["127.0.0.1:1"]);
        assert_eq!(
            parse_brokers(" 127.0.0.1:1 , 127.0.0.1:2,"),
            vec!["127.0.0.1:1", "127.0.0.1:2"]
        );
        assert_eq!(parse_brokers(""), vec![""]);
    }

    #[test]
    fn connect_names_every_address_it_tried() {
        // Port 1 on loopback refuses connections.
        let err = Cluster::connect("127.0.0.1:1,127.0.0.2:1", Duration::from_secs(1))
            .err()
            .expect("nothing listens there");
        let text = err.to_string();
        assert!(
            text.contains("127.0.0.1:1") && text.contains("127.0.0.2:1"),
            "{text}"
        );
        assert!(err.is_failover(), "{text}");
    }

    #[test]
    fn a_failure_moves_the_bootstrap_once_per_generation() {
        let c = Cluster::lazy("127.0.0.1:1,127.0.0.2:1", Duration::from_secs(1));
        assert_eq!(c.bootstrap(), "127.0.0.1:1");
        let seen = c.generation();
        assert!(c.fail_over("127.0.0.1:1", seen));
        assert_eq!(c.bootstrap(), "127.0.0.2:1");
        // A second report of the same failure (another request on the dead connection).
        assert!(!c.fail_over("127.0.0.1:1", seen));
        assert_eq!(c.bootstrap(), "127.0.0.2:1");
        // A peer that is not the bootstrap nor one of its shards: routes go, bootstrap stays.
        assert!(c.fail_over("127.0.0.9:1", c.generation()));
        assert_eq!(c.bootstrap(), "127.0.0.2:1");
        assert!(c.fail_over("127.0.0.2:1", c.generation()));
        assert_eq!(c.bootstrap(), "127.0.0.1:1");
        // One address: nothing to fail over to.
        let one = Cluster::lazy("127.0.0.1:1", Duration::from_secs(1));
        assert!(!one.fail_over("127.0.0.1:1", one.generation()));
    }
}
