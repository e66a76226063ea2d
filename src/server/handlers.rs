//! The dispatcher: one request frame in, one response frame out.
//!
//! [`handle`] decodes the request, forwards it when another shard owns it (queues by
//! `shard_of`, control-plane writes by shard 0) as the original frame — the owner runs the same
//! [`handle`] and its response goes back unchanged — and otherwise calls the service in
//! `broker/` and encodes its answer. It never fails: every error becomes an error frame with a
//! stable code. What each request does lives in `broker/`, not here.

use std::rc::Rc;

use bytes::Bytes;

use crate::broker::{
    admin, fetch, groups, produce, retry, stats, topics, transactions, Result, ServiceError,
    Services,
};
use crate::metrics::TopicSlot;
use crate::protocol::{ErrorCode, Frame, GroupSettings, RemoteError, Request, Response};
use crate::replication::{follower, promotion};
use crate::shard::mesh::{MeshReply, MeshRequest};

/// Handles one request frame and returns its response frame.
pub async fn handle(s: &Rc<Services>, frame: Frame) -> Frame {
    match Request::from_frame(&frame) {
        Ok(request) => handle_request(s, frame, request).await,
        Err(e) => ServiceError::from(e).to_frame(frame.opcode, frame.request_id),
    }
}

/// Handles a request already parsed from `frame` (the frame is kept for forwarding).
pub async fn handle_request(s: &Rc<Services>, frame: Frame, request: Request) -> Frame {
    let opcode = frame.opcode;
    let request_id = frame.request_id;
    match route(s, frame, request).await {
        Ok(response) => response,
        Err(e) => e.to_frame(opcode, request_id),
    }
}

async fn route(s: &Rc<Services>, frame: Frame, request: Request) -> Result<Frame> {
    if s.shard.is_shutting_down() {
        let e = ServiceError::new(ErrorCode::ShuttingDown, "the broker is shutting down");
        count_refusal(s, e.code);
        if matches!(request, Request::Produce(_)) {
            s.shard.metrics.count_produce_result(e.code.name());
        }
        return Err(e);
    }
    if let Some(owner) = owner(s, &request) {
        if owner != s.shard.shard {
            // Counted by the owner, which runs this same function on the forwarded frame.
            return forward(s, owner, frame).await;
        }
    }
    let request_id = frame.request_id;
    let counting = Counting::before(s, &request, &frame);
    let result = execute(s, request, frame.body).await;
    counting.after(s, &result);
    let (response, body) = result?;
    Ok(response.to_frame(request_id, body))
}

/// What the metrics need of a request, taken before it is handed to its service (which takes
/// it by value): a produce or fetch of an existing topic keeps that topic's slot, so nothing
/// is copied per request.
enum Counting {
    Produce {
        topic: Option<TopicSlot>,
        body_bytes: u64,
    },
    Fetch {
        topic: Option<TopicSlot>,
        offset: u64,
    },
    Other,
}

impl Counting {
    fn before(s: &Services, request: &Request, frame: &Frame) -> Counting {
        let slot = |topic: &str| {
            s.shard
                .topic(topic)
                .map(|_| s.shard.metrics.topic_slot(topic))
        };
        match request {
            Request::Produce(p) => Counting::Produce {
                topic: slot(&p.topic),
                body_bytes: frame.body.len() as u64,
            },
            Request::Fetch(f) => Counting::Fetch {
                topic: slot(&f.topic),
                offset: f.offset,
            },
            _ => Counting::Other,
        }
    }

    fn after(self, s: &Services, result: &Result<(Response, Bytes)>) {
        let m = &s.shard.metrics;
        if let Err(e) = result {
            count_refusal(s, e.code);
        }
        match (self, result) {
            (Counting::Produce { topic, body_bytes }, Ok((Response::Produced(ack), _))) => {
                m.count_produce_result(ErrorCode::Ok.name());
                // A duplicate was stored (and counted) the first time.
                if let (Some(slot), false) = (topic, ack.duplicate) {
                    m.count_produced(slot, u64::from(ack.count), body_bytes);
                }
            }
            (Counting::Produce { .. }, Ok(_)) => m.count_produce_result(ErrorCode::Internal.name()),
            (Counting::Produce { .. }, Err(e)) => m.count_produce_result(e.code.name()),
            (
                Counting::Fetch {
                    topic: Some(slot),
                    offset,
                },
                Ok((Response::Fetched(h), body)),
            ) => {
                m.count_fetched(
                    slot,
                    h.next_offset.saturating_sub(offset),
                    body.len() as u64,
                );
            }
            _ => {}
        }
    }
}

/// Answers that refuse a request to protect the broker (or because this is not the broker to
/// write to), counted by reason.
fn count_refusal(s: &Services, code: ErrorCode) {
    let reason = match code {
        ErrorCode::SystemBusy => "system_busy",
        ErrorCode::DiskFull => "disk_full",
        ErrorCode::NotMaster => "not_master",
        ErrorCode::ShuttingDown => "shutting_down",
        _ => return,
    };
    s.shard.metrics.count_refusal(reason);
}

/// The shard that must execute `request`, when it is not "whichever shard received it".
fn owner(s: &Services, request: &Request) -> Option<usize> {
    match request {
        Request::CreateTopic { .. } | Request::AlterTopic { .. } | Request::DeleteTopic { .. } => {
            Some(0)
        }
        Request::Produce(p) => p.queue.map(|q| s.shard.owner_of(&p.topic, q)),
        Request::Fetch(f) => Some(s.shard.owner_of(&f.topic, f.queue)),
        Request::SendBack(b) => Some(s.shard.owner_of(&b.topic, b.queue)),
        Request::JoinGroup(j) => Some(coordinator(s, &j.group)),
        Request::LeaveGroup { group, .. } | Request::DescribeGroup { group } => {
            Some(coordinator(s, group))
        }
        Request::CommitOffsets(c) => Some(coordinator(s, &c.who.group)),
        Request::CreateGroup(g) => Some(coordinator(s, &g.group)),
        Request::EndTransaction(e) => Some(s.shard.owner_of(&e.topic, e.queue)),
        // A shard out of range is answered by the receiver (INVALID_ARGUMENT).
        Request::CheckTransactions(c) => Some(c.shard as usize).filter(|n| *n < s.shard.shards),
        Request::ListTransactions { shard } => {
            Some(*shard as usize).filter(|n| *n < s.shard.shards)
        }
        _ => None,
    }
}

fn check_shard(s: &Services, shard: u32) -> Result<()> {
    if shard as usize >= s.shard.shards {
        return Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!("shard {shard}: this broker has {} shards", s.shard.shards),
        ));
    }
    Ok(())
}

fn coordinator(s: &Services, group: &str) -> usize {
    groups::coordinator_of(group, s.shard.shards)
}

async fn forward(s: &Services, owner: usize, frame: Frame) -> Result<Frame> {
    match s.shard.mesh.call(owner, MeshRequest::Frame(frame)).await? {
        MeshReply::Frame(f) => Ok(f),
        other => Err(ServiceError::new(
            ErrorCode::Internal,
            format!("shard {owner} answered a forwarded request with {other:?}"),
        )),
    }
}

async fn execute(s: &Rc<Services>, request: Request, body: Bytes) -> Result<(Response, Bytes)> {
    let empty = Bytes::new();
    Ok(match request {
        Request::Ping => (Response::Pong, empty),
        Request::CreateTopic { name, queues } => (topics::create(s, &name, queues).await?, empty),
        Request::AlterTopic { name, queues } => (topics::alter(s, &name, queues).await?, empty),
        Request::DeleteTopic { name } => (topics::delete(s, &name).await?, empty),
        Request::ListTopics => (topics::list(s), empty),
        Request::GetRoute { topic } => (topics::route(s, &topic)?, empty),
        Request::BrokerInfo => (admin::broker_info(s), empty),
        Request::Produce(p) => (produce::produce(s, p, body).await?, empty),
        Request::Fetch(f) => fetch::fetch(s, f).await?,
        Request::QueueStats { topic } => (stats::queue_stats(s, &topic).await?, empty),
        Request::BrokerStats => (stats::broker_stats(s).await?, empty),
        Request::Promote => (admin::promote(s).await?, empty),
        Request::JoinGroup(j) => (groups::join(s, j).await?, empty),
        Request::LeaveGroup { group, member } => (groups::leave(s, &group, &member)?, empty),
        Request::CommitOffsets(c) => (groups::commit(s, c).await?, empty),
        Request::SendBack(b) => (retry::send_back(s, b).await?, empty),
        Request::CreateGroup(g) => (groups::create(s, g).await?, empty),
        Request::DescribeGroup { group } => (groups::describe(s, &group).await?, empty),
        Request::EndTransaction(e) => (transactions::end(s, e).await?, empty),
        Request::CheckTransactions(c) => {
            check_shard(s, c.shard)?;
            transactions::check_poll(s, c).await?
        }
        Request::ListTransactions { shard } => {
            check_shard(s, shard)?;
            (transactions::list(s).await?, empty)
        }
        Request::ReplFollow(_) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidArgument,
                "ReplFollow must be the first frame of a connection of its own",
            ))
        }
    })
}

/// Requests from other shards: a forwarded frame goes through [`handle`] like one from a
/// socket; the rest are this shard's part of a broker-wide request.
pub async fn on_mesh_request(s: &Rc<Services>, request: MeshRequest) -> MeshReply {
    match request {
        MeshRequest::Frame(frame) => MeshReply::Frame(handle(s, frame).await),
        MeshRequest::ApplyTopics(table) => {
            s.shard.set_topics(table);
            MeshReply::Applied
        }
        MeshRequest::LocalQueueStats { topic } => {
            MeshReply::QueueStats(stats::local_queue_stats(s, &topic))
        }
        MeshRequest::LocalShardStats => MeshReply::ShardStats(stats::local_shard_stats(s)),
        MeshRequest::Promote => MeshReply::Promoted(promotion::promote(&s.replication).await),
        MeshRequest::SyncTopics => {
            follower::sync_topics_now(&s.replication).await;
            MeshReply::Applied
        }
        MeshRequest::CheckMember { who, topic, queue } => MeshReply::MemberChecked(
            groups::check_member_here(s, &who, &topic, queue)
                .await
                .map(|g| GroupSettings {
                    group: who.group.clone(),
                    max_reconsume_times: g.max_reconsume_times,
                    consume_timeout_ms: g.consume_timeout_ms,
                })
                .map_err(remote),
        ),
        MeshRequest::CreateInternalTopic { name, queues } => MeshReply::Done(
            groups::create_internal_topic(s, &name, queues)
                .await
                .map_err(remote),
        ),
        MeshRequest::RecordSentBack {
            who,
            topic,
            queue,
            offset,
        } => MeshReply::Done(
            groups::record_sent_back_here(s, &who, &topic, queue, offset)
                .await
                .map_err(remote),
        ),
    }
}

fn remote(e: ServiceError) -> RemoteError {
    RemoteError {
        code: e.code,
        message: e.message,
    }
}
