//! Routes of a cluster on etcd: which broker group serves each queue of a cluster topic, and
//! where each group's master listens. The cluster control thread (`cluster::routes`) builds a
//! [`RouteView`] from etcd and publishes it here; shards read it.
//!
//! A cluster topic's queue `q` is served by group `groups[q % groups.len()]`, and inside that
//! group by the shard [`shard_of`] names for the group master's shard count. A topic etcd does
//! not know is a topic of this broker alone, routed as before.
//!
//! Reading costs one atomic load per request while nothing changed: each shard keeps the view
//! it last saw with its version ([`RouteCache`]) and takes the lock only when the version
//! moved (a master or a topic changed: rare).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::shard::router::shard_of;

/// Where a cluster topic's queues go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPlacement {
    pub queues: u32,
    /// Never empty (records without groups are not placements).
    pub groups: Vec<String>,
}

impl TopicPlacement {
    /// The group that serves `queue`.
    pub fn group_of(&self, queue: u32) -> &str {
        &self.groups[queue as usize % self.groups.len()]
    }
}

/// A group's current master: its node name and every shard's `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMaster {
    pub node: String,
    pub shards: Vec<String>,
}

/// Where a queue of a cluster topic is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOwner<'a> {
    pub group: &'a str,
    /// The master's shard and its address; `None` while the group has no master.
    pub at: Option<(usize, &'a str)>,
}

/// The cluster's routes as etcd held them at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteView {
    /// The group this broker belongs to.
    pub group: String,
    pub topics: HashMap<String, TopicPlacement>,
    pub masters: HashMap<String, GroupMaster>,
}

impl RouteView {
    pub fn placement(&self, topic: &str) -> Option<&TopicPlacement> {
        self.topics.get(topic)
    }

    /// Who serves `queue` of `topic`: `None` for a topic etcd does not know.
    pub fn owner(&self, topic: &str, queue: u32) -> Option<QueueOwner<'_>> {
        let group = self.placement(topic)?.group_of(queue);
        let at = self
            .masters
            .get(group)
            .filter(|m| !m.shards.is_empty())
            .map(|m| {
                let shard = shard_of(topic, queue, m.shards.len());
                (shard, m.shards[shard].as_str())
            });
        Some(QueueOwner { group, at })
    }

    /// Whether this broker's group serves `queue` of `topic` (true for a topic etcd does not
    /// know: it is this broker's alone).
    pub fn served_here(&self, topic: &str, queue: u32) -> bool {
        self.placement(topic)
            .map_or(true, |p| p.group_of(queue) == self.group)
    }
}

/// The published view, shared by the control thread (writer) and every shard (readers).
#[derive(Debug, Default)]
pub struct ClusterRoutes {
    version: AtomicU64,
    view: Mutex<(u64, Arc<RouteView>)>,
}

impl ClusterRoutes {
    /// Routes for a broker of `group`, empty until the first [`ClusterRoutes::publish`].
    pub fn new(group: &str) -> ClusterRoutes {
        let view = RouteView {
            group: group.to_string(),
            ..RouteView::default()
        };
        ClusterRoutes {
            version: AtomicU64::new(0),
            view: Mutex::new((0, Arc::new(view))),
        }
    }

    /// Publishes `view` if it differs from the current one; returns whether it did.
    pub fn publish(&self, view: RouteView) -> bool {
        let mut slot = self.view.lock().expect("routes lock");
        if *slot.1 == view {
            return false;
        }
        let version = slot.0 + 1;
        *slot = (version, Arc::new(view));
        self.version.store(version, Ordering::Release);
        true
    }

    /// The current view and its version.
    pub fn current(&self) -> (u64, Arc<RouteView>) {
        let slot = self.view.lock().expect("routes lock");
        (slot.0, slot.1.clone())
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// One shard's copy of the published view (it lives on the shard's thread).
pub struct RouteCache {
    routes: Arc<ClusterRoutes>,
    seen: std::cell::RefCell<(u64, Arc<RouteView>)>,
}

impl RouteCache {
    pub fn new(routes: Arc<ClusterRoutes>) -> RouteCache {
        let seen = std::cell::RefCell::new(routes.current());
        RouteCache { routes, seen }
    }

    /// The view as of now: the cached one unless a newer one was published.
    pub fn view(&self) -> Arc<RouteView> {
        let mut seen = self.seen.borrow_mut();
        if self.routes.version() != seen.0 {
            *seen = self.routes.current();
        }
        seen.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> RouteView {
        let mut v = RouteView {
            group: "g1".into(),
            ..RouteView::default()
        };
        v.topics.insert(
            "orders".into(),
            TopicPlacement {
                queues: 4,
                groups: vec!["g1".into(), "g2".into()],
            },
        );
        v.masters.insert(
            "g2".into(),
            GroupMaster {
                node: "b1".into(),
                shards: vec!["127.0.0.2:1".into(), "127.0.0.2:2".into()],
            },
        );
        v
    }

    #[test]
    fn queues_of_a_cluster_topic_alternate_over_its_groups() {
        let v = view();
        let served: Vec<bool> = (0..4).map(|q| v.served_here("orders", q)).collect();
        assert_eq!(served, [true, false, true, false]);
        // A topic etcd does not know is this broker's.
        assert!(v.served_here("local", 1));
        assert_eq!(v.owner("local", 1), None);
        // g1 has no master in the view; g2's master serves queue 1 on the shard shard_of says.
        assert_eq!(v.owner("orders", 0).unwrap().at, None);
        let owner = v.owner("orders", 1).unwrap();
        let shard = shard_of("orders", 1, 2);
        assert_eq!(owner.group, "g2");
        assert_eq!(
            owner.at,
            Some((shard, v.masters["g2"].shards[shard].as_str()))
        );
    }

    #[test]
    fn a_shard_sees_a_new_view_only_when_one_was_published() {
        let routes = Arc::new(ClusterRoutes::new("g1"));
        let cache = RouteCache::new(routes.clone());
        assert!(cache.view().topics.is_empty());
        assert!(routes.publish(view()));
        assert_eq!(*cache.view(), view());
        // The same view again is no news.
        assert!(!routes.publish(view()));
        assert_eq!(routes.current().0, 1);
    }
}
