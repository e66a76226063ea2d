//! A shard's replication state: its role, its log's epoch history, the fence that stops a
//! superseded master, the replica tracker and what consumers may see under SYNC_MASTER.
//!
//! Kept apart from [`ShardContext`] (what every shard has, replicated or not): replication
//! builds on the shard, and the shard knows nothing of replication.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::replication::epoch::{EpochError, EpochHistory};
use crate::replication::lease::{Lease, LeaseState};
use crate::replication::tracker::ReplicaTracker;
use crate::replication::{ReplicationMode, Role};
use crate::shard::ShardContext;
use crate::storage::{LogPosition, ShardStore, Signal};

/// Why a master takes no writes although its role is master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// Started with a peer configured that did not answer (and no `--force-master`): the peer
    /// may have been promoted meanwhile. Lifted once the peer answers as a slave or an older
    /// master, or follows us.
    PeerUnheard { peer: String },
    /// A client reported acks from `epoch`, newer than ours: another broker may be the master
    /// now. Lifted like [`Fence::PeerUnheard`] once the peer answers as a slave or an older
    /// master (a wrong report costs one peer check); made [`Fence::Superseded`] if the peer is
    /// the newer master.
    Reported { epoch: u64, peer: String },
    /// A newer epoch exists (heard at a handshake or from the peer): another broker is the
    /// master. Final until this broker restarts (as a slave of `master`).
    Superseded { epoch: u64, master: String },
}

pub struct Replication {
    /// The shard this state belongs to.
    pub ctx: Rc<ShardContext>,
    /// Master or slave; a promotion turns a slave into a master at run time.
    role: Cell<Role>,
    /// This shard's log history (see `replication/epoch.rs`).
    epochs: RefCell<EpochHistory>,
    /// Replication progress (master: the follower's acks; slave: the link to the master).
    tracker: Rc<ReplicaTracker>,
    /// SYNC_MASTER: consumers see at least the log as it was when this shard became master
    /// (what it had then was acknowledged under the previous term), and beyond that only what
    /// the slave has.
    visible_floor: Cell<u64>,
    /// Set by a promotion: the follower stops before the new epoch starts.
    stop_following: Cell<bool>,
    /// A master that must not take writes (see [`Fence`]).
    fence: RefCell<Option<Fence>>,
    /// In a broker group on etcd: the lease without which this master acks nothing (see
    /// `replication/lease.rs`). `None` outside a cluster.
    lease: RefCell<Option<Arc<Lease>>>,
    /// Notified when the fence changes (the listener closes client connections when this
    /// master is superseded).
    fence_changed: Signal,
    /// A peer check was asked for and has not started yet.
    peer_check_due: Cell<bool>,
    /// The confirmed position last saved to `<shard dir>/confirmed`.
    confirmed_saved: Cell<u64>,
    /// Slave: the task following the master.
    pub follower: RefCell<Option<glommio::task::JoinHandle<()>>>,
    /// Where a master streams its log to a follower: a task queue with a quarter of the
    /// default queue's shares, so a follower catching up a large backlog gets at most about a
    /// fifth of the core while produce requests are waiting.
    pub replication_queue: glommio::TaskQueueHandle,
}

impl Replication {
    /// The state of a shard that has not started its role yet: the configured role, an empty
    /// history (see [`Replication::load_epochs`]).
    /// Installs the store's append hook: every append's end feeds the tracker (the age of
    /// the replica lag) without the produce path having to remember it.
    pub fn new(ctx: Rc<ShardContext>) -> Replication {
        let tracker = Rc::new(ReplicaTracker::default());
        let on_append = tracker.clone();
        ctx.store()
            .set_append_hook(Some(Rc::new(move |end: LogPosition| {
                on_append.note_end(end.0)
            })));
        Replication {
            role: Cell::new(ctx.config.replication.role),
            ctx,
            epochs: RefCell::new(EpochHistory::default()),
            tracker,
            visible_floor: Cell::new(0),
            stop_following: Cell::new(false),
            fence: RefCell::new(None),
            lease: RefCell::new(None),
            fence_changed: Signal::default(),
            peer_check_due: Cell::new(false),
            confirmed_saved: Cell::new(0),
            follower: RefCell::new(None),
            replication_queue: glommio::executor().create_task_queue(
                glommio::Shares::Static(250),
                glommio::Latency::NotImportant,
                "replication",
            ),
        }
    }

    fn store(&self) -> ShardStore {
        self.ctx.store()
    }

    pub fn role(&self) -> Role {
        self.role.get()
    }

    /// The current epoch (without copying the history).
    pub fn epoch(&self) -> u64 {
        self.epochs.borrow().current()
    }

    pub fn epochs(&self) -> EpochHistory {
        self.epochs.borrow().clone()
    }

    /// The history read from disk at start.
    pub fn load_epochs(&self, epochs: EpochHistory) {
        *self.epochs.borrow_mut() = epochs;
    }

    /// Saves `epochs` to the shard's epoch file, then uses it. The file write and its fsyncs
    /// run on the blocking pool: they would stall every ack of this shard on the executor.
    pub async fn set_epochs(&self, epochs: EpochHistory) -> Result<(), EpochError> {
        let dir = self.ctx.shard_dir();
        let to_save = epochs.clone();
        glommio::executor()
            .spawn_blocking(move || to_save.save(&dir))
            .await?;
        *self.epochs.borrow_mut() = epochs;
        Ok(())
    }

    /// Whether the follower should go on (a slave not being promoted).
    pub fn following(&self) -> bool {
        self.role.get() == Role::Slave && !self.stop_following.get() && !self.ctx.is_shutting_down()
    }

    pub fn stop_following(&self) {
        self.stop_following.set(true);
    }

    pub fn tracker(&self) -> &ReplicaTracker {
        &self.tracker
    }

    /// This broker's node id (resolved at start; see `epoch::node_id`).
    pub fn node_id(&self) -> u32 {
        self.ctx.config.replication.node_id.unwrap_or(1)
    }

    /// Becomes master: a new epoch starting at the log end is made durable first, then writes
    /// are taken. Returns the new epoch.
    ///
    /// `visible_from` is where SYNC_MASTER visibility starts: at start, the confirmed position
    /// saved before the restart (what the slave had; the log beyond it was never shown);
    /// at a promotion, the log end (this log is the truth now).
    ///
    /// Nothing is appended while the epoch file is written: the shard is not a master yet, and
    /// its follower has stopped (promotion) or not started (start-up).
    pub async fn become_master(&self, visible_from: u64) -> Result<u64, EpochError> {
        let store = self.store();
        let end = store.watermarks().appended.0;
        let mut epochs = self.epochs();
        // In a cluster the term is the election key's create revision: unique in etcd, so
        // no two masters of a group share one, and higher for every later election.
        let min_term = self.lease.borrow().as_ref().map_or(0, |l| l.term());
        let epoch = epochs.begin_at_term(end, self.node_id(), min_term);
        self.set_epochs(epochs).await?;
        debug_assert_eq!(
            store.watermarks().appended.0,
            end,
            "appended while becoming master"
        );
        self.visible_floor.set(visible_from.min(end));
        self.role.set(Role::Master);
        if self.ctx.config.replication.mode == ReplicationMode::SyncMaster {
            self.raise_visible_cap();
        } else {
            store.set_visible_cap(None);
        }
        Ok(epoch)
    }

    /// SYNC_MASTER: let consumers see what the slave has acknowledged.
    pub fn raise_visible_cap(&self) {
        let acked = self.tracker.acked(self.ctx.config.replication.replica_ack);
        // Never lower: a slave that re-syncs from an earlier point must not hide what
        // consumers may already have read.
        let cap = acked.max(self.visible_floor.get());
        self.visible_floor.set(cap);
        self.store().set_visible_cap(Some(LogPosition(cap)));
    }

    /// SYNC_MASTER acking without a replica (see [`Replication::acks_without_replica`]):
    /// consumers see what was acked that way. Never lowered.
    pub fn reveal_up_to(&self, pos: u64) {
        // The store's cap is the floor already (every setter keeps them equal): called per
        // fetch and per ack, it only moves the cap when there is more to show.
        if pos <= self.visible_floor.get() {
            return;
        }
        let cap = pos;
        self.visible_floor.set(cap);
        self.store().set_visible_cap(Some(LogPosition(cap)));
    }

    /// Slave: the master confirmed everything below `confirmed`; serve reads only below it
    /// (the store also keeps them below our own durable mark). Never lowered.
    pub fn confirm_up_to(&self, confirmed: u64) {
        let cap = confirmed.max(self.visible_floor.get());
        self.visible_floor.set(cap);
        self.store().set_visible_cap(Some(LogPosition(cap)));
    }

    /// Slave at start or after a truncation: reads stay below `confirmed` (saved before the
    /// restart, or the truncation point) until the master says more.
    pub fn start_confirmed_at(&self, confirmed: u64) {
        self.visible_floor.set(confirmed);
        self.store().set_visible_cap(Some(LogPosition(confirmed)));
    }

    /// Slave: the log was truncated at `at`; nothing beyond it is confirmed any more.
    pub fn truncated_to(&self, at: u64) {
        self.start_confirmed_at(self.visible_floor.get().min(at));
    }

    /// The position to save as confirmed: what consumers may see here.
    pub fn confirmed(&self) -> u64 {
        self.store().watermarks().visible.0
    }

    pub fn confirmed_saved(&self) -> u64 {
        self.confirmed_saved.get()
    }

    pub fn set_confirmed_saved(&self, pos: u64) {
        self.confirmed_saved.set(pos);
    }

    /// The fence, if this master takes no writes.
    pub fn fence(&self) -> Option<Fence> {
        self.fence.borrow().clone()
    }

    /// Whether a newer epoch was heard of: stop acking and streaming.
    pub fn is_superseded(&self) -> bool {
        matches!(*self.fence.borrow(), Some(Fence::Superseded { .. }))
    }

    /// Starts fenced until the peer is heard from (see [`Fence::PeerUnheard`]).
    pub fn fence_until_peer_heard(&self, peer: &str) {
        *self.fence.borrow_mut() = Some(Fence::PeerUnheard {
            peer: peer.to_string(),
        });
    }

    /// The peer answered and is no newer master: lift a start-up fence.
    pub fn peer_heard(&self) {
        let mut f = self.fence.borrow_mut();
        if let Some(Fence::PeerUnheard { peer } | Fence::Reported { peer, .. }) = &*f {
            log::info!(
                "shard {}: heard from the peer {peer}: not fenced any more, taking writes",
                self.ctx.shard
            );
            *f = None;
        }
    }

    /// A newer epoch exists: stop acking at once. Pending produce requests fail (their waits
    /// are woken), new ones get NOT_MASTER naming `master`, and the follower stream ends.
    pub fn fence_superseded(&self, epoch: u64, master: &str) {
        if self.is_superseded() {
            return;
        }
        log::error!(
            "shard {}: FENCED: epoch {} at {master} is newer than ours {}; taking no more \
             writes (restart this broker with --role slave --master {master})",
            self.ctx.shard,
            crate::replication::epoch::describe(epoch),
            crate::replication::epoch::describe(self.epoch()),
        );
        *self.fence.borrow_mut() = Some(Fence::Superseded {
            epoch,
            master: master.to_string(),
        });
        self.tracker.set_fenced();
        self.fence_changed.notify_all();
    }

    /// A client says it has seen a master of `epoch` ack (a produce's `known_epoch`). A newer
    /// epoch than ours, with a peer to ask, fences this master until the peer answers, and
    /// asks it now: under ASYNC_MASTER a partitioned old master would otherwise keep acking
    /// until its next peer check succeeds. Without a peer there is no one to ask and no pair to
    /// protect, so the report is only logged.
    pub fn on_client_epoch(&self, epoch: u64) {
        if epoch <= self.epoch() || self.role() != Role::Master || self.fence().is_some() {
            return;
        }
        let Some(peer) = self.ctx.config.replication.pair_peer().map(str::to_string) else {
            log::warn!(
                "shard {}: a client has seen epoch {}, newer than ours {}, and no peer is \
                 configured to ask; going on",
                self.ctx.shard,
                crate::replication::epoch::describe(epoch),
                crate::replication::epoch::describe(self.epoch()),
            );
            return;
        };
        log::warn!(
            "shard {}: a client has seen epoch {}, newer than ours {}: read-only until the peer \
             {peer} answers",
            self.ctx.shard,
            crate::replication::epoch::describe(epoch),
            crate::replication::epoch::describe(self.epoch()),
        );
        *self.fence.borrow_mut() = Some(Fence::Reported { epoch, peer });
        self.peer_check_due.set(true);
        self.fence_changed.notify_all();
    }

    /// Resolves when someone asked for a peer check now (see [`Replication::on_client_epoch`]).
    pub async fn peer_check_requested(&self) {
        self.fence_changed
            .wait_until(|| self.peer_check_due.replace(false))
            .await
    }

    /// Resolves once a newer epoch has been heard of (see [`Replication::fence_superseded`]).
    pub async fn superseded(&self) {
        self.fence_changed.wait_until(|| self.is_superseded()).await
    }

    /// SYNC_MASTER in a broker group whose in-sync set names no slave: acks wait for no
    /// replica (and say the durability they reached, `disk` at most).
    pub fn acks_without_replica(&self) -> bool {
        self.lease.borrow().as_ref().is_some_and(|l| l.solo())
    }

    /// Acks from now on need `lease` held (a master in a broker group on etcd).
    pub fn set_lease(&self, lease: Option<Arc<Lease>>) {
        *self.lease.borrow_mut() = lease;
    }

    /// The lease's state, on a master in a broker group on etcd (`None` elsewhere).
    pub fn lease_state(&self) -> Option<LeaseState> {
        let lease = self.lease.borrow();
        let lease = lease.as_ref()?;
        (self.role() == Role::Master).then(|| lease.state())
    }

    /// Whether etcd answered the last lease renewal (`None` outside a cluster).
    pub fn etcd_answering(&self) -> Option<bool> {
        self.lease.borrow().as_ref().map(|l| l.etcd_answering())
    }

    /// Why a master in a broker group may not ack without its lease (see
    /// `replication/lease.rs`): a lapsed lease still lets a SYNC_MASTER with a slave in its
    /// in-sync set ack what that slave confirms.
    fn lease_fence(&self) -> Option<String> {
        match self.lease_state()? {
            LeaseState::Held => None,
            LeaseState::NotHeld => Some(
                "this master does not hold its cluster lease (lost at etcd, or stepping down): \
                 it acks nothing, since another broker may be elected"
                    .to_string(),
            ),
            LeaseState::Lapsed
                if self.ctx.config.replication.mode == ReplicationMode::SyncMaster
                    && !self.acks_without_replica() =>
            {
                None
            }
            LeaseState::Lapsed => Some(
                "this master's cluster lease was not renewed in time (etcd unreachable or \
                 without a quorum): it acks nothing until etcd answers, since another broker \
                 may be elected and no slave's confirmation fences its acks"
                    .to_string(),
            ),
        }
    }

    /// Why writes are refused (for NOT_MASTER), if they are.
    pub fn fence_message(&self) -> Option<String> {
        match &*self.fence.borrow() {
            None => self.lease_fence(),
            Some(Fence::PeerUnheard { peer }) => Some(format!(
                "this master is fenced (read-only): its peer {peer} has not answered since it \
                 started, and the peer may be the master now; start it with --force-master to \
                 take writes without the peer"
            )),
            Some(Fence::Reported { epoch, peer }) => Some(format!(
                "this master is fenced (read-only): a client has seen acks from epoch {} (newer \
                 than ours {}); waiting for the peer {peer} to say which broker is the master",
                crate::replication::epoch::describe(*epoch),
                crate::replication::epoch::describe(self.epoch()),
            )),
            Some(Fence::Superseded { epoch, master }) => Some(format!(
                "this broker was superseded: the master is {master} (epoch {epoch}, newer than \
                 ours {})",
                self.epoch()
            )),
        }
    }

    /// " (its master is ADDR)" on a slave with a configured master, for error messages.
    pub fn master_hint(&self) -> String {
        match &self.ctx.config.replication.master {
            Some(m) if self.role() == Role::Slave => format!(" (its master is {m})"),
            _ => String::new(),
        }
    }
}
