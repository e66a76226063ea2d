//! What a broker group keeps in etcd, as JSON values under `/ringmq/<cluster>/groups/<group>/`:
//!
//! - `master`: the election key, [`MasterRecord`], bound to the master's lease. Its create
//!   revision is the term of the master's epoch, so no two masters share one.
//! - `members/<node>`: each member's [`MemberRecord`] under its own lease: address, role,
//!   epoch, log end, lag. Rewritten at once when its standing changes (what others decide on:
//!   role, epoch, whom it follows, whether it streams), every half second while the group has
//!   no master (the election ranks by log end), and otherwise at the refresh interval
//!   (`cluster::node::member_refresh`, under half the lease TTL) for its log end and lag.
//! - `in_sync`: [`InSyncRecord`], written by the master only while it holds `master` (a
//!   guarded put): the members caught up with it. It outlives the master's lease, so after
//!   the master is gone its slaves know which of them may take over.
//!
//! And the cluster's routes, under `/ringmq/<cluster>/routes/` (one prefix, so a broker
//! watches them all with one watch, and a member record's rewrite is no news to it):
//!
//! - `topics/<topic>`: a cluster topic's [`TopicRecord`], queue count and the groups its
//!   queues go to, written once by `ringmq admin cluster topic-create` (create if absent).
//! - `masters/<group>`: [`MasterRoute`], every shard address of the group's master, written
//!   by the master under its lease (guarded by its election key) once it serves.

use serde::{Deserialize, Serialize};

/// Keys of one broker group.
#[derive(Debug, Clone)]
pub struct GroupKeys {
    prefix: String,
}

impl GroupKeys {
    pub fn new(cluster: &str, group: &str) -> GroupKeys {
        GroupKeys {
            prefix: format!("{}{group}/", groups_prefix(cluster)),
        }
    }

    pub fn master(&self) -> String {
        format!("{}master", self.prefix)
    }

    pub fn in_sync(&self) -> String {
        format!("{}in_sync", self.prefix)
    }

    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }

    pub fn member(&self, node: &str) -> String {
        format!("{}{node}", self.members())
    }
}

/// Where the routes of `cluster` live: cluster topics and masters' shard addresses.
pub fn routes_prefix(cluster: &str) -> String {
    format!("/ringmq/{cluster}/routes/")
}

pub fn topics_prefix(cluster: &str) -> String {
    format!("{}topics/", routes_prefix(cluster))
}

pub fn topic_key(cluster: &str, topic: &str) -> String {
    format!("{}{topic}", topics_prefix(cluster))
}

pub fn master_routes_prefix(cluster: &str) -> String {
    format!("{}masters/", routes_prefix(cluster))
}

pub fn master_route_key(cluster: &str, group: &str) -> String {
    format!("{}{group}", master_routes_prefix(cluster))
}

/// A cluster topic: queue `q` is served by group `groups[q % groups.len()]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub queues: u32,
    pub groups: Vec<String>,
}

/// Where a group's master serves: every shard's `host:port`, shard 0 first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterRoute {
    pub node: String,
    pub shards: Vec<String>,
    /// The master's term (its election key's create revision).
    pub term: u64,
}

/// Where every group of `cluster` lives.
pub fn groups_prefix(cluster: &str) -> String {
    format!("/ringmq/{cluster}/groups/")
}

/// The election key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterRecord {
    pub node: String,
    /// Shard 0's `host:port`.
    pub addr: String,
}

/// A member as it last described itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node: String,
    pub addr: String,
    /// `master`, `slave`, or `waiting` (no broker running: no master known yet).
    pub role: String,
    /// The broker's current epoch (0 while waiting).
    pub epoch: u64,
    /// The bytes of its log, summed over shards (a slave's own appended position).
    pub log_end: u64,
    /// A slave: whom it follows (shard 0's address).
    pub following: Option<String>,
    /// A slave: every shard streams from its master.
    pub streaming: bool,
    /// A master: its largest replica lag over shards, in bytes and in ms.
    pub lag_bytes: u64,
    pub lag_ms: u64,
    /// Wall clock of the write, for `ringmq admin cluster` (never used to decide anything).
    pub updated_unix_ms: u64,
}

impl MemberRecord {
    /// Whether `other` says the same about what the others decide on (everything but the log
    /// end, the lag and the time of the write, which move all the time).
    pub fn same_standing(&self, other: &MemberRecord) -> bool {
        self.node == other.node
            && self.addr == other.addr
            && self.role == other.role
            && self.epoch == other.epoch
            && self.following == other.following
            && self.streaming == other.streaming
    }
}

/// The master's view of which members are caught up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InSyncRecord {
    /// The master that wrote it, and its term.
    pub master: String,
    pub term: u64,
    /// Members (other than the master) within the in-sync bounds when it was written.
    pub nodes: Vec<String>,
    pub updated_unix_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
