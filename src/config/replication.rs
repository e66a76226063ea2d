//! [`ReplicationConfig`]: the `[replication]` section of the broker config: what this broker
//! is in a pair (role, master, peer), what a produce ack waits for (mode, replica ack, the
//! deadline), catch-up pacing and epoch identity.
//!
//! Contract: [`ReplicationConfig::problems`] is the one check of these settings; the broker's
//! `Config::validate` reports its problems with every other section's.

use serde::{Deserialize, Serialize};

use std::fmt;
use std::str::FromStr;

/// Bits of an epoch that hold the minting node's id (see `replication/epoch.rs`).
pub const NODE_BITS: u32 = 24;
/// The largest node id.
pub const NODE_ID_MAX: u32 = (1 << NODE_BITS) - 1;

/// The `[replication]` section. Field names carry their unit last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// `master` (default) or `slave`. A slave follows `master`, serves fetches and refuses
    /// produce with NOT_MASTER until promoted (`ringmq admin promote`).
    pub role: Role,
    /// Slave: the master's address (`host:port` of its shard 0).
    pub master: Option<String>,
    /// Master: the other broker of the pair (optional). At start a master asks it and refuses
    /// to start if the peer is a master of a newer epoch (this broker was superseded).
    pub peer: Option<String>,
    /// `async_master` (default: acks do not wait for the slave) or `sync_master`.
    pub mode: ReplicationMode,
    /// SYNC_MASTER: the slave has `received` the record (appended to its log) or made it
    /// `durable` (its fdatasync covered it, the default).
    pub replica_ack: ReplicaAck,
    /// SYNC_MASTER: a produce the slave has not acknowledged in this time gets
    /// FLUSH_SLAVE_TIMEOUT. Default 3000.
    pub replica_timeout_ms: u64,
    /// Master: the most a follower that is behind is sent per second from the log files
    /// (0 = no limit). Large reads at full disk speed stall the same disk's writes and
    /// fdatasyncs for hundreds of milliseconds on the test VM; see README. Default 64 MiB/s.
    pub replica_catchup_bytes_per_sec: u64,
    /// Master with a `peer`: take writes even when the peer cannot be reached at start. Without
    /// it such a master starts fenced (read-only: produce gets NOT_MASTER) until it hears from
    /// the peer, since the peer may have been promoted meanwhile. Default false.
    pub force_master: bool,
    /// This broker's node id (1 ..= 2^24 - 1), the low bits of every epoch it mints, so two
    /// brokers never mint the same epoch. Default: a random id made once and kept in
    /// `<data_dir>/node_id`.
    pub node_id: Option<u32>,
    /// Accept a follower from any host, not only the pair's peer. Set by a broker in a group
    /// on etcd, whose followers are the group's members (elected at run time, so no fixed
    /// peer). Until there is authentication, keep it off on a broker reachable by others.
    /// Default false.
    pub followers_from_any_host: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            role: Role::Master,
            master: None,
            peer: None,
            mode: ReplicationMode::AsyncMaster,
            replica_ack: ReplicaAck::Durable,
            replica_timeout_ms: 3000,
            replica_catchup_bytes_per_sec: 64 << 20,
            force_master: false,
            node_id: None,
            followers_from_any_host: false,
        }
    }
}

impl ReplicationConfig {
    /// Every problem of this section, empty when it is valid.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.role == Role::Slave && !self.master.as_deref().is_some_and(|m| !m.trim().is_empty())
        {
            problems.push("role is slave but no master is set (--master HOST:PORT)".to_string());
        }
        if self.role == Role::Master && self.master.is_some() {
            problems.push(
                "master is set but role is master; --master is for --role slave (use --peer to \
                 name the other broker of a pair)"
                    .to_string(),
            );
        }
        if let Some(id) = self.node_id {
            if id == 0 || id > NODE_ID_MAX {
                problems.push(format!("node_id is {id} but must be in 1..={NODE_ID_MAX}"));
            }
        }
        if self.replica_timeout_ms == 0 {
            problems.push("replica_timeout_ms must be at least 1".to_string());
        }
        problems
    }

    /// The other broker of the pair, if any: `peer`, or on a slave (and a promoted one) its
    /// `master`. Only a follower from this host may open a replication stream.
    pub fn pair_peer(&self) -> Option<&str> {
        self.peer.as_deref().or(self.master.as_deref())
    }

    /// Whether a master streams its log to a follower at all: it names a peer, or waits for a
    /// slave (SYNC_MASTER). A lone ASYNC_MASTER refuses ReplFollow.
    pub fn accepts_followers(&self) -> bool {
        self.pair_peer().is_some()
            || self.mode == ReplicationMode::SyncMaster
            || self.followers_from_any_host
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slave_needs_a_master_and_a_master_has_none() {
        assert!(ReplicationConfig::default().problems().is_empty());
        let slave = ReplicationConfig {
            role: Role::Slave,
            ..ReplicationConfig::default()
        };
        assert_eq!(slave.problems().len(), 1, "{:?}", slave.problems());
        let master_with_master = ReplicationConfig {
            master: Some("h:1".into()),
            ..ReplicationConfig::default()
        };
        assert_eq!(master_with_master.problems().len(), 1);
        let bad = ReplicationConfig {
            node_id: Some(0),
            replica_timeout_ms: 0,
            ..ReplicationConfig::default()
        };
        assert_eq!(bad.problems().len(), 2, "{:?}", bad.problems());
    }

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
