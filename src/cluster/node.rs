//! One broker of a broker group on etcd: the control thread that decides what the embedded
//! broker is (master, slave of whom, or not running yet), from the group's keys in etcd.
//!
//! - **Session**: a lease granted at start, renewed by a keep-alive thread every quarter TTL.
//!   Every renewal etcd confirmed moves the shards' [`Lease`] to the time it was *sent* plus
//!   [`ACK_WINDOW`] of the TTL, while this broker acts as master. etcd expires the lease no
//!   earlier than it received that renewal plus the whole TTL, so this master stops acking a
//!   quarter TTL before another broker can be elected (the margin covers a clock-rate
//!   difference of up to 25 % between the hosts and an ack on its way out).
//! - **Election**: with no `master` key, a member that may take over (the last master, one
//!   the master listed in `in_sync`, any member of a group that never had a master, or any
//!   member when `allow_unclean_election`) creates it under its lease; the one with the
//!   longest log goes first (the others wait [`RANK_DELAY`] per member ahead of them). The
//!   key's create revision becomes the term of the winner's new epoch
//!   ([`Lease::set_term`]), which starts at its log end: nothing it had is truncated.
//! - **Following**: a member that sees another's `master` key runs its broker as that
//!   master's slave (restarting it when the master changes); the slave's handshake truncates
//!   a diverged tail — under SYNC_MASTER only bytes that were never acked.
//! - **Stepping down**: a master whose key is gone or held by another, or whose lease etcd
//!   says is gone, revokes its [`Lease`] at once (no more acks), stops its broker and starts
//!   over with a new session: it rejoins as a slave of the new master.
//! - **In sync**: the master writes `in_sync` (guarded by its key) with the slaves whose
//!   records say they stream from it, while its own stats show every shard's replica within
//!   `in_sync_lag_bytes` and `in_sync_max_ms`; when that set changes, and every
//!   [`IN_SYNC_REFRESH`] otherwise.
//!
//! - **Watching**: a thread of its own keeps a watch open on the `master` key; while it is
//!   open and a master holds the key, the control thread reads the key once a second instead
//!   of every tick, and at once when the watch says it changed (a master gone is seen as
//!   soon as etcd deletes its key). Without a watch, or with no master, it reads every tick.
//!
//! The control thread never runs on a shard executor; it talks to its own broker like any
//! client (over loopback) and to etcd with the blocking [`Etcd`] client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::Admin;
use crate::cluster::etcd::{Etcd, EtcdError, KeyValue};
use crate::cluster::records::{
    master_route_key, unix_ms, GroupKeys, InSyncRecord, MasterRecord, MasterRoute, MemberRecord,
};
use crate::cluster::routes::RouteFollower;
use crate::cluster::watcher::Watcher;
use crate::config::Config;
use crate::protocol::{ReplicaStats, ShardStats};
use crate::replication::lease::{Lease, LeaseState};
use crate::replication::{ReplicationMode, Role};
use crate::server::{Broker, GroupHooks};

/// Of the lease TTL, how long after a renewal was sent a master may still ack.
pub const ACK_WINDOW: f64 = 0.75;
/// How often the control thread looks at the group's keys.
const TICK: Duration = Duration::from_millis(100);
/// How often it reads the master key while a watch on it is open and a master holds it: the
/// watch says at once when the key changes; the read is the check behind it.
pub const WATCHED_READ_INTERVAL: Duration = Duration::from_secs(1);
/// How often a member looks at its record (and a master at the in-sync set), and rewrites it
/// while the group has no master.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(500);
/// A member's record whose standing did not change is rewritten at most this rarely (for its
/// log end and lag); see [`member_refresh`].
pub const MEMBER_REFRESH_MAX: Duration = Duration::from_secs(5);
/// The in-sync set is rewritten when it changes, and at least this often (for `admin cluster`'s
/// "updated ... ago"; the set itself is only news when it changes).
pub const IN_SYNC_REFRESH: Duration = Duration::from_secs(10);
/// A candidate waits this long for each eligible member with a longer log.
const RANK_DELAY: Duration = Duration::from_millis(500);

/// `ringmq broker --cluster ...`: where etcd is and who this broker is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Name of the cluster (a key prefix: several clusters can share one etcd).
    pub cluster: String,
    /// The broker group this broker belongs to (a master and its slaves).
    pub group: String,
    /// This broker's name in the group, unique in it.
    pub node: String,
    /// TTL of the session lease (whole seconds at etcd; at least 2 with etcd's defaults).
    pub lease_ttl: Duration,
    /// A slave further behind than this is not in sync (may not take over).
    pub in_sync_lag_bytes: u64,
    /// A slave whose lag is older than this is not in sync.
    pub in_sync_max_ms: u64,
    /// Let an out-of-sync member take over when no in-sync one does (may lose acked
    /// messages under ASYNC_MASTER).
    pub allow_unclean_election: bool,
}

impl ClusterConfig {
    /// Every problem of these settings, empty when they are valid.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.endpoints.is_empty() {
            p.push("--cluster needs at least one etcd endpoint: etcd=HOST:PORT[,...]".into());
        }
        for (what, v) in [
            ("--cluster-name", &self.cluster),
            ("--group", &self.group),
            ("--node", &self.node),
        ] {
            if v.is_empty() || v.contains('/') || v.chars().any(char::is_whitespace) {
                p.push(format!(
                    "{what} {v:?} must be a non-empty name without '/' or spaces"
                ));
            }
        }
        if self.lease_ttl < Duration::from_secs(1) {
            p.push("--lease-ttl-secs must be at least 1".into());
        }
        p
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster settings: {0}")]
    Config(String),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("broker: {0}")]
    Broker(String),
}

/// Runs this broker in its group until SIGINT or SIGTERM.
pub fn run_until_signalled(config: Config, cluster: ClusterConfig) -> Result<(), ClusterError> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())
            .map_err(|e| ClusterError::Broker(format!("cannot install the signal handler: {e}")))?;
    }
    let mut node = Node::new(config, cluster, shutdown)?;
    let outcome = node.run();
    node.leave();
    outcome
}

/// Who may take over, by the in-sync set the last master published: that master and the
/// members it listed. `None`: anyone (a group that never had a master has no set).
pub fn eligible_members(in_sync: Option<&InSyncRecord>) -> Option<Vec<String>> {
    in_sync.map(|r| {
        let mut v = r.nodes.clone();
        v.push(r.master.clone());
        v
    })
}

/// How often a member rewrites a record whose standing did not change: under half the lease
/// TTL (and at most [`MEMBER_REFRESH_MAX`]). Why under the TTL: a master's key vanishes at
/// least one TTL after its last renewal, so by the time a slave sees no master, every live
/// member's record was rewritten after the master stopped feeding their logs, and the
/// election ranks by final log ends, not by ones from before the master died.
pub fn member_refresh(lease_ttl: Duration) -> Duration {
    (lease_ttl / 2).clamp(PUBLISH_INTERVAL, MEMBER_REFRESH_MAX)
}

/// Whether a member rewrites its record now: never written, its standing changed, the group
/// has no master (candidates rank by log end), or the last write is `refresh` old.
pub fn member_record_due(
    last: Option<(&MemberRecord, Instant)>,
    next: &MemberRecord,
    masterless: bool,
    refresh: Duration,
) -> bool {
    let Some((last, at)) = last else {
        return true;
    };
    masterless || !last.same_standing(next) || at.elapsed() >= refresh
}

/// How many eligible members go before `me` (log end `mine`): those with a longer log, and
/// on a tie those with a smaller name, so two candidates never wait the same time.
pub fn members_ahead(
    me: &str,
    mine: u64,
    members: &[MemberRecord],
    eligible: Option<&[String]>,
) -> usize {
    members
        .iter()
        .filter(|m| m.node != me)
        .filter(|m| eligible.map_or(true, |v| v.contains(&m.node)))
        .filter(|m| m.log_end > mine || (m.log_end == mine && m.node.as_str() < me))
        .count()
}

/// The lease renewals of one session, on their own thread.
struct Session {
    id: u64,
    shared: Arc<SessionShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SessionShared {
    stop: AtomicBool,
    /// etcd said the lease is gone.
    lost: AtomicBool,
    /// While set, every confirmed renewal extends the shards' lease.
    acting_master: AtomicBool,
    /// When the last renewal etcd confirmed (or the grant) was sent.
    renewed_sent: Mutex<Instant>,
    lease: Arc<Lease>,
    window: Duration,
}

impl SessionShared {
    fn extend_from_last_renewal(&self) {
        let sent = *self.renewed_sent.lock().expect("renewal lock");
        self.lease.extend_to(sent + self.window);
    }
}

impl Session {
    fn start(etcd: &Arc<Etcd>, ttl: Duration, lease: Arc<Lease>) -> Result<Session, EtcdError> {
        let sent = Instant::now();
        let id = etcd.grant_lease(ttl.as_secs().max(1))?;
        let shared = Arc::new(SessionShared {
            stop: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            acting_master: AtomicBool::new(false),
            renewed_sent: Mutex::new(sent),
            lease,
            window: ttl.mul_f64(ACK_WINDOW),
        });
        let thread = {
            let (etcd, shared) = (etcd.clone(), shared.clone());
            std::thread::Builder::new()
                .name("ringmq-lease".into())
                .spawn(move || keep_alive_loop(&etcd, id, ttl, &shared))
                .map_err(|e| EtcdError::Protocol {
                    endpoint: "-".into(),
                    detail: format!("cannot start the lease thread: {e}"),
                })?
        };
        Ok(Session {
            id,
            shared,
            thread: Some(thread),
        })
    }

    fn lost(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire)
    }

    fn act_as_master(&self, on: bool) {
        self.shared.acting_master.store(on, Ordering::Release);
        if on {
            self.shared.extend_from_last_renewal();
        } else {
            self.shared.lease.revoke();
        }
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The read rule behind a [`Watcher`]: read the master key when the watch saw a change (or
/// just opened), when no watch is open, when no master holds the key, and otherwise once per
/// [`WATCHED_READ_INTERVAL`] since `last_read`. Takes the watch's change flag.
pub fn master_key_due(watch: &Watcher, masterless: bool, last_read: Option<Instant>) -> bool {
    let changed = watch.take_changed();
    changed
        || !watch.live()
        || masterless
        || last_read.map_or(true, |t| t.elapsed() >= WATCHED_READ_INTERVAL)
}

fn keep_alive_loop(etcd: &Etcd, id: u64, ttl: Duration, shared: &SessionShared) {
    let every = ttl / 4;
    let mut failing_since: Option<Instant> = None;
    while !shared.stop.load(Ordering::Acquire) {
        let sent = Instant::now();
        match etcd.keep_alive(id) {
            Ok(Some(_)) => {
                shared.lease.set_etcd_answering(true);
                *shared.renewed_sent.lock().expect("renewal lock") = sent;
                if shared.acting_master.load(Ordering::Acquire) {
                    shared.lease.extend_to(sent + shared.window);
                }
                if let Some(since) = failing_since.take() {
                    log::info!(
                        "cluster: lease {id:x} renewed again after {:?}",
                        since.elapsed()
                    );
                }
            }
            Ok(None) => {
                log::error!("cluster: etcd says lease {id:x} is gone");
                shared.lease.revoke();
                shared.lost.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                shared.lease.set_etcd_answering(false);
                if failing_since.is_none() {
                    log::warn!("cluster: cannot renew lease {id:x}: {e}");
                    failing_since = Some(sent);
                }
            }
        }
        let next = sent + every;
        while !shared.stop.load(Ordering::Acquire) && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(20).min(every));
        }
    }
}

/// What the embedded broker is now.
struct Running {
    broker: Broker,
    stop: Arc<AtomicBool>,
    role: Role,
    /// A slave: the master it follows.
    following: Option<String>,
}

struct Node {
    base: Config,
    cluster: ClusterConfig,
    keys: GroupKeys,
    etcd: Arc<Etcd>,
    shutdown: Arc<AtomicBool>,
    lease: Arc<Lease>,
    session: Session,
    /// Shard 0's advertised address.
    addr: String,
    running: Option<Running>,
    /// The create revision of the election key while we hold it.
    term: Option<u64>,
    /// Since when no master key was seen (for the rank delay).
    masterless_since: Option<Instant>,
    last_publish: Option<Instant>,
    admin: Option<Admin>,
    /// SYNC_MASTER acking alone, a slave back: each shard's log end when acks began to wait
    /// for it again; it joins the in-sync set once it holds that much.
    rejoin_at: Option<Vec<u64>>,
    /// Our lease as master lapsed (said once, see [`Node::note_lapse`]).
    lapsed: bool,
    watch: Watcher,
    /// The in-sync set last written (its term and nodes) and when.
    in_sync_written: Option<(u64, Vec<String>, Instant)>,
    /// Our member record as last written, and when.
    member_written: Option<(MemberRecord, Instant)>,
    /// When the master key was last read, and whether the next tick must read it again (an
    /// error cut the last look short).
    last_read: Option<Instant>,
    read_again: bool,
    /// The cluster's routes, followed in etcd and read by the broker's shards.
    routes: RouteFollower,
    /// As master: the term whose master route (our shard addresses) is in etcd, and the term
    /// and routes version whose cluster topics our broker has.
    route_written: Option<u64>,
    topics_made: Option<(u64, u64)>,
}

impl Node {
    fn new(
        config: Config,
        cluster: ClusterConfig,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Node, ClusterError> {
        let problems = cluster.problems();
        if !problems.is_empty() {
            return Err(ClusterError::Config(problems.join("; ")));
        }
        if config.server.port == 0 {
            return Err(ClusterError::Config(
                "a broker in a cluster needs a fixed --port: the others reach it there".into(),
            ));
        }
        let addr = format!("{}:{}", config.server.advertised_host(), config.server.port);
        // Every call well inside a quarter TTL, so a hung endpoint cannot make a renewal late.
        let timeout = (cluster.lease_ttl / 5).max(Duration::from_millis(200));
        let etcd = Arc::new(Etcd::new(&cluster.endpoints, timeout)?);
        let lease = Arc::new(Lease::new());
        let session = Session::start(&etcd, cluster.lease_ttl, lease.clone())?;
        log::info!(
            "cluster {}: group {} node {} at {addr}; etcd {}; lease {:x} (TTL {:?})",
            cluster.cluster,
            cluster.group,
            cluster.node,
            cluster.endpoints.join(","),
            session.id,
            cluster.lease_ttl
        );
        let keys = GroupKeys::new(&cluster.cluster, &cluster.group);
        let watch = Watcher::start(etcd.clone(), keys.master())
            .map_err(|e| ClusterError::Config(format!("cannot start the watch thread: {e}")))?;
        let routes = RouteFollower::start(etcd.clone(), &cluster.cluster, &cluster.group)
            .map_err(|e| ClusterError::Config(format!("cannot start the watch thread: {e}")))?;
        Ok(Node {
            keys,
            base: config,
            cluster,
            etcd,
            shutdown,
            lease,
            session,
            addr,
            running: None,
            term: None,
            masterless_since: None,
            last_publish: None,
            admin: None,
            rejoin_at: None,
            lapsed: false,
            watch,
            in_sync_written: None,
            member_written: None,
            last_read: None,
            read_again: false,
            routes,
            route_written: None,
            topics_made: None,
        })
    }

    fn run(&mut self) -> Result<(), ClusterError> {
        while !self.shutdown.load(Ordering::Acquire) {
            if self.session.lost() {
                self.step_down("etcd says our lease is gone")?;
            }
            self.note_lapse();
            if self.master_key_due() {
                self.last_read = Some(Instant::now());
                self.read_again = true;
                match self.etcd.get(&self.keys.master()) {
                    // etcd trouble (a campaign or a promotion cut short) is tried again next
                    // tick; a broker that cannot start is not.
                    Ok(master) => match self.on_master_key(master) {
                        Err(ClusterError::Etcd(e)) => log::warn!("cluster: {e}; trying again"),
                        other => {
                            other?;
                            self.read_again = false;
                        }
                    },
                    Err(e) => log::debug!("cluster: reading the master key: {e}"),
                }
            }
            if self
                .last_publish
                .map_or(true, |t| t.elapsed() >= PUBLISH_INTERVAL)
            {
                self.publish();
                self.last_publish = Some(Instant::now());
            }
            self.routes.tick(&self.etcd);
            self.serve_routes();
            std::thread::sleep(TICK);
        }
        Ok(())
    }

    /// Whether this tick reads the master key: always without an open watch, with no master
    /// (the election's timing counts ticks), after an error, and when the watch saw a change;
    /// otherwise once per [`WATCHED_READ_INTERVAL`].
    fn master_key_due(&mut self) -> bool {
        self.read_again
            || master_key_due(&self.watch, self.masterless_since.is_some(), self.last_read)
    }

    /// Says once when our lease as master lapsed (etcd unreachable or without a quorum: no
    /// election can happen, but we cannot tell that from being cut off alone) and what that
    /// means for acks, and once when it holds again.
    fn note_lapse(&mut self) {
        let lapsed = self.term.is_some() && self.lease.state() == LeaseState::Lapsed;
        if lapsed == self.lapsed {
            return;
        }
        self.lapsed = lapsed;
        if !lapsed {
            log::info!("cluster: our lease holds again; acking as before");
        } else if self.base.replication.mode == ReplicationMode::SyncMaster && !self.lease.solo() {
            log::warn!(
                "cluster: our lease was not renewed in time (etcd unreachable or without a \
                 quorum): staying master; acks go on only as the in-sync slave confirms them"
            );
        } else {
            log::warn!(
                "cluster: our lease was not renewed in time (etcd unreachable or without a \
                 quorum): staying master, but acking nothing until etcd answers (no slave's \
                 confirmation fences our acks)"
            );
        }
    }

    fn on_master_key(&mut self, master: Option<KeyValue>) -> Result<(), ClusterError> {
        let Some(kv) = master else {
            if self.term.is_some() {
                return self.step_down("our election key is gone (lease expired at etcd)");
            }
            let since = *self.masterless_since.get_or_insert_with(Instant::now);
            if let Some(wait) = self.campaign_delay()? {
                if since.elapsed() >= wait {
                    self.campaign()?;
                }
            }
            return Ok(());
        };
        self.masterless_since = None;
        if kv.lease == self.session.id {
            // Ours (a campaign that won, or a restart of the loop after one).
            if self.term.is_none() {
                self.become_master(kv.create_revision)?;
            }
            return Ok(());
        }
        if self.term.is_some() {
            return self.step_down("another broker holds the election key");
        }
        let record: MasterRecord = match serde_json::from_slice(&kv.value) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("cluster: the master key holds no master record ({e}); ignoring it");
                return Ok(());
            }
        };
        if record.node == self.cluster.node {
            // A previous run of ours: its lease expires soon, then we may campaign.
            return Ok(());
        }
        let following = self.running.as_ref().and_then(|r| r.following.clone());
        if following.as_deref() != Some(record.addr.as_str()) {
            log::info!(
                "cluster: the master of group {} is {} at {}; following it",
                self.cluster.group,
                record.node,
                record.addr
            );
            self.stop_broker();
            self.start_broker(Role::Slave, Some(record.addr))?;
        }
        Ok(())
    }

    /// `Some(wait)` when this member may take over (after `wait`), `None` when it may not.
    fn campaign_delay(&mut self) -> Result<Option<Duration>, ClusterError> {
        let in_sync = match self.etcd.get(&self.keys.in_sync()) {
            Ok(Some(kv)) => serde_json::from_slice::<InSyncRecord>(&kv.value).ok(),
            Ok(None) => None,
            Err(e) => {
                log::debug!("cluster: reading the in-sync set: {e}");
                return Ok(None);
            }
        };
        let me = self.cluster.node.clone();
        let eligible = eligible_members(in_sync.as_ref());
        let allowed = match &eligible {
            None => true,
            Some(v) => v.contains(&me) || self.cluster.allow_unclean_election,
        };
        if !allowed {
            log::debug!("cluster: not in the in-sync set {eligible:?}; not campaigning");
            return Ok(None);
        }
        let members: Vec<MemberRecord> = self
            .etcd
            .get_prefix(&self.keys.members())
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        let mine = self.log_end();
        let ahead = members_ahead(&me, mine, &members, eligible.as_deref());
        Ok(Some(RANK_DELAY * ahead as u32))
    }

    fn campaign(&mut self) -> Result<(), ClusterError> {
        let record = MasterRecord {
            node: self.cluster.node.clone(),
            addr: self.addr.clone(),
        };
        let value = serde_json::to_vec(&record).expect("a record serializes");
        match self
            .etcd
            .create_if_absent(&self.keys.master(), &value, Some(self.session.id))?
        {
            Ok(kv) => self.become_master(kv.create_revision),
            // Lost the race: the next tick follows the winner.
            Err(_) => Ok(()),
        }
    }

    fn become_master(&mut self, term: u64) -> Result<(), ClusterError> {
        self.lease.set_term(term);
        self.term = Some(term);
        self.session.act_as_master(true);
        match self.running.as_ref().map(|r| r.role) {
            Some(Role::Slave) => {
                let promoted = self
                    .admin()
                    .and_then(|a| a.promote().map_err(|e| e.to_string()));
                let epoch = match promoted {
                    Ok(epoch) => epoch,
                    Err(e) => {
                        // Hand the election back rather than hold it with a broker that
                        // cannot serve as master; the next tick starts over.
                        log::error!("cluster: elected but cannot promote the broker: {e}");
                        let _ = self.etcd.delete_if_created_at(&self.keys.master(), term);
                        return self.step_down("the promotion failed");
                    }
                };
                if let Some(r) = self.running.as_mut() {
                    r.role = Role::Master;
                    r.following = None;
                }
                log::info!(
                    "cluster: elected master of group {} (term {term}); promoted, epoch {}",
                    self.cluster.group,
                    crate::replication::epoch::describe(epoch)
                );
            }
            Some(Role::Master) => {}
            None => {
                self.start_broker(Role::Master, None)?;
                log::info!(
                    "cluster: elected master of group {} (term {term})",
                    self.cluster.group
                );
            }
        }
        eprintln!(
            "cluster: master of group {} term {term}",
            self.cluster.group
        );
        self.publish();
        Ok(())
    }

    fn step_down(&mut self, why: &str) -> Result<(), ClusterError> {
        log::warn!("cluster: stepping down: {why}");
        self.session.act_as_master(false);
        self.lease.set_solo(false);
        self.rejoin_at = None;
        self.lease.set_term(0);
        self.term = None;
        self.stop_broker();
        self.session.stop();
        // A new session, however long etcd takes to answer (nothing runs meanwhile).
        loop {
            match Session::start(&self.etcd, self.cluster.lease_ttl, self.lease.clone()) {
                Ok(session) => {
                    self.session = session;
                    // Our record went with the old lease: write it again at the next look.
                    self.member_written = None;
                    break;
                }
                Err(e) if !self.shutdown.load(Ordering::Acquire) => {
                    log::warn!("cluster: cannot start a new session: {e}; trying again");
                    std::thread::sleep(self.cluster.lease_ttl / 4);
                }
                Err(e) => return Err(e.into()),
            }
        }
        log::info!("cluster: new session, lease {:x}", self.session.id);
        Ok(())
    }

    fn start_broker(&mut self, role: Role, master: Option<String>) -> Result<(), ClusterError> {
        let mut config = self.base.clone();
        config.replication.role = role;
        config.replication.master = master.clone();
        config.replication.peer = None;
        // The lease fences this master, not a peer check; the group's members follow.
        config.replication.force_master = true;
        config.replication.followers_from_any_host = true;
        let stop = Arc::new(AtomicBool::new(false));
        let hooks = GroupHooks {
            lease: self.lease.clone(),
            routes: self.routes.routes(),
        };
        let broker = Broker::start_in_group(config, stop.clone(), Some(hooks))
            .map_err(|e| ClusterError::Broker(e.to_string()))?;
        for (i, a) in broker.addresses().iter().enumerate() {
            eprintln!("shard {i} listening on {a}");
        }
        eprintln!(
            "cluster: broker started as {role:?}{}",
            master
                .as_deref()
                .map_or(String::new(), |m| format!(" of {m}"))
        );
        self.running = Some(Running {
            broker,
            stop,
            role,
            following: master,
        });
        self.admin = None;
        self.publish();
        Ok(())
    }

    /// As master, serving: first makes sure our broker has every cluster topic our group
    /// serves (a new master of an old group has them from its log; a topic created in etcd
    /// since is created here), then says in etcd where we serve (once per term, guarded by
    /// our election key and bound to our lease, so it goes when we do). In that order: a
    /// client routed here finds the topic.
    fn serve_routes(&mut self) {
        let Some(term) = self.term else {
            return;
        };
        if self.running.as_ref().map(|r| r.role) != Some(Role::Master) {
            return;
        }
        let (version, view) = self.routes.routes().current();
        if self.topics_made != Some((term, version)) {
            let wanted: Vec<(String, u32)> = view
                .topics
                .iter()
                .filter(|(_, p)| p.groups.contains(&self.cluster.group))
                .map(|(t, p)| (t.clone(), p.queues))
                .collect();
            match self.make_topics(&wanted) {
                Ok(()) => self.topics_made = Some((term, version)),
                Err(e) => {
                    log::warn!("cluster: creating the group's cluster topics: {e}; trying again");
                    self.admin = None;
                    return;
                }
            }
        }
        if self.route_written == Some(term) {
            return;
        }
        let Some(running) = self.running.as_ref() else {
            return;
        };
        let host = self.base.server.advertised_host().to_string();
        let record = MasterRoute {
            node: self.cluster.node.clone(),
            shards: running
                .broker
                .addresses()
                .iter()
                .map(|a| format!("{host}:{}", a.port()))
                .collect(),
            term,
        };
        let value = serde_json::to_vec(&record).expect("a record serializes");
        let key = master_route_key(&self.cluster.cluster, &self.cluster.group);
        match self.etcd.put_if_guard(
            &self.keys.master(),
            term,
            &key,
            &value,
            Some(self.session.id),
        ) {
            Ok(true) => {
                log::info!(
                    "cluster: routes say group {} is served at {:?}",
                    self.cluster.group,
                    record.shards
                );
                self.route_written = Some(term);
            }
            // Our election key is gone: the next look at it steps down.
            Ok(false) => {
                log::debug!("cluster: not writing our master route: the election key moved")
            }
            Err(e) => log::debug!("cluster: writing our master route: {e}; trying again"),
        }
    }

    /// Creates each of `wanted` (name, queues) our broker lacks.
    fn make_topics(&mut self, wanted: &[(String, u32)]) -> Result<(), String> {
        if wanted.is_empty() {
            return Ok(());
        }
        let admin = self.admin()?;
        let have = admin.list_topics().map_err(|e| e.to_string())?;
        for (name, queues) in wanted {
            match have.iter().find(|t| &t.name == name) {
                Some(t) if t.queues != *queues => log::warn!(
                    "cluster: topic {name} has {} queue(s) here, {queues} in etcd; routing by etcd",
                    t.queues
                ),
                Some(_) => {}
                None => {
                    admin
                        .create_topic(name, *queues)
                        .map_err(|e| format!("topic {name}: {e}"))?;
                    log::info!("cluster: created cluster topic {name} ({queues} queue(s))");
                }
            }
        }
        Ok(())
    }

    fn stop_broker(&mut self) {
        self.admin = None;
        if let Some(r) = self.running.take() {
            r.stop.store(true, Ordering::Release);
            if let Err(e) = r.broker.wait() {
                log::warn!("cluster: the broker stopped with an error: {e}");
            }
        }
    }

    fn admin(&mut self) -> Result<&Admin, String> {
        if self.admin.is_none() {
            self.admin = Some(Admin::connect(&self.addr).map_err(|e| e.to_string())?);
        }
        Ok(self.admin.as_ref().expect("set above"))
    }

    fn stats(&mut self) -> Option<Vec<crate::protocol::ShardStats>> {
        self.running.as_ref()?;
        match self
            .admin()
            .and_then(|a| a.broker_stats().map_err(|e| e.to_string()))
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::debug!("cluster: own broker stats: {e}");
                self.admin = None;
                None
            }
        }
    }

    fn log_end(&mut self) -> u64 {
        self.stats()
            .map_or(0, |s| s.iter().map(|s| s.written).sum::<u64>())
    }

    /// Rewrites our member record when [`member_record_due`] says so, and as master the
    /// in-sync set when it changed.
    fn publish(&mut self) {
        let stats = self.stats();
        let shards = stats.as_deref().unwrap_or(&[]);
        let role = match self.running.as_ref().map(|r| r.role) {
            None => "waiting",
            Some(Role::Master) if self.term.is_some() => "master",
            Some(Role::Master) => "fenced",
            Some(Role::Slave) => "slave",
        };
        let record = MemberRecord {
            node: self.cluster.node.clone(),
            addr: self.addr.clone(),
            role: role.to_string(),
            epoch: shards.first().map_or(0, |s| s.replication.epoch),
            log_end: shards.iter().map(|s| s.written).sum(),
            following: self.running.as_ref().and_then(|r| r.following.clone()),
            streaming: !shards.is_empty()
                && shards
                    .iter()
                    .all(|s| s.replication.link == ReplicaStats::LINK_STREAMING),
            lag_bytes: shards
                .iter()
                .map(|s| s.replication.lag_bytes)
                .max()
                .unwrap_or(0),
            lag_ms: shards
                .iter()
                .map(|s| s.replication.lag_ms)
                .max()
                .unwrap_or(0),
            updated_unix_ms: unix_ms(),
        };
        let due = member_record_due(
            self.member_written.as_ref().map(|(r, at)| (r, *at)),
            &record,
            self.masterless_since.is_some(),
            member_refresh(self.cluster.lease_ttl),
        );
        if due {
            let value = serde_json::to_vec(&record).expect("a record serializes");
            match self.etcd.put(
                &self.keys.member(&self.cluster.node),
                &value,
                Some(self.session.id),
            ) {
                Ok(_) => self.member_written = Some((record.clone(), Instant::now())),
                Err(e) => log::debug!("cluster: publishing our member record: {e}"),
            }
        }
        if let Some(term) = self.term {
            let shards = shards.to_vec();
            self.publish_in_sync(term, &record, &shards);
        }
    }

    /// Writes the in-sync set. Under SYNC_MASTER the order of two steps keeps every ack on
    /// every member that may be elected: a slave leaves the set in etcd *before* acks stop
    /// waiting for it ([`Lease::set_solo`]), and acks wait for the slave again *before* it
    /// is put back, once it holds everything appended when they started to wait.
    fn publish_in_sync(&mut self, term: u64, me: &MemberRecord, shards: &[ShardStats]) {
        let sync_master = self.base.replication.mode == ReplicationMode::SyncMaster;
        let caught_up = me.streaming
            && me.lag_bytes <= self.cluster.in_sync_lag_bytes
            && me.lag_ms <= self.cluster.in_sync_max_ms;
        let members = if caught_up {
            // An unanswered read is no news: publishing "no slave" from it would make a
            // SYNC_MASTER ack alone while its slave is fine.
            match self.etcd.get_prefix(&self.keys.members()) {
                Ok(members) => members,
                Err(e) => {
                    log::debug!("cluster: reading the members: {e}");
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let mut nodes: Vec<String> = if caught_up {
            members
                .iter()
                .filter_map(|kv| serde_json::from_slice::<MemberRecord>(&kv.value).ok())
                .filter(|m| {
                    m.node != me.node
                        && m.role == "slave"
                        && m.streaming
                        && m.following.as_deref() == Some(self.addr.as_str())
                })
                .map(|m| m.node)
                .collect()
        } else {
            Vec::new()
        };
        if sync_master && self.lease.solo() && !nodes.is_empty() {
            // Acking alone: first make acks wait for the slave again, then let it in once it
            // has everything up to where the log ends now.
            match &self.rejoin_at {
                None => {
                    self.lease.set_solo(false);
                    self.rejoin_at = Some(shards.iter().map(|s| s.written).collect());
                    log::info!("cluster: a slave is back; acks wait for it again");
                    nodes.clear();
                }
                Some(ends) => {
                    let has_all = ends.len() == shards.len()
                        && shards
                            .iter()
                            .zip(ends)
                            .all(|(s, end)| s.replication.peer_durable >= *end);
                    if !has_all {
                        nodes.clear();
                    }
                }
            }
        }
        let record = InSyncRecord {
            master: me.node.clone(),
            term,
            nodes,
            updated_unix_ms: unix_ms(),
        };
        // Unchanged and fresh enough: what etcd holds is still true, so no raft write (the
        // same state updates follow as after a write).
        let unchanged = self.in_sync_written.as_ref().is_some_and(|(t, n, at)| {
            *t == term && *n == record.nodes && at.elapsed() < IN_SYNC_REFRESH
        });
        let written = if unchanged {
            Ok(true)
        } else {
            let value = serde_json::to_vec(&record).expect("a record serializes");
            self.etcd.put_if_guard(
                &self.keys.master(),
                term,
                &self.keys.in_sync(),
                &value,
                None,
            )
        };
        match written {
            Ok(true) => {
                if !unchanged {
                    self.in_sync_written = Some((term, record.nodes.clone(), Instant::now()));
                }
                if record.nodes.is_empty() {
                    if sync_master && self.rejoin_at.is_none() && !self.lease.solo() {
                        log::warn!(
                            "cluster: no slave is in sync; SYNC_MASTER acks go without one \
                             (durability disk) until one is back"
                        );
                        self.lease.set_solo(true);
                    }
                } else {
                    if self.rejoin_at.take().is_some() {
                        log::info!("cluster: in sync again: {:?}", record.nodes);
                    }
                    self.lease.set_solo(false);
                }
            }
            Ok(false) => {
                self.in_sync_written = None;
                log::warn!("cluster: in-sync set not written: our election key is gone")
            }
            Err(e) => {
                self.in_sync_written = None;
                log::debug!("cluster: writing the in-sync set: {e}")
            }
        }
    }

    /// At shutdown: stop acking, stop the broker, hand the election over at once (an
    /// in-sync slave takes over without waiting for the lease to expire), end the session.
    fn leave(&mut self) {
        self.session.act_as_master(false);
        self.stop_broker();
        if let Some(term) = self.term.take() {
            match self.etcd.delete_if_created_at(&self.keys.master(), term) {
                Ok(_) => log::info!(
                    "cluster: resigned as master of group {}",
                    self.cluster.group
                ),
                Err(e) => log::warn!("cluster: cannot resign (the lease will expire): {e}"),
            }
        }
        self.session.stop();
        if let Err(e) = self.etcd.revoke_lease(self.session.id) {
            log::debug!("cluster: revoking our lease: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str, log_end: u64) -> MemberRecord {
        MemberRecord {
            node: node.into(),
            addr: format!("127.0.0.1:{log_end}"),
            role: "slave".into(),
            epoch: 0,
            log_end,
            following: None,
            streaming: true,
            lag_bytes: 0,
            lag_ms: 0,
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn only_the_last_master_and_its_in_sync_slaves_may_take_over() {
        assert_eq!(eligible_members(None), None, "a new group: anyone");
        let record = InSyncRecord {
            master: "a".into(),
            term: 7,
            nodes: vec!["b".into()],
            updated_unix_ms: 0,
        };
        let v = eligible_members(Some(&record)).unwrap();
        assert!(v.contains(&"a".to_string()) && v.contains(&"b".to_string()));
        assert!(!v.contains(&"c".to_string()), "c was not in sync");
        let alone = InSyncRecord {
            nodes: Vec::new(),
            ..record
        };
        assert_eq!(
            eligible_members(Some(&alone)).unwrap(),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn the_longest_log_goes_first_and_ties_go_by_name() {
        let members = [member("a", 100), member("b", 300), member("c", 300)];
        let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(members_ahead("b", 300, &members, Some(&all)), 0);
        assert_eq!(
            members_ahead("c", 300, &members, Some(&all)),
            1,
            "b wins the tie"
        );
        assert_eq!(members_ahead("a", 100, &members, Some(&all)), 2);
        // A longer log that may not take over does not delay anyone.
        let not_c: Vec<String> = vec!["a".into(), "b".into()];
        assert_eq!(members_ahead("a", 100, &members, Some(&not_c)), 1);
        assert_eq!(members_ahead("a", 100, &members, None), 2);
    }

    #[test]
    fn a_member_record_is_rewritten_on_a_change_of_standing_while_masterless_or_when_old() {
        let refresh = Duration::from_secs(5);
        let written = member("b", 100);
        let now = Instant::now();
        assert!(
            member_record_due(None, &written, false, refresh),
            "never written"
        );
        // Only the log end and lag moved: no write until the refresh.
        let grown = MemberRecord {
            log_end: 900,
            lag_bytes: 5,
            lag_ms: 1,
            updated_unix_ms: 42,
            ..written.clone()
        };
        assert!(!member_record_due(
            Some((&written, now)),
            &grown,
            false,
            refresh
        ));
        let old = now - Duration::from_secs(6);
        assert!(member_record_due(
            Some((&written, old)),
            &grown,
            false,
            refresh
        ));
        // What the others decide on: at once.
        for changed in [
            MemberRecord {
                role: "master".into(),
                ..written.clone()
            },
            MemberRecord {
                epoch: 9,
                ..written.clone()
            },
            MemberRecord {
                streaming: false,
                ..written.clone()
            },
            MemberRecord {
                following: Some("127.0.0.1:1".into()),
                ..written.clone()
            },
        ] {
            assert!(member_record_due(
                Some((&written, now)),
                &changed,
                false,
                refresh
            ));
        }
        // No master: candidates rank by log end, so it is always fresh.
        assert!(member_record_due(
            Some((&written, now)),
            &grown,
            true,
            refresh
        ));
    }

    #[test]
    fn a_record_is_always_refreshed_within_half_a_lease_ttl() {
        for ttl in [1, 2, 3, 10, 60] {
            let ttl = Duration::from_secs(ttl);
            let r = member_refresh(ttl);
            assert!(r <= (ttl / 2).max(PUBLISH_INTERVAL), "{ttl:?}: {r:?}");
            assert!(
                r < ttl,
                "{ttl:?}: {r:?}: the election would rank stale log ends"
            );
            assert!(r >= PUBLISH_INTERVAL && r <= MEMBER_REFRESH_MAX);
        }
        assert_eq!(
            member_refresh(Duration::from_secs(3)),
            Duration::from_millis(1500)
        );
    }
}
