//! Request services: what each request does, with no sockets in sight.
//!
//! A service takes a decoded request and the shard's [`Services`] and returns a response (or a
//! [`ServiceError`] with a stable wire code). `server::handlers` decodes frames, forwards a
//! request to the shard that owns it, calls the service here and encodes the answer (also for
//! requests other shards send over the mesh).
//!
//! # Layout
//! - [`produce`]: validate a batch, append it, then let the ack policy decide its answer.
//! - [`ack`]: the one ack policy — the local flush wait, the replica wait, their deadlines,
//!   the fence check, and the durability the ack reports.
//! - [`fetch`]: reads from a queue, with long polling.
//! - [`topics`]: create (shard 0), list, route; the topic and queue checks other services use.
//! - [`stats`]: queue and shard statistics, gathered from every shard.
//! - [`metrics`]: the shard's metrics as Prometheus families (copies of the counters storage,
//!   replication and the shard keep), for `server::metrics_http`.
//! - [`admin`]: broker info and promotion.
//! - [`groups`]: consumer groups: the coordinator (membership, generations, assignment) and
//!   committed offsets as records in the log.
//! - [`retry`]: send-back of failed messages, the delay scheduler, dead letters.
//! - [`transactions`]: half messages, their commit or rollback, check-backs.
//! - [`error`]: [`ServiceError`] and how each lower-layer error maps to a wire code.
//!
//! New request families get a file (or a folder) here.

pub mod ack;
pub mod admin;
pub mod error;
pub mod fetch;
pub mod groups;
pub mod metrics;
pub mod produce;
pub mod retry;
pub mod stats;
pub mod topic_log;
pub mod topics;
pub mod transactions;

use std::rc::Rc;

use crate::protocol::ErrorCode;
use crate::replication::state::Replication;
use crate::replication::Role;
use crate::shard::ShardContext;

pub use error::ServiceError;

pub type Result<T> = std::result::Result<T, ServiceError>;

/// What a request service works with: the shard and its replication state.
pub struct Services {
    pub shard: Rc<ShardContext>,
    pub replication: Rc<Replication>,
    /// Consumer groups this shard coordinates, and its delay scheduler's cursors.
    pub groups: groups::Coordinator,
    /// Half messages of the queues this shard owns, and their check-backs.
    pub transactions: transactions::Transactions,
    /// Shard 0: the topic log's writer and reader state.
    pub topic_log: topic_log::TopicLog,
}

impl Services {
    pub fn new(replication: Rc<Replication>) -> Services {
        Services {
            shard: replication.ctx.clone(),
            replication,
            groups: groups::Coordinator::default(),
            transactions: transactions::Transactions::default(),
            topic_log: topic_log::TopicLog::default(),
        }
    }

    /// NOT_MASTER, naming the master, for writes that reach a slave or a fenced master.
    pub fn check_writable(&self, what: &str) -> Result<()> {
        let repl = &self.replication;
        if repl.role() == Role::Master {
            // A fenced master is read-only too (see replication::peer_watch).
            return match repl.fence_message() {
                None => Ok(()),
                Some(why) => Err(ServiceError::new(ErrorCode::NotMaster, why)),
            };
        }
        Err(ServiceError::new(
            ErrorCode::NotMaster,
            format!(
                "this broker is a slave{}; {what} on the master",
                repl.master_hint()
            ),
        ))
    }
}
