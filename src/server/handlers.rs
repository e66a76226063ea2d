//! The dispatcher: one request frame in, one response frame out.
//!
//! [`handle`] decodes the request, forwards it when another shard owns it (queues by
//! `shard_of`, control-plane writes by shard 0) as the original frame — the owner runs the same
//! [`handle`] and its response goes back unchanged — and otherwise calls the service in
//! `broker/` and encodes its answer. It never fails: every error becomes an error frame with a
//! stable code. What each request does lives in `broker/`, not here.

use std::rc::Rc;

use bytes::Bytes;

use crate::broker::{admin, fetch, produce, stats, topics, Result, ServiceError, Services};
use crate::protocol::{ErrorCode, Frame, Request, Response};
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
        return Err(ServiceError::new(
            ErrorCode::ShuttingDown,
            "the broker is shutting down",
        ));
    }
    if let Some(owner) = owner(s, &request) {
        if owner != s.shard.shard {
            return forward(s, owner, frame).await;
        }
    }
    let request_id = frame.request_id;
    let (response, body) = execute(s, request, frame.body).await?;
    Ok(response.to_frame(request_id, body))
}

/// The shard that must execute `request`, when it is not "whichever shard received it".
fn owner(s: &Services, request: &Request) -> Option<usize> {
    match request {
        Request::CreateTopic { .. } => Some(0),
        Request::Produce(p) => p.queue.map(|q| s.shard.owner_of(&p.topic, q)),
        Request::Fetch(f) => Some(s.shard.owner_of(&f.topic, f.queue)),
        _ => None,
    }
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
        Request::ListTopics => (topics::list(s), empty),
        Request::GetRoute { topic } => (topics::route(s, &topic)?, empty),
        Request::BrokerInfo => (admin::broker_info(s), empty),
        Request::Produce(p) => (produce::produce(s, p, body).await?, empty),
        Request::Fetch(f) => fetch::fetch(s, f).await?,
        Request::QueueStats { topic } => (stats::queue_stats(s, &topic).await?, empty),
        Request::BrokerStats => (stats::broker_stats(s).await?, empty),
        Request::Promote => (admin::promote(s).await?, empty),
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
    }
}
