//! What one shard owns: its store, its place in the mesh, the topic table it has seen, its
//! connections and the shutdown flag. Lives on its executor's thread, shared by its tasks
//! through `Rc`. Replication state (role, epochs, fencing) is kept apart, in
//! `replication::Replication`, which builds on this.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::shard::cluster_routes::{ClusterRoutes, RouteCache, RouteView};
use crate::shard::mesh::Mesh;
use crate::shard::router::shard_of;
use crate::shard::topics::{TopicMeta, TopicTable};
use crate::storage::ShardStore;

pub struct ShardContext {
    /// This shard's index, 0-based.
    pub shard: usize,
    /// Shards in this broker.
    pub shards: usize,
    pub config: Arc<Config>,
    /// Replaced only when a replica truncates its log (close, truncate, reopen).
    store: RefCell<ShardStore>,
    pub mesh: Mesh,
    /// `host:port` clients should dial for each shard, by shard index.
    pub addresses: Arc<Vec<String>>,
    /// Set by a signal handler or `Broker::stop`; every shard polls it.
    shutdown: Arc<AtomicBool>,
    /// The latest topic table this shard has seen (pushed by shard 0).
    topics: RefCell<Arc<TopicTable>>,
    /// Shard 0: one topic-table change at a time. The table is saved on the blocking pool, and
    /// a second change computed from the same table meanwhile would drop the first.
    pub topic_writes: glommio::sync::Semaphore,
    /// Round-robin cursor for produce requests that let the broker pick the queue.
    next_queue: Cell<u32>,
    /// Open client connections, so shutdown can wait for them to drain.
    connections: Cell<usize>,
    /// This shard's request counters (per topic, by status, refusals); published by
    /// `server::metrics_http`.
    pub metrics: ShardMetrics,
    /// In a cluster on etcd: the routes of its cluster topics (`None` for a broker alone).
    routes: Option<RouteCache>,
}

/// How often a shard looks at the shutdown flag. Shutdown is rare; 20 ms keeps it snappy
/// without measurable cost.
const SHUTDOWN_POLL_MS: u64 = 20;

impl ShardContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: usize,
        shards: usize,
        config: Arc<Config>,
        store: ShardStore,
        mesh: Mesh,
        addresses: Arc<Vec<String>>,
        shutdown: Arc<AtomicBool>,
        topics: Arc<TopicTable>,
    ) -> ShardContext {
        ShardContext {
            shard,
            shards,
            config,
            store: RefCell::new(store),
            mesh,
            addresses,
            shutdown,
            topics: RefCell::new(topics),
            topic_writes: glommio::sync::Semaphore::new(1),
            next_queue: Cell::new(shard as u32),
            connections: Cell::new(0),
            metrics: ShardMetrics::default(),
            routes: None,
        }
    }

    /// A broker of a cluster on etcd: reads its cluster topics' routes from `routes`.
    pub fn with_cluster_routes(mut self, routes: Option<Arc<ClusterRoutes>>) -> ShardContext {
        self.routes = routes.map(RouteCache::new);
        self
    }

    /// The cluster's routes as last published; `None` for a broker alone.
    pub fn cluster_routes(&self) -> Option<Arc<RouteView>> {
        self.routes.as_ref().map(RouteCache::view)
    }

    /// The shard's store (a cheap handle).
    pub fn store(&self) -> ShardStore {
        self.store.borrow().clone()
    }

    /// Replaces the store (a replica reopening after a truncation); the append hook carries
    /// over, so whoever listens to appends keeps hearing them.
    pub fn set_store(&self, store: ShardStore) {
        store.set_append_hook(self.store.borrow().append_hook());
        *self.store.borrow_mut() = store;
    }

    /// `<data>/shard-<n>`.
    pub fn shard_dir(&self) -> std::path::PathBuf {
        self.config
            .server
            .data_dir
            .join(format!("shard-{}", self.shard))
    }

    pub fn topics(&self) -> Arc<TopicTable> {
        self.topics.borrow().clone()
    }

    pub fn topic(&self, name: &str) -> Option<TopicMeta> {
        self.topics.borrow().get(name)
    }

    pub fn set_topics(&self, table: Arc<TopicTable>) {
        *self.topics.borrow_mut() = table;
    }

    pub fn owner_of(&self, topic: &str, queue: u32) -> usize {
        shard_of(topic, queue, self.shards)
    }

    /// A queue of `topic` owned by this shard, rotating, so a producer that lets the broker
    /// choose never pays a cross-core hop. Falls back to any queue (of a cluster topic: of this
    /// broker's group) when this shard owns none.
    pub fn pick_local_queue(&self, topic: &str, queues: u32) -> u32 {
        let start = self.next_queue.get();
        self.next_queue.set(start.wrapping_add(1));
        // A cluster topic: only the queues of this broker's group.
        let view = self.cluster_routes();
        let ours = |q: u32| view.as_ref().map_or(true, |v| v.served_here(topic, q));
        for i in 0..queues {
            let q = start.wrapping_add(i) % queues;
            if self.owner_of(topic, q) == self.shard && ours(q) {
                self.next_queue.set(q.wrapping_add(1));
                return q;
            }
        }
        // No queue on this shard: one of the group's (the produce is forwarded to its shard).
        (0..queues)
            .map(|i| start.wrapping_add(i) % queues)
            .find(|&q| ours(q))
            .unwrap_or(start % queues)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Resolves when shutdown has been requested.
    pub async fn shutdown_requested(&self) {
        while !self.is_shutting_down() {
            glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
        }
    }

    pub fn connection_opened(&self) {
        self.connections.set(self.connections.get() + 1);
    }

    pub fn connection_closed(&self) {
        self.connections.set(self.connections.get() - 1);
    }

    pub fn open_connections(&self) -> usize {
        self.connections.get()
    }
}
