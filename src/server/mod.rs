//! A running broker: the shard executors, each shard's listener and connections, and the
//! dispatcher that hands requests to the services in `broker/`.
//!
//! # Layout
//! - [`executor`]: starting, pinning and stopping the executors (one per shard), wiring each
//!   shard's context, replication and services; the embedded [`Broker`] handle.
//! - [`listener`]: the accept loop of one shard's port.
//! - [`bounds`]: what one connection may make the broker hold (its byte budget, the
//!   reservation for each response) and the per-listener counters that show it.
//! - [`connection`]: one client connection: a short loop around the sans-io codec, pipelined
//!   requests under an in-flight budget, responses batched into one write.
//! - [`handlers`]: the dispatcher: decode, forward to the owning shard, call a `broker/`
//!   service, encode (and count each produce and fetch in the shard's metrics).
//! - [`metrics_http`]: the Prometheus endpoint: shards publish snapshots, a plain thread
//!   answers `GET /metrics`, so a scrape never blocks a shard.

pub mod bounds;
pub mod connection;
pub mod executor;
pub mod handlers;
pub mod listener;
pub mod metrics_http;

pub use executor::{run_until_signalled, Broker, BrokerError, GroupHooks};
