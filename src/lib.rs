//! RingMQ: a thread-per-core message broker on io_uring whose acks say exactly how durable a
//! message is.
//!
//! # Layout
//! - [`protocol`]: the wire protocol, sans-io (frame preamble, FlatBuffers headers, codec,
//!   stable error codes). Never imports glommio.
//! - [`format`]: the byte formats, pure (one parser and one encoder each): the message batch a
//!   producer sends and storage keeps as it is, and the CommitLog record that holds it. Shared
//!   by the server, storage, the client and the bench; imports nothing else of the crate.
//! - [`storage`]: per-shard CommitLog on O_DIRECT with group-committed fdatasync, derived
//!   indexes (consume queues, key index, producer table), recovery.
//! - [`shard`]: one pinned glommio executor per core, the routing function and the channel mesh
//!   between shards.
//! - [`replication`]: a slave's shard follows its master's shard: epochs, the master's follower
//!   session and replica tracker, the slave's follower loop.
//! - [`broker`]: the request services (produce and its ack policy, fetch, topics, stats,
//!   admin, consumer groups, retries and delays), with no sockets.
//! - [`server`]: the running broker: shard executors, listeners, the per-connection loop and
//!   the dispatcher that calls the services.
//! - [`cluster`]: broker groups on etcd (opt-in): the etcd client, membership, election, lease
//!   fencing.
//! - [`client`]: a blocking client library (plain threads, no runtime needed): admin,
//!   producer, consumer, group consumer.
//! - [`metrics`]: pure and below every layer: fixed-bucket histograms, the per-shard request
//!   counters ([`metrics::ShardMetrics`]) and the Prometheus text format; the HTTP endpoint is
//!   `server::metrics_http`.
//! - [`config`]: the typed broker configuration in sections (`[server]`, `[replication]`;
//!   `[storage]` is owned by storage), with documented defaults and validation.

pub mod broker;
pub mod client;
pub mod cluster;
pub mod config;
pub mod format;
pub mod metrics;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod shard;
pub mod storage;
