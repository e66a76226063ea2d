//! Shards: what each pinned executor owns (a slice of the queues), how requests find their
//! shard, and how shards talk. Starting the executors is `server::executor`'s job.
//!
//! # Layout
//! - [`router`]: `shard_of(topic, queue)`, the pure function that says which shard owns a queue.
//! - [`topics`]: the topic table (control-plane state), persisted atomically; shard 0 is its
//!   single writer and pushes each new version to the other shards.
//! - [`mesh`]: request/reply over glommio's bounded channel mesh, for requests that landed on
//!   the wrong shard and for control-plane pushes.
//! - [`topic_writes`]: shard 0 saving a new topic table and pushing it to every shard.
//! - [`cluster_routes`]: in a cluster on etcd, which broker group serves each queue of a
//!   cluster topic and where its master listens (published by the control thread).
//! - [`context`]: what one shard owns (its store, its view of the topics, its mesh end).
//! - [`preflight`]: start-up checks that turn a machine that cannot run the broker into one
//!   actionable line instead of a panic deep inside io_uring.
//!
//! Nothing on the data path is shared between shards: each shard's state lives in `Rc`s on its
//! own thread; the only cross-thread traffic is mesh messages.

pub mod cluster_routes;
pub mod context;
pub mod mesh;
pub mod preflight;
pub mod router;
pub mod topic_writes;
pub mod topics;

pub use context::ShardContext;
pub use router::shard_of;
pub use topics::{TopicMeta, TopicTable};
