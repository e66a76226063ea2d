//! Replication: shard `i` of a slave broker follows shard `i` of its master.
//!
//! - [`epoch`]: the history of master terms of a shard's log, and where two histories diverge.
//! - [`master`]: the master side — the follower session that streams raw CommitLog bytes and
//!   moves the tracker with the follower's acks.
//! - [`follower`]: the slave side — connect, agree on a start point (truncating a diverged
//!   tail), append what arrives, acknowledge; serve reads only up to what the master confirmed.
//! - [`peer_watch`]: a master asks its peer whether it was superseded (then it fences itself).
//! - [`confirmed`]: the confirmed position kept across restarts.
//! - [`state`]: a shard's replication state (role, epochs, fence, tracker, visibility cap).
//! - [`promotion`]: a slave's shard becomes a master.
//! - [`tracker`]: replication progress, the waits of SYNC_MASTER acks, and the lag.
//! - [`config`]: [`ReplicationConfig`], the `[replication]` section of the broker config.
//!
//! The contracts (what an ack means in each mode, epochs, promotion) are in docs/design.md,
//! "Replication".

pub mod config;
pub mod confirmed;
pub mod epoch;
pub mod follower;
pub mod master;
pub mod peer_watch;
pub mod promotion;
pub mod state;
pub mod tracker;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use config::ReplicationConfig;

/// What a broker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Takes produce requests; streams its log to a slave if one connects.
    #[default]
    Master,
    /// Follows `master`; serves fetches read-only; refuses produce with NOT_MASTER.
    Slave,
}

/// When a master's produce ack waits for the slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    /// The ack does not wait for the slave (RocketMQ's ASYNC_MASTER).
    #[default]
    AsyncMaster,
    /// The ack waits until the slave has the record (see [`ReplicaAck`]); consumers on the master
    /// only see what the slave has (RocketMQ's SYNC_MASTER).
    SyncMaster,
}

/// Under SYNC_MASTER, what "the slave has the record" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaAck {
    /// The slave appended it to its log (in its memory; its disk write is under way). Survives
    /// the loss of the master's host, not a simultaneous crash of both.
    Received,
    /// The slave's fdatasync covered it. Survives both brokers crashing at once.
    #[default]
    Durable,
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $name:literal $(| $alias:literal)*),* $(,)? }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($ty::$variant => $name),* })
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().replace('-', "_").as_str() {
                    $($name $(| $alias)* => Ok($ty::$variant),)*
                    _ => Err(format!(
                        "unknown {} {s:?} (one of: {})",
                        stringify!($ty),
                        [$($name),*].join(" | ")
                    )),
                }
            }
        }
    };
}

text_enum!(Role { Master => "master", Slave => "slave" });
text_enum!(ReplicationMode {
    AsyncMaster => "async_master" | "async",
    SyncMaster => "sync_master" | "sync",
});
text_enum!(ReplicaAck { Received => "received", Durable => "durable" });

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_with_aliases_and_print_canonically() {
        assert_eq!(
            "sync-master".parse::<ReplicationMode>().unwrap(),
            ReplicationMode::SyncMaster
        );
        assert_eq!(
            "ASYNC".parse::<ReplicationMode>().unwrap(),
            ReplicationMode::AsyncMaster
        );
        assert_eq!(ReplicationMode::SyncMaster.to_string(), "sync_master");
        assert_eq!("slave".parse::<Role>().unwrap(), Role::Slave);
        assert!("leader"
            .parse::<Role>()
            .unwrap_err()
            .contains("master | slave"));
        assert_eq!(
            "received".parse::<ReplicaAck>().unwrap(),
            ReplicaAck::Received
        );
    }
}
