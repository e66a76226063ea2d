//! Metrics: what a shard counts, and how it becomes Prometheus text.
//!
//! Pure and at the bottom of the layers (it imports nothing else of the crate), so storage
//! can keep its histograms here and the server can render what every layer counted.
//!
//! # Layout
//! - [`histogram`]: [`Histogram`], a fixed-bucket histogram that is a plain `Copy` value, kept
//!   by the thread that records into it (no atomics, no locks).
//! - [`registry`]: [`ShardMetrics`], the per-shard registry of request counters (per topic, by
//!   status code, refusals by reason) in `Cell`s and `RefCell`s on the shard's thread.
//! - [`exposition`]: [`Family`] and [`Sample`], a `Send` snapshot of values that a shard
//!   publishes, and [`render`], the Prometheus text exposition format (version 0.0.4) with
//!   `# HELP` and `# TYPE` once per family, families of several shards merged.
//!
//! Nothing here touches the data path's state from another thread: a shard copies its values
//! into a snapshot on its own executor, and only the snapshot crosses threads (see
//! `server::metrics_http`).

pub mod exposition;
pub mod histogram;
pub mod registry;

pub use exposition::{render, Family, Kind, Sample};
pub use histogram::Histogram;
pub use registry::{ShardMetrics, TopicCounters, TopicSlot};
