//! Broker groups on etcd (opt-in): a single broker needs none of this. With
//! `--cluster etcd=...` brokers register under etcd leases, each group's master holds an
//! election key, and a master that cannot renew its lease stops acking before the lease can
//! expire.
//!
//! Everything here is blocking and runs on a control thread of the broker (or in the
//! `ringmq admin cluster` CLI), never on a shard executor: an etcd round trip may take as long
//! as the configured timeout per endpoint.
//!
//! # Layout
//! - [`etcd`]: a small blocking etcd v3 client over its JSON gateway (HTTP/1.1, no runtime):
//!   leases, put/get, prefix reads, and the three transactions elections need.
//! - [`records`]: the group's keys in etcd and their JSON values.
//! - [`watcher`]: a watch on a key or prefix on a thread of its own.
//! - [`routes`]: the cluster's routes (cluster topics, masters' shard addresses) followed
//!   with a prefix watch and published to the broker's shards.
//! - [`node`]: the control thread of one broker in a group: session lease, election,
//!   following, stepping down, the in-sync set.

pub mod etcd;
pub mod node;
pub mod records;
pub mod routes;
pub mod watcher;

pub use node::{run_until_signalled, ClusterConfig, ClusterError};
