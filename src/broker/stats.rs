//! Statistics: a queue's offsets and bytes, a shard's counters and watermarks, gathered from
//! the shards that own them.

use crate::broker::{topics, Result, Services};
use crate::protocol::{QueueStat, Response, ShardStats};
use crate::shard::mesh::{MeshReply, MeshRequest};

/// The queues of `topic` this shard owns.
pub fn local_queue_stats(s: &Services, topic: &str) -> Vec<QueueStat> {
    let ctx = &s.shard;
    let Some(meta) = ctx.topic(topic) else {
        return Vec::new();
    };
    (0..meta.queues)
        .filter(|q| ctx.owner_of(topic, *q) == ctx.shard)
        .map(|queue| {
            let st = ctx.store().queue_stats(topic, queue);
            QueueStat {
                queue,
                min_offset: st.min_offset.0,
                end_offset: st.visible_end_offset.0,
                bytes: st.bytes,
            }
        })
        .collect()
}

/// Every queue of `topic`, from the shards that own them.
pub async fn queue_stats(s: &Services, topic: &str) -> Result<Response> {
    topics::queue_count(s, topic)?;
    let ctx = &s.shard;
    let mut all = local_queue_stats(s, topic);
    for shard in (0..ctx.shards).filter(|o| *o != ctx.shard) {
        let request = MeshRequest::LocalQueueStats {
            topic: topic.to_string(),
        };
        if let MeshReply::QueueStats(stats) = ctx.mesh.call(shard, request).await? {
            all.extend(stats);
        }
    }
    all.sort_by_key(|q| q.queue);
    Ok(Response::QueueStats(all))
}

/// This shard's counters and watermarks.
pub fn local_shard_stats(s: &Services) -> ShardStats {
    let ctx = &s.shard;
    let repl = &s.replication;
    let w = ctx.store().watermarks();
    let m = ctx.store().metrics();
    ShardStats {
        shard: ctx.shard as u32,
        written: w.written.0,
        durable: w.durable.0,
        visible: w.visible.0,
        fsyncs: m.fsyncs,
        appends: m.appends,
        unflushed_bytes: m.unflushed_bytes,
        unflushed_bytes_max: m.unflushed_hwm_bytes,
        flush_latency_us_total: m.flush_latency_sum_us,
        connections: ctx.open_connections() as u32,
        poisoned: m.poisoned,
        replication: repl
            .tracker()
            .stats(repl.role(), repl.epoch(), w.appended.0),
    }
}

/// Counters of every shard, gathered over the mesh.
pub async fn broker_stats(s: &Services) -> Result<Response> {
    let ctx = &s.shard;
    let mut all = vec![local_shard_stats(s)];
    for shard in (0..ctx.shards).filter(|o| *o != ctx.shard) {
        if let MeshReply::ShardStats(st) =
            ctx.mesh.call(shard, MeshRequest::LocalShardStats).await?
        {
            all.push(st);
        }
    }
    all.sort_by_key(|st| st.shard);
    Ok(Response::BrokerStats(all))
}
