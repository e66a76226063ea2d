//! A shard's metrics as Prometheus families, read on the shard's own thread.
//!
//! Everything here is a copy of counters that already exist: the store's
//! ([`crate::storage::StorageMetrics`]: appends, fsyncs, unflushed bytes, the fsync latency and
//! group-commit histograms), the shard's stats ([`super::stats::local_shard_stats`]: watermarks,
//! connections, the replica tracker's lag and link) and the shard's request counters
//! ([`crate::metrics::ShardMetrics`]). Nothing is counted twice. `server::metrics_http`
//! publishes the result for the HTTP thread and adds what only the node knows (disk, segment
//! files, the oldest message).

use crate::broker::groups;
use crate::broker::groups::records::{DELAY_LEVELS_MS, SCHEDULE_LOG};
use crate::broker::stats::local_shard_stats;
use crate::broker::{transactions, Services};
use crate::metrics::Family;
use crate::protocol::ReplicaStats;
use crate::replication::lease::LeaseState;

/// The families of this shard, every sample labelled `shard`. `refusals` are refusals counted
/// outside the services (by the connections: the shard budget, partial-frame timeouts).
pub fn shard_families(s: &Services, refusals: &[(&'static str, u64)]) -> Vec<Family> {
    let ctx = &s.shard;
    let shard = ctx.shard.to_string();
    let sh: &[(&'static str, &str)] = &[("shard", &shard)];
    let st = local_shard_stats(s);
    let m = ctx.store().metrics();
    let w = ctx.store().watermarks();
    let r = &st.replication;
    let mut out = Vec::with_capacity(40);

    let mut produced_msgs = Family::counter(
        "ringmq_produced_messages_total",
        "Messages stored by produce requests, per topic (idempotent retries not counted again).",
    );
    let mut produced_bytes = Family::counter(
        "ringmq_produced_bytes_total",
        "Message batch bytes stored by produce requests, per topic.",
    );
    let mut fetched_msgs = Family::counter(
        "ringmq_fetched_messages_total",
        "Messages at or after the requested offset returned by fetch requests, per topic.",
    );
    let mut fetched_bytes = Family::counter(
        "ringmq_fetched_bytes_total",
        "Record bytes returned by fetch requests, per topic.",
    );
    for (topic, c) in ctx.metrics.topics() {
        let l: &[(&'static str, &str)] = &[("shard", &shard), ("topic", &topic)];
        produced_msgs.push(l, c.produced_messages as f64);
        produced_bytes.push(l, c.produced_bytes as f64);
        fetched_msgs.push(l, c.fetched_messages as f64);
        fetched_bytes.push(l, c.fetched_bytes as f64);
    }
    out.extend([produced_msgs, produced_bytes, fetched_msgs, fetched_bytes]);

    let mut results = Family::counter(
        "ringmq_produce_requests_total",
        "Produce requests answered, by status code name (OK is success).",
    );
    for (code, n) in ctx.metrics.produce_results() {
        results.push(&[("shard", &shard), ("code", code)], n as f64);
    }
    out.push(results);
    let mut refused = Family::counter(
        "ringmq_refused_requests_total",
        "Requests refused to protect the broker, by reason (shard_budget = SYSTEM_BUSY from the \
         shard's in-flight byte budget).",
    );
    for (reason, n) in refusals.iter().copied().chain(ctx.metrics.refusals()) {
        refused.push(&[("shard", &shard), ("reason", reason)], n as f64);
    }
    out.push(refused);

    out.push(
        Family::gauge(
            "ringmq_unflushed_bytes",
            "Log bytes appended but not yet made durable by an fdatasync (what a crash may lose \
             under ASYNC_FLUSH).",
        )
        .with(sh, m.unflushed_bytes as f64),
    );
    out.push(
        Family::gauge(
            "ringmq_unflushed_bytes_max",
            "The most unflushed log bytes seen since the shard opened its store.",
        )
        .with(sh, m.unflushed_hwm_bytes as f64),
    );
    let mut marks = Family::gauge(
        "ringmq_log_position_bytes",
        "The shard's CommitLog watermarks: appended >= written >= durable >= visible.",
    );
    for (mark, v) in [
        ("appended", w.appended.0),
        ("written", w.written.0),
        ("durable", w.durable.0),
        ("visible", w.visible.0),
    ] {
        marks.push(&[("shard", &shard), ("mark", mark)], v as f64);
    }
    out.push(marks);
    out.push(
        Family::counter("ringmq_appends_total", "Records appended to the CommitLog.")
            .with(sh, m.appends as f64),
    );
    out.push(
        Family::counter(
            "ringmq_log_written_bytes_total",
            "Bytes written to CommitLog segments (aligned blocks, partial tail rewrites included).",
        )
        .with(sh, m.written_bytes as f64),
    );
    out.push(
        Family::counter(
            "ringmq_fsyncs_total",
            "fdatasync calls on CommitLog segments.",
        )
        .with(sh, m.fsyncs as f64),
    );
    out.push(
        Family::counter(
            "ringmq_flush_cycles_total",
            "Flush cycles (group commits) completed by the shard's flush leader.",
        )
        .with(sh, m.flush_cycles as f64),
    );
    let mut fsync = Family::histogram(
        "ringmq_fsync_duration_seconds",
        "Time the fdatasyncs of one flush cycle took.",
    );
    fsync.push_histogram(sh, &m.fsync_latency_us, 1e6);
    out.push(fsync);
    let mut gc_bytes = Family::histogram(
        "ringmq_group_commit_bytes",
        "Log bytes one flush cycle (one group commit) made durable.",
    );
    gc_bytes.push_histogram(sh, &m.group_commit_bytes, 1.0);
    out.push(gc_bytes);
    let mut gc_records = Family::histogram(
        "ringmq_group_commit_records",
        "Records one flush cycle (one group commit) made durable: acks per fsync.",
    );
    gc_records.push_histogram(sh, &m.group_commit_records, 1.0);
    out.push(gc_records);
    out.push(
        Family::gauge(
            "ringmq_storage_poisoned",
            "1 when a write or fdatasync failed and the shard's log refuses writes.",
        )
        .with(sh, if m.poisoned { 1.0 } else { 0.0 }),
    );
    out.push(
        Family::counter(
            "ringmq_checkpoints_total",
            "Durable checkpoints written since the store opened.",
        )
        .with(sh, m.checkpoints as f64),
    );
    out.push(
        Family::counter(
            "ringmq_segments_recycled_total",
            "New CommitLog segments that were segments dropped by retention, reused as they \
             are (no zeros written).",
        )
        .with(sh, m.segments_recycled as f64),
    );
    out.push(
        Family::gauge(
            "ringmq_quarantined_records",
            "Corrupt records quarantined by recovery at the last open (skip-corrupt).",
        )
        .with(sh, m.quarantined_records as f64),
    );
    out.push(
        Family::gauge("ringmq_connections", "Open client connections.")
            .with(sh, st.connections as f64),
    );

    out.extend(replication_families(&shard, r));
    out.extend(cluster_families(s, &shard));
    out.extend(group_families(s, &shard));
    let (open, discarded) = transactions::counts(s);
    out.push(
        Family::gauge(
            "ringmq_transactions_open",
            "Half messages stored on this shard and not ended yet (as far as it has applied).",
        )
        .with(sh, open as f64),
    );
    out.push(
        Family::counter(
            "ringmq_transactions_discarded_total",
            "Half messages rolled back after transaction_check_max unanswered check-backs since \
             the broker started (copied to %TXN_DISCARDED%<group>).",
        )
        .with(sh, discarded as f64),
    );
    out
}

/// Consumer groups: members of the groups this shard coordinates, delayed messages waiting in
/// its schedule per level, and dead letters in its queues of each `%DLQ%` topic. (Lag needs the
/// queue ends of other shards: `ringmq admin group describe` shows it.)
fn group_families(s: &Services, shard: &str) -> Vec<Family> {
    let mut members = Family::gauge(
        "ringmq_consumer_group_members",
        "Live members of each consumer group this shard coordinates.",
    );
    let mut scheduled = Family::gauge(
        "ringmq_scheduled_messages",
        "Retries and delayed messages waiting in this shard's schedule, per delay level.",
    );
    let mut dead = Family::gauge(
        "ringmq_dead_letter_messages",
        "Messages in this shard's queues of each dead-letter topic (%DLQ%<group>).",
    );
    let store = s.shard.store();
    {
        let table = groups::table(s);
        for (group, g) in table.groups() {
            members.push(
                &[("shard", shard), ("group", group)],
                g.members.len() as f64,
            );
        }
        for level in 1..=DELAY_LEVELS_MS.len() as u32 {
            let st = store.queue_stats(SCHEDULE_LOG, level - 1);
            let cursor = table.progress(level).unwrap_or(0).max(st.min_offset.0);
            let waiting = st.written_end_offset.0.saturating_sub(cursor);
            if waiting > 0 {
                let level = level.to_string();
                scheduled.push(&[("shard", shard), ("level", &level)], waiting as f64);
            }
        }
    }
    for (topic, meta) in s.shard.topics().iter() {
        if !topic.starts_with("%DLQ%") {
            continue;
        }
        let depth: u64 = (0..meta.queues)
            .filter(|q| s.shard.owner_of(topic, *q) == s.shard.shard)
            .map(|q| {
                let st = store.queue_stats(topic, q);
                st.visible_end_offset.0 - st.min_offset.0
            })
            .sum();
        dead.push(&[("shard", shard), ("topic", topic)], depth as f64);
    }
    vec![members, scheduled, dead]
}

fn replication_families(shard: &str, r: &ReplicaStats) -> Vec<Family> {
    let sh: &[(&'static str, &str)] = &[("shard", shard)];
    let mut role = Family::gauge(
        "ringmq_replication_role",
        "1 for the shard's current role (master or slave).",
    );
    for name in ["master", "slave"] {
        let on = r.role_name() == name;
        role.push(&[("shard", shard), ("role", name)], on as u8 as f64);
    }
    let mut link = Family::gauge(
        "ringmq_replica_link_state",
        "1 for the replication link's current state (none, connecting, streaming).",
    );
    for name in ["none", "connecting", "streaming"] {
        let on = r.link_name() == name;
        link.push(&[("shard", shard), ("state", name)], on as u8 as f64);
    }
    vec![
        role,
        link,
        Family::gauge(
            "ringmq_replica_lag_bytes",
            "Master: log bytes its slave has not acknowledged receiving. Slave: what it lacks \
             of the master's log end.",
        )
        .with(sh, r.lag_bytes as f64),
        Family::gauge(
            "ringmq_replica_lag_seconds",
            "Age of the oldest log byte the slave lacks (0 when caught up).",
        )
        .with(sh, r.lag_ms as f64 / 1000.0),
        Family::gauge(
            "ringmq_replica_catchup_bytes_per_second",
            "Replication stream rate over the last window.",
        )
        .with(sh, r.catchup_bytes_per_sec as f64),
        Family::counter(
            "ringmq_replica_connects_total",
            "Times the replication link (re)connected.",
        )
        .with(sh, r.connects as f64),
        Family::gauge("ringmq_replication_epoch", "The shard's current epoch.")
            .with(sh, r.epoch as f64),
    ]
}

/// In a broker group on etcd: whether etcd answers our lease renewals, and where a master's
/// lease stands (`lapsed`: not renewed in time, see `replication/lease.rs`). Nothing outside
/// a cluster.
fn cluster_families(s: &Services, shard: &str) -> Vec<Family> {
    let Some(answering) = s.replication.etcd_answering() else {
        return Vec::new();
    };
    let mut lease = Family::gauge(
        "ringmq_cluster_lease_state",
        "1 for where this master's cluster lease stands (held, lapsed, not_held; all 0 on a \
         slave). Lapsed: etcd did not confirm a renewal in time.",
    );
    let state = s.replication.lease_state();
    for st in [LeaseState::Held, LeaseState::Lapsed, LeaseState::NotHeld] {
        lease.push(
            &[("shard", shard), ("state", st.name())],
            (state == Some(st)) as u8 as f64,
        );
    }
    vec![
        Family::gauge(
            "ringmq_cluster_etcd_reachable",
            "1 if etcd answered the last lease renewal, 0 if it did not (unreachable, or \
             without a quorum: no election can happen then).",
        )
        .with(&[("shard", shard)], answering as u8 as f64),
        lease,
    ]
}

/// Most lag series one shard exports (a series per group and queue could be hundreds of
/// thousands; `ringmq admin group describe` shows them all).
pub const MAX_LAG_SERIES: usize = 10_000;

/// Consumer-group lag: messages between each committed offset of the groups this shard
/// coordinates and its queue's visible end. Async: the ends of queues other shards own come
/// over the mesh (one request per topic and shard, each time the metrics are published).
pub async fn group_lag_family(s: &Services) -> Family {
    let shard = s.shard.shard.to_string();
    let mut lag = Family::gauge(
        "ringmq_consumer_group_lag",
        "Messages between a consumer group's committed offset and its queue's end (groups this \
         shard coordinates; at most 10000 series per shard).",
    );
    let mut committed: Vec<(String, String, u32, u64)> = groups::table(s)
        .all_committed()
        .map(|(g, t, q, o)| (g.to_string(), t.to_string(), q, o))
        .collect();
    committed.sort();
    committed.truncate(MAX_LAG_SERIES);
    let mut ends: std::collections::HashMap<String, std::collections::HashMap<u32, u64>> =
        std::collections::HashMap::new();
    for (group, topic, queue, offset) in &committed {
        if !ends.contains_key(topic) {
            let all = match crate::broker::stats::queue_stats(s, topic).await {
                Ok(crate::protocol::Response::QueueStats(all)) => all,
                _ => continue, // deleted, or the mesh is stopping: no series this time
            };
            ends.insert(
                topic.clone(),
                all.into_iter().map(|q| (q.queue, q.end_offset)).collect(),
            );
        }
        if let Some(end) = ends.get(topic).and_then(|e| e.get(queue)) {
            let queue = queue.to_string();
            lag.push(
                &[
                    ("shard", shard.as_str()),
                    ("group", group),
                    ("topic", topic),
                    ("queue", &queue),
                ],
                end.saturating_sub(*offset) as f64,
            );
        }
    }
    lag
}
