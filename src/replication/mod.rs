//! Replication: shard `i` of a slave broker follows shard `i` of its master.
//!
//! - [`epoch`]: the history of master terms of a shard's log, and where two histories diverge.
//! - [`master`]: the master side — the follower session that streams raw CommitLog bytes and
//!   moves the tracker with the follower's acks.
//! - [`follower`]: the slave side — connect, agree on a start point (truncating a diverged
//!   tail), append what arrives, acknowledge; serve reads only up to what the master confirmed.
//! - [`lease`]: in a broker group on etcd, a master acks only while it holds its lease.
//! - [`peer_watch`]: a master asks its peer whether it was superseded (then it fences itself).
//! - [`confirmed`]: the confirmed position kept across restarts.
//! - [`state`]: a shard's replication state (role, epochs, fence, tracker, visibility cap).
//! - [`promotion`]: a slave's shard becomes a master.
//! - [`tracker`]: replication progress, the waits of SYNC_MASTER acks, and the lag.
//! - [`config`]: [`ReplicationConfig`], the `[replication]` section of the broker config.
//!
//! The contracts (what an ack means in each mode, epochs, promotion) are in docs/design.md,
//! "Replication".

pub mod confirmed;
pub mod epoch;
pub mod follower;
pub mod lease;
pub mod master;
pub mod peer_watch;
pub mod promotion;
pub mod state;
pub mod tracker;

// The settings live in the config layer (below the shard, which this layer builds on); they
// are re-exported here, where they are used.
pub use crate::config::replication::{ReplicaAck, ReplicationConfig, ReplicationMode, Role};

/// Errors of the replication layer (a link, a handshake, a stream).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication link to {peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("replication link to {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// The peer refused (shard count, segment size, epoch fencing); retrying will not help
    /// until an operator acts.
    #[error("replication refused by {peer}: {detail}")]
    Refused { peer: String, detail: String },
    #[error("replication: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("replication: epoch file: {0}")]
    Epoch(#[from] epoch::EpochError),
}
