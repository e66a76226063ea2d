//! Shards: one pinned glommio executor per core, each owning a slice of the queues.
//!
//! # Layout
//! - [`router`]: `shard_of(topic, queue)`, the pure function that says which shard owns a queue.
//! - [`topics`]: the topic table (control-plane state), persisted atomically; shard 0 is its
//!   single writer and pushes each new version to the other shards.
//! - [`mesh`]: request/reply over glommio's bounded channel mesh, for requests that landed on
//!   the wrong shard and for control-plane pushes.
//! - [`context`]: what one shard owns (its store, its view of the topics, its mesh end).
//! - [`executor`]: starting, pinning and stopping the executors; the embedded [`Broker`] handle.
//! - [`preflight`]: start-up checks that turn a machine that cannot run the broker into one
//!   actionable line instead of a panic deep inside io_uring.
//!
//! Nothing on the data path is shared between shards: each shard's state lives in `Rc`s on its
//! own thread; the only cross-thread traffic is mesh messages.

pub mod context;
pub mod executor;
pub mod mesh;
pub mod preflight;
pub mod router;
pub mod topics;

pub use context::ShardContext;
pub use executor::{run_until_signalled, Broker, BrokerError};
pub use router::shard_of;
pub use topics::{TopicMeta, TopicTable};
