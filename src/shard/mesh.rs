//! Request/reply between shards over glommio's bounded channel mesh.
//!
//! Each shard holds one [`Mesh`]. [`Mesh::call`] sends a request to another shard and waits
//! for its reply; replies are matched by a per-shard call id. The receive side (see
//! `executor.rs`) runs each incoming request in its own task, so a slow request (a long-poll
//! fetch) never blocks the channel, and it never waits to send while receiving, so two shards
//! calling each other cannot deadlock on full channels.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use futures::channel::oneshot;
use glommio::channels::channel_mesh::Senders;

use crate::protocol::{Frame, GroupSettings, Membership, QueueStat, RemoteError, ShardStats};
use crate::shard::topics::TopicTable;

/// Messages in flight per pair of shards before a sender waits: enough to keep a pipelined
/// producer on the wrong port busy, small enough to bound memory.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;

/// What one shard asks of another.
#[derive(Debug)]
pub enum MeshRequest {
    /// A client request that reached a shard which does not own its queue (or, for control
    /// requests, is not shard 0). The owner handles it as if it had arrived on its own port.
    Frame(Frame),
    /// A new version of the topic table from shard 0.
    ApplyTopics(Arc<TopicTable>),
    /// Statistics of the queues of `topic` that the receiving shard owns.
    LocalQueueStats { topic: String },
    /// The receiving shard's counters and watermarks.
    LocalShardStats,
    /// Turn the receiving shard from slave into master (see `handlers::promote`).
    Promote,
    /// Slave, to shard 0: copy the master's topic table now (a replicated record named a topic
    /// this broker does not know yet).
    SyncTopics,
    /// To a group's coordinator: does `who` hold (topic, queue) in its generation? Answered
    /// with the group's settings or the refusal.
    CheckMember {
        who: Membership,
        topic: String,
        queue: u32,
    },
    /// To shard 0: create a topic the broker itself needs (a group's retry and dead-letter
    /// topics), which a client may not create.
    CreateInternalTopic { name: String, queues: u32 },
    /// To a group's coordinator: `who` gave back (topic, queue, offset); record it.
    RecordSentBack {
        who: Membership,
        topic: String,
        queue: u32,
        offset: u64,
    },
}

#[derive(Debug)]
pub enum MeshReply {
    Frame(Frame),
    Applied,
    QueueStats(Vec<QueueStat>),
    ShardStats(ShardStats),
    /// The shard's epoch after a promotion, or why it failed.
    Promoted(Result<u64, String>),
    /// A group's settings, or why the member was refused.
    MemberChecked(Result<GroupSettings, RemoteError>),
    /// Done (an internal topic created, a given-back message recorded), or why not.
    Done(Result<(), RemoteError>),
}

/// The one message type on the mesh.
#[derive(Debug)]
pub enum MeshMsg {
    Request {
        from: usize,
        call_id: u64,
        request: MeshRequest,
    },
    Reply {
        call_id: u64,
        reply: MeshReply,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("shard {0} is not reachable over the mesh (shutting down?)")]
    Unreachable(usize),
    #[error("shard {0} dropped the request without replying")]
    NoReply(usize),
}

/// This shard's end of the mesh.
pub struct Mesh {
    shard: usize,
    senders: Senders<MeshMsg>,
    next_call_id: Cell<u64>,
    pending: RefCell<HashMap<u64, oneshot::Sender<MeshReply>>>,
}

impl Mesh {
    pub fn new(shard: usize, senders: Senders<MeshMsg>) -> Mesh {
        Mesh {
            shard,
            senders,
            next_call_id: Cell::new(1),
            pending: RefCell::new(HashMap::new()),
        }
    }

    /// Sends `request` to shard `to` and waits for its reply.
    pub async fn call(&self, to: usize, request: MeshRequest) -> Result<MeshReply, MeshError> {
        assert_ne!(to, self.shard, "a shard never calls itself over the mesh");
        let call_id = self.next_call_id.get();
        self.next_call_id.set(call_id + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(call_id, tx);
        let msg = MeshMsg::Request {
            from: self.shard,
            call_id,
            request,
        };
        if self.senders.send_to(to, msg).await.is_err() {
            self.pending.borrow_mut().remove(&call_id);
            return Err(MeshError::Unreachable(to));
        }
        rx.await.map_err(|_| MeshError::NoReply(to))
    }

    /// Sends a reply back to the shard that asked.
    pub async fn reply(&self, to: usize, call_id: u64, reply: MeshReply) {
        // A peer that stopped no longer waits for the reply: nothing to do.
        let _ = self
            .senders
            .send_to(to, MeshMsg::Reply { call_id, reply })
            .await;
    }

    /// Completes a pending call. An unknown id means the caller gave up; drop the reply.
    pub fn on_reply(&self, call_id: u64, reply: MeshReply) {
        if let Some(tx) = self.pending.borrow_mut().remove(&call_id) {
            let _ = tx.send(reply);
        }
    }

    pub fn shard_count(&self) -> usize {
        self.senders.nr_consumers()
    }

    /// Stops sending; peers see their receivers end.
    pub fn close(&self) {
        self.senders.close();
    }
}
