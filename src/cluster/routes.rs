//! A cluster's routes as one broker follows them: a prefix watch on
//! `/ringmq/<cluster>/routes/` (cluster topics and masters' shard addresses, see
//! [`records`](crate::cluster::records)), and a read of that whole prefix whenever the watch
//! says it changed. The view read is published to the broker's shards
//! ([`ClusterRoutes`]), which answer GetRoute from it and refuse a queue another group serves.
//!
//! Behind the watch the prefix is read again every [`CHECK_INTERVAL`]; without a watch (etcd
//! unreachable, the watch lost) every [`UNWATCHED_INTERVAL`]; never twice within
//! [`MIN_READ_SPACING`] ([`ReadRule`]). Member records and in-sync sets
//! live elsewhere, so their rewrites cost a broker nothing here: a read happens when a master
//! or a topic changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::etcd::{Etcd, EtcdError, KeyValue};
use crate::cluster::records::{
    master_routes_prefix, routes_prefix, topics_prefix, MasterRoute, TopicRecord,
};
use crate::cluster::watcher::Watcher;
use crate::protocol::validate_topic_name;
use crate::shard::cluster_routes::{ClusterRoutes, GroupMaster, RouteView, TopicPlacement};

/// How often the routes are read again while a watch on them is open.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often they are read while no watch is open, and after a failed read.
pub const UNWATCHED_INTERVAL: Duration = Duration::from_secs(1);
/// The least time between two reads, however often the watch fires: a change after a quiet
/// spell is read at once, and a burst of them (every master of a starting cluster writing its
/// route, a failover storm) costs a broker one read a second, not one per 100 ms tick (measured
/// with `ringmq-bench etcd-load`: 394 route reads/s for 100 groups, against a wanted 20).
pub const MIN_READ_SPACING: Duration = Duration::from_secs(1);

pub struct RouteFollower {
    cluster: String,
    group: String,
    routes: Arc<ClusterRoutes>,
    watch: Watcher,
    rule: ReadRule,
}

/// When to read the routes again (`ringmq-bench etcd-load` follows the same rule): after a
/// change the watch saw, at once unless the last read was under [`MIN_READ_SPACING`] ago (then
/// when it is); without news every [`CHECK_INTERVAL`] while a watch is open and the last read
/// worked, every [`UNWATCHED_INTERVAL`] when not.
#[derive(Debug, Default)]
pub struct ReadRule {
    last_read: Option<Instant>,
    /// The last read failed.
    failed: bool,
    /// A change the watch saw and no read has covered yet.
    pending: bool,
}

impl ReadRule {
    /// Whether to read now (takes the watch's change flag; a `true` counts as the read).
    pub fn due(&mut self, watch: &Watcher) -> bool {
        if watch.take_changed() {
            self.pending = true;
        }
        let since = self.last_read.map_or(Duration::MAX, |t| t.elapsed());
        let every = if watch.live() && !self.failed {
            CHECK_INTERVAL
        } else {
            UNWATCHED_INTERVAL
        };
        let due = since >= every || (self.pending && since >= MIN_READ_SPACING);
        if due {
            self.last_read = Some(Instant::now());
            self.pending = false;
        }
        due
    }

    /// How the read [`ReadRule::due`] asked for went.
    pub fn read_done(&mut self, ok: bool) {
        self.failed = !ok;
    }

    pub fn failed(&self) -> bool {
        self.failed
    }
}

impl RouteFollower {
    pub fn start(etcd: Arc<Etcd>, cluster: &str, group: &str) -> std::io::Result<RouteFollower> {
        Ok(RouteFollower {
            cluster: cluster.to_string(),
            group: group.to_string(),
            routes: Arc::new(ClusterRoutes::new(group)),
            watch: Watcher::start_prefix(etcd, routes_prefix(cluster))?,
            rule: ReadRule::default(),
        })
    }

    /// What the broker's shards read.
    pub fn routes(&self) -> Arc<ClusterRoutes> {
        self.routes.clone()
    }

    /// One look: reads the routes when the watch saw a change or a read is due, and publishes
    /// them. Returns whether a new view was published.
    pub fn tick(&mut self, etcd: &Etcd) -> bool {
        if !self.rule.due(&self.watch) {
            return false;
        }
        match read_view(etcd, &self.cluster, &self.group) {
            Ok(view) => {
                self.rule.read_done(true);
                let (topics, masters) = (view.topics.len(), view.masters.len());
                let news = self.routes.publish(view);
                if news {
                    log::info!(
                        "cluster: routes now: {topics} cluster topic(s), {masters} group master(s)"
                    );
                }
                news
            }
            Err(e) => {
                if !self.rule.failed() {
                    log::warn!("cluster: cannot read the routes (keeping the last ones): {e}");
                }
                self.rule.read_done(false);
                false
            }
        }
    }
}

/// The routes of `cluster` as etcd holds them now, for a broker of `group`.
pub fn read_view(etcd: &Etcd, cluster: &str, group: &str) -> Result<RouteView, EtcdError> {
    let kvs = etcd.get_prefix(&routes_prefix(cluster))?;
    Ok(view_of(cluster, group, &kvs))
}

/// The view the keys under the routes prefix describe. A record that does not parse, or says
/// what cannot be routed (no groups, no queues, a bad name), is left out with a warning.
pub fn view_of(cluster: &str, group: &str, kvs: &[KeyValue]) -> RouteView {
    let mut view = RouteView {
        group: group.to_string(),
        ..RouteView::default()
    };
    let (topics, masters) = (topics_prefix(cluster), master_routes_prefix(cluster));
    for kv in kvs {
        if let Some(topic) = kv.key.strip_prefix(&topics) {
            match serde_json::from_slice::<TopicRecord>(&kv.value) {
                Ok(r) if r.queues > 0 && !r.groups.is_empty() => {
                    if validate_topic_name(topic).is_ok() {
                        view.topics.insert(
                            topic.to_string(),
                            TopicPlacement {
                                queues: r.queues,
                                groups: r.groups,
                            },
                        );
                        continue;
                    }
                    log::warn!("cluster: {}: not a valid topic name; ignored", kv.key);
                }
                Ok(_) => log::warn!("cluster: {}: no queues or no groups; ignored", kv.key),
                Err(e) => log::warn!("cluster: {}: not a topic record ({e}); ignored", kv.key),
            }
        } else if let Some(g) = kv.key.strip_prefix(&masters) {
            match serde_json::from_slice::<MasterRoute>(&kv.value) {
                Ok(r) if !r.shards.is_empty() => {
                    view.masters.insert(
                        g.to_string(),
                        GroupMaster {
                            node: r.node,
                            shards: r.shards,
                        },
                    );
                }
                Ok(_) => log::warn!("cluster: {}: no shard addresses; ignored", kv.key),
                Err(e) => log::warn!("cluster: {}: not a master route ({e}); ignored", kv.key),
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::records::{master_route_key, topic_key};

    fn kv(key: String, value: &str) -> KeyValue {
        KeyValue {
            key,
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn the_routes_prefix_becomes_a_view_and_bad_records_are_left_out() {
        let kvs = vec![
            kv(
                master_route_key("c", "g2"),
                r#"{"node":"b1","shards":["127.0.0.2:1"],"term":7}"#,
            ),
            kv(
                master_route_key("c", "g3"),
                r#"{"node":"c1","shards":[],"term":8}"#,
            ),
            kv(master_route_key("c", "g4"), "not json"),
            kv(
                topic_key("c", "orders"),
                r#"{"queues":4,"groups":["g1","g2"]}"#,
            ),
            kv(topic_key("c", "empty"), r#"{"queues":4,"groups":[]}"#),
            kv(topic_key("c", "none"), r#"{"queues":0,"groups":["g1"]}"#),
            kv(
                topic_key("c", "bad name"),
                r#"{"queues":1,"groups":["g1"]}"#,
            ),
            kv(format!("{}other", routes_prefix("c")), "{}"),
        ];
        let view = view_of("c", "g1", &kvs);
        assert_eq!(view.group, "g1");
        assert_eq!(view.topics.keys().collect::<Vec<_>>(), ["orders"]);
        assert_eq!(view.masters.keys().collect::<Vec<_>>(), ["g2"]);
        assert_eq!(view.masters["g2"].shards, ["127.0.0.2:1"]);
        assert!(!view.served_here("orders", 1));
    }
}
