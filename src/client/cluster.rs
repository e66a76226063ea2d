//! What producers and consumers share: the bootstrap address, cached routes, and one
//! connection per shard address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::client::connection::Connection;
use crate::client::ClientError;
use crate::protocol::{Request, Response, RouteTable};

pub struct Cluster {
    bootstrap: String,
    request_timeout: Duration,
    routes: Mutex<HashMap<String, Arc<RouteTable>>>,
    connections: Mutex<HashMap<String, Arc<Connection>>>,
}

impl Cluster {
    /// Connects to `bootstrap` at once, so a wrong address fails fast.
    pub fn connect(bootstrap: &str, request_timeout: Duration) -> Result<Cluster, ClientError> {
        let c = Cluster::lazy(bootstrap, request_timeout);
        c.connection(bootstrap)?;
        Ok(c)
    }

    /// Connects on first use: for a producer with a spool, which must start (and spool)
    /// while no broker answers.
    pub fn lazy(bootstrap: &str, request_timeout: Duration) -> Cluster {
        Cluster {
            bootstrap: bootstrap.to_string(),
            request_timeout,
            routes: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
        }
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
        drop(removed);
    }

    /// Sends `request` to the bootstrap broker and waits (up to the request timeout plus
    /// `extra`); a lost connection is forgotten so the next call reconnects.
    pub fn call_bootstrap(
        &self,
        request: &Request,
        extra: Duration,
    ) -> Result<(Response, Bytes), ClientError> {
        let conn = self.connection(&self.bootstrap)?;
        let outcome = conn.call(request, Bytes::new(), self.request_timeout + extra);
        if matches!(outcome, Err(ClientError::ConnectionClosed(_))) {
            self.forget(conn.peer());
        }
        outcome
    }

    /// The route table of `topic`, asked of the bootstrap broker once and cached.
    pub fn route(&self, topic: &str) -> Result<Arc<RouteTable>, ClientError> {
        if let Some(r) = self.routes.lock().expect("routes lock").get(topic) {
            return Ok(r.clone());
        }
        let conn = self.connection(&self.bootstrap)?;
        let request = Request::GetRoute {
            topic: topic.to_string(),
        };
        let route = match conn.call(&request, Bytes::new(), self.request_timeout)?.0 {
            Response::Route(r) => Arc::new(r),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        self.routes
            .lock()
            .expect("routes lock")
            .insert(topic.to_string(), route.clone());
        Ok(route)
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
        Ok(owner.address.clone())
    }

    /// The connection to the shard that owns `queue` of `topic`.
    pub fn connection_for(&self, topic: &str, queue: u32) -> Result<Arc<Connection>, ClientError> {
        self.connection(&self.owner_address(topic, queue)?)
    }
}
