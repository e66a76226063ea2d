//! The RingMQ client library: blocking, thread-safe, no async runtime required.
//!
//! # Layout
//! - [`connection`]: one pipelined connection to one broker port (a reader thread matches
//!   responses to requests by id).
//! - [`cluster`]: the bootstrap list, routes and one connection per shard, shared by producers
//!   and consumers; fail-over to the next broker of the list (a master and its slave).
//! - [`admin`]: control requests (ping, topics, routes, broker info, queue stats).
//! - [`producer`]: SYNC / ASYNC / ONEWAY sends, routing to the owning shard, idempotent
//!   retries with backoff, batching by linger time and bytes.
//! - [`consumer`]: pull with long polling from (queue, offset), or as an iterator.
//! - [`group`]: a consumer-group member: assigned queues, ack/nack, committed offsets.
//! - [`spool`]: the producer's local spool: fsync'd segment files for batches the broker
//!   could not ack, re-sent exactly once (same producer id, epoch and sequence) by a drain.
//! - [`transaction`]: a transactional producer: half message, local transaction, end, and
//!   answers to the broker's check-backs.
//!
//! Use it from a plain Rust program:
//! ```no_run
//! let admin = ringmq::client::Admin::connect("127.0.0.1:10911").unwrap();
//! admin.create_topic("orders", 8).unwrap();
//! println!("{:?}", admin.route("orders").unwrap());
//! ```

pub mod admin;
pub mod cluster;
pub mod connection;
pub mod consumer;
pub mod group;
pub mod producer;
pub mod spool;
pub mod transaction;

pub use crate::protocol::Durability;
pub use admin::Admin;
pub use connection::{Connection, Pending, DEFAULT_REQUEST_TIMEOUT};
pub use consumer::{ConsumedMessage, Consumer, StartFrom};
pub use group::{GroupConfig, GroupConsumer, GroupMessage};
pub use producer::{DrainReport, Producer, ProducerConfig, QueueSelector, SendOutcome, SendResult};
pub use spool::{SpoolConfig, SpoolReceipt};
pub use transaction::{TransactionConfig, TransactionalProducer};

use std::time::Duration;

use crate::protocol::{ErrorCode, RemoteError, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection closed: {0}")]
    ConnectionClosed(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("broker answered {}: {}", .0.code, .0.message)]
    Remote(RemoteError),
    #[error("cannot decode the broker's response: {0}")]
    Wire(#[from] WireError),
    #[error("unexpected response: {0}")]
    Unexpected(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The spool cannot take this batch without going past its bound.
    #[error(
        "the spool in {dir} is full: {used_bytes} of its {max_bytes} bytes are used by \
         {entries} entr(ies) not yet acked (raise max_bytes, or let the broker drain it)"
    )]
    SpoolFull {
        dir: String,
        max_bytes: u64,
        used_bytes: u64,
        entries: u64,
    },
    /// The spool's files cannot be read or written (or are corrupt); see the message.
    #[error("spool: {0}")]
    Spool(String),
}

impl ClientError {
    /// Whether sending the same request again may succeed (busy, timeouts, lost connections).
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::ConnectionClosed(_)
            | ClientError::Timeout(_) => true,
            ClientError::Remote(r) => r.code.is_retriable(),
            _ => false,
        }
    }

    /// Whether another broker of a bootstrap list may take the request this broker failed:
    /// it is not (or no longer) the master, it is shutting down, or its connection was lost
    /// or refused. With a list, producers and consumers fail over on these (see
    /// [`cluster`]); with one address they keep their usual meaning.
    pub fn is_failover(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::ConnectionClosed(_) => true,
            ClientError::Remote(r) => {
                matches!(r.code, ErrorCode::NotMaster | ErrorCode::ShuttingDown)
            }
            _ => false,
        }
    }

    /// The broker's error code, when the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(r) => Some(r.code),
            _ => None,
        }
    }
}
