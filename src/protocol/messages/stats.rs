//! The stats family: BrokerStats (6) and QueueStats (12). The per-shard and per-queue entries
//! are FlatBuffers structs (fixed layout), so a field is added as a new struct beside the old
//! one ([`ReplicaStats`] next to [`ShardStats`]), never inside it.

use std::mem::size_of;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;

// The wire structs' sizes are part of the format: a schema edit that changes one would break
// every older peer, so it must not build.
const _: () = assert!(size_of::<fb::QueueStat>() == 32);
const _: () = assert!(size_of::<fb::ShardStats>() == 80);
const _: () = assert!(size_of::<fb::ReplicaStats>() == 72);

/// Offsets and size of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStat {
    pub queue: u32,
    pub min_offset: u64,
    pub end_offset: u64,
    pub bytes: u64,
}

/// Counters and watermarks of one shard; log positions are bytes into its CommitLog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardStats {
    pub shard: u32,
    pub written: u64,
    pub durable: u64,
    pub visible: u64,
    pub fsyncs: u64,
    pub appends: u64,
    pub unflushed_bytes: u64,
    pub unflushed_bytes_max: u64,
    pub flush_latency_us_total: u64,
    pub connections: u32,
    pub poisoned: bool,
    /// Replication state of the shard; defaults when the broker predates replication.
    pub replication: ReplicaStats,
}

/// Replication state of one shard, from its own point of view. Travels next to
/// [`ShardStats`] (the wire struct of which has a fixed layout) as a separate struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaStats {
    /// 0 = master, 1 = slave.
    pub role: u8,
    /// Current epoch of this shard's log history.
    pub epoch: u64,
    /// 0 = no peer, 1 = connecting / handshaking, 2 = streaming.
    pub link: u8,
    /// Master: the slave's acknowledged received / durable positions. Slave: its own
    /// appended / durable.
    pub peer_received: u64,
    pub peer_durable: u64,
    /// Master: its own log end. Slave: the master's log end as last heard.
    pub log_end: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub catchup_bytes_per_sec: u64,
    /// Times the replication link (re)connected since start.
    pub connects: u64,
}

impl ReplicaStats {
    pub const ROLE_MASTER: u8 = 0;
    pub const ROLE_SLAVE: u8 = 1;
    pub const LINK_NONE: u8 = 0;
    pub const LINK_CONNECTING: u8 = 1;
    pub const LINK_STREAMING: u8 = 2;

    /// `master` or `slave`; `unknown` for a number from a newer broker, so a report never
    /// fails on it.
    pub const fn role_name(self) -> &'static str {
        match self.role {
            Self::ROLE_MASTER => "master",
            Self::ROLE_SLAVE => "slave",
            _ => "unknown",
        }
    }

    /// `none`, `connecting` or `streaming`; `unknown` for a number from a newer broker.
    pub const fn link_name(self) -> &'static str {
        match self.link {
            Self::LINK_NONE => "none",
            Self::LINK_CONNECTING => "connecting",
            Self::LINK_STREAMING => "streaming",
            _ => "unknown",
        }
    }
}

impl<'a> fb::QueueStatsRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, topic: &str) -> WIPOffset<Self> {
        let topic = fbb.create_string(topic);
        fb::QueueStatsRequest::create(fbb, &fb::QueueStatsRequestArgs { topic: Some(topic) })
    }

    pub(crate) fn decode(self) -> Result<String, String> {
        Ok(self.topic().to_owned())
    }
}

impl<'a> fb::QueueStatsResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, stats: &[QueueStat]) -> WIPOffset<Self> {
        let items: Vec<fb::QueueStat> = stats
            .iter()
            .map(|s| fb::QueueStat::new(s.queue, s.min_offset, s.end_offset, s.bytes))
            .collect();
        let stats = fbb.create_vector(&items);
        fb::QueueStatsResponse::create(fbb, &fb::QueueStatsResponseArgs { stats: Some(stats) })
    }

    pub(crate) fn decode(self) -> Result<Vec<QueueStat>, String> {
        let stats = self.stats().into_iter().flatten();
        Ok(stats
            .map(|s| QueueStat {
                queue: s.queue(),
                min_offset: s.min_offset(),
                end_offset: s.end_offset(),
                bytes: s.bytes(),
            })
            .collect())
    }
}

impl<'a> fb::BrokerStatsResponse<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        shards: &[ShardStats],
    ) -> WIPOffset<Self> {
        let items: Vec<fb::ShardStats> = shards
            .iter()
            .map(|s| {
                fb::ShardStats::new(
                    s.shard,
                    s.written,
                    s.durable,
                    s.visible,
                    s.fsyncs,
                    s.appends,
                    s.unflushed_bytes,
                    s.unflushed_bytes_max,
                    s.flush_latency_us_total,
                    s.connections,
                    s.poisoned,
                )
            })
            .collect();
        // Entry i of `replicas` describes `shards[i]`; ShardStats' wire layout is fixed.
        let replicas: Vec<fb::ReplicaStats> = shards
            .iter()
            .map(|s| {
                let r = &s.replication;
                fb::ReplicaStats::new(
                    r.role,
                    r.link,
                    r.epoch,
                    r.peer_received,
                    r.peer_durable,
                    r.log_end,
                    r.lag_bytes,
                    r.lag_ms,
                    r.catchup_bytes_per_sec,
                    r.connects,
                )
            })
            .collect();
        let shards = fbb.create_vector(&items);
        let replicas = fbb.create_vector(&replicas);
        let args = fb::BrokerStatsResponseArgs {
            shards: Some(shards),
            replicas: Some(replicas),
        };
        fb::BrokerStatsResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<Vec<ShardStats>, String> {
        let mut shards: Vec<ShardStats> = self
            .shards()
            .into_iter()
            .flatten()
            .map(|s| ShardStats {
                shard: s.shard(),
                written: s.written(),
                durable: s.durable(),
                visible: s.visible(),
                fsyncs: s.fsyncs(),
                appends: s.appends(),
                unflushed_bytes: s.unflushed_bytes(),
                unflushed_bytes_max: s.unflushed_bytes_max(),
                flush_latency_us_total: s.flush_latency_us_total(),
                connections: s.connections(),
                poisoned: s.poisoned(),
                replication: ReplicaStats::default(),
            })
            .collect();
        // Matched by index; an older broker sends no `replicas`, so the defaults stay, and
        // entries beyond the shards describe nothing and are ignored.
        for (s, r) in shards.iter_mut().zip(self.replicas().into_iter().flatten()) {
            s.replication = ReplicaStats {
                role: r.role(),
                epoch: r.epoch(),
                link: r.link(),
                peer_received: r.peer_received(),
                peer_durable: r.peer_durable(),
                log_end: r.log_end(),
                lag_bytes: r.lag_bytes(),
                lag_ms: r.lag_ms(),
                catchup_bytes_per_sec: r.catchup_bytes_per_sec(),
                connects: r.connects(),
            };
        }
        Ok(shards)
    }
}
