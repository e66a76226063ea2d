//! What each request does.
//!
//! [`handle`] turns one request frame into one response frame and never fails: every error
//! becomes an error frame with a stable code. Requests for a queue owned by another shard, and
//! control-plane writes (owned by shard 0), are forwarded over the mesh as the original frame;
//! the owner runs the same [`handle`] and its response goes back unchanged.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future;

use crate::format::batch as message;
use crate::protocol::limits::MAX_FETCH_BYTES;
use crate::protocol::{
    BrokerInfo, Durability, ErrorCode, FetchHeader, FetchRequest, Frame, ProduceAck,
    ProduceRequest, QueueRoute, QueueStat, Request, Response, RouteTable, ShardStats, TopicInfo,
};
use crate::replication::master::ReplicaWaitError;
use crate::replication::{ReplicaAck, ReplicationMode, Role};
use crate::server::error::HandlerError;
use crate::shard::mesh::{MeshReply, MeshRequest};
use crate::shard::ShardContext;
use crate::storage::{AppendRequest, FlushMode, LogPosition, ProducerSeq, QueueOffset};

/// Longest a fetch may wait for data; a client asking for more is capped, not refused.
pub const MAX_LONG_POLL_MS: u32 = 30_000;
/// Messages in one produce batch: bounds per-record index work and de-dup windows.
pub const MAX_BATCH_MESSAGES: u32 = 65_536;

type Result<T> = std::result::Result<T, HandlerError>;

/// Handles one request frame and returns its response frame.
pub async fn handle(ctx: &Rc<ShardContext>, frame: Frame) -> Frame {
    match Request::from_frame(&frame) {
        Ok(request) => handle_request(ctx, frame, request).await,
        Err(e) => HandlerError::from(e).to_frame(frame.opcode, frame.request_id),
    }
}

/// Handles a request already parsed from `frame` (the frame is kept for forwarding).
pub async fn handle_request(ctx: &Rc<ShardContext>, frame: Frame, request: Request) -> Frame {
    let opcode = frame.opcode;
    let request_id = frame.request_id;
    match handle_inner(ctx, frame, request).await {
        Ok(response) => response,
        Err(e) => e.to_frame(opcode, request_id),
    }
}

async fn handle_inner(ctx: &Rc<ShardContext>, frame: Frame, request: Request) -> Result<Frame> {
    if ctx.is_shutting_down() {
        return Err(HandlerError::new(
            ErrorCode::ShuttingDown,
            "the broker is shutting down",
        ));
    }
    if let Some(owner) = owner(ctx, &request) {
        if owner != ctx.shard {
            return forward(ctx, owner, frame).await;
        }
    }
    let request_id = frame.request_id;
    let (response, body) = execute(ctx, request, frame.body).await?;
    Ok(response.to_frame(request_id, body))
}

/// The shard that must execute `request`, when it is not "whichever shard received it".
fn owner(ctx: &ShardContext, request: &Request) -> Option<usize> {
    match request {
        Request::CreateTopic { .. } => Some(0),
        Request::Produce(p) => p.queue.map(|q| ctx.owner_of(&p.topic, q)),
        Request::Fetch(f) => Some(ctx.owner_of(&f.topic, f.queue)),
        _ => None,
    }
}

async fn forward(ctx: &Rc<ShardContext>, owner: usize, frame: Frame) -> Result<Frame> {
    match ctx.mesh.call(owner, MeshRequest::Frame(frame)).await? {
        MeshReply::Frame(f) => Ok(f),
        other => Err(HandlerError::new(
            ErrorCode::Internal,
            format!("shard {owner} answered a forwarded request with {other:?}"),
        )),
    }
}

/// Requests from other shards.
pub async fn on_mesh_request(ctx: &Rc<ShardContext>, request: MeshRequest) -> MeshReply {
    match request {
        MeshRequest::Frame(frame) => MeshReply::Frame(handle(ctx, frame).await),
        MeshRequest::ApplyTopics(table) => {
            ctx.set_topics(table);
            MeshReply::Applied
        }
        MeshRequest::LocalQueueStats { topic } => {
            MeshReply::QueueStats(local_queue_stats(ctx, &topic))
        }
        MeshRequest::LocalShardStats => MeshReply::ShardStats(local_shard_stats(ctx)),
        MeshRequest::Promote => MeshReply::Promoted(promote_local(ctx).await),
        MeshRequest::SyncTopics => {
            crate::replication::follower::sync_topics_now(ctx).await;
            MeshReply::Applied
        }
    }
}

async fn execute(
    ctx: &Rc<ShardContext>,
    request: Request,
    body: Bytes,
) -> Result<(Response, Bytes)> {
    let empty = Bytes::new();
    Ok(match request {
        Request::Ping => (Response::Pong, empty),
        Request::CreateTopic { name, queues } => {
            // A slave's topics are copied from its master; a local one would diverge.
            not_on_a_slave(ctx, "create topics")?;
            (create_topic(ctx, &name, queues).await?, empty)
        }
        Request::ListTopics => (list_topics(ctx), empty),
        Request::GetRoute { topic } => (route(ctx, &topic)?, empty),
        Request::BrokerInfo => (broker_info(ctx), empty),
        Request::Produce(p) => (produce(ctx, p, body).await?, empty),
        Request::Fetch(f) => fetch(ctx, f).await?,
        Request::QueueStats { topic } => (queue_stats(ctx, &topic).await?, empty),
        Request::BrokerStats => (broker_stats(ctx).await?, empty),
        Request::Promote => (promote(ctx).await?, empty),
        Request::ReplFollow(_) => {
            return Err(HandlerError::new(
                ErrorCode::InvalidArgument,
                "ReplFollow must be the first frame of a connection of its own",
            ))
        }
    })
}

fn topic_not_found(topic: &str) -> HandlerError {
    HandlerError::new(
        ErrorCode::TopicNotFound,
        format!("topic {topic:?} does not exist (create it with `ringmq admin topic create`)"),
    )
}

fn queue_count(ctx: &ShardContext, topic: &str) -> Result<u32> {
    ctx.topic(topic)
        .map(|m| m.queues)
        .ok_or_else(|| topic_not_found(topic))
}

fn check_queue(ctx: &ShardContext, topic: &str, queue: u32) -> Result<()> {
    let queues = queue_count(ctx, topic)?;
    if queue >= queues {
        return Err(HandlerError::new(
            ErrorCode::QueueNotFound,
            format!("topic {topic:?} has queues 0..{queues}; there is no queue {queue}"),
        ));
    }
    Ok(())
}

/// Runs on shard 0 only: persist the new table, push it to every shard, then answer.
pub(crate) async fn create_topic(
    ctx: &Rc<ShardContext>,
    name: &str,
    queues: u32,
) -> Result<Response> {
    debug_assert_eq!(ctx.shard, 0, "shard 0 is the topic table's only writer");
    let _one_writer = ctx.topic_writes.acquire_permit(1).await.map_err(|e| {
        HandlerError::new(ErrorCode::ShuttingDown, format!("topic writes closed: {e}"))
    })?;
    let current = ctx.topics();
    let next = Arc::new(current.with_topic(name, queues)?);
    if *next != *current {
        // tmp + fsync + rename + dir fsync: on the blocking pool, not under this shard's acks.
        let (table, dir) = (next.clone(), ctx.config.data_dir.clone());
        glommio::executor()
            .spawn_blocking(move || table.save(&dir))
            .await?;
        ctx.set_topics(next.clone());
        for shard in 1..ctx.shards {
            ctx.mesh
                .call(shard, MeshRequest::ApplyTopics(next.clone()))
                .await?;
        }
        log::info!("created topic {name:?} with {queues} queue(s)");
    }
    Ok(Response::TopicCreated {
        name: name.to_string(),
        queues,
    })
}

fn list_topics(ctx: &ShardContext) -> Response {
    Response::Topics(
        ctx.topics()
            .iter()
            .map(|(name, meta)| TopicInfo {
                name: name.to_string(),
                queues: meta.queues,
            })
            .collect(),
    )
}

fn route(ctx: &ShardContext, topic: &str) -> Result<Response> {
    let queues = queue_count(ctx, topic)?;
    Ok(Response::Route(RouteTable {
        topic: topic.to_string(),
        queues: (0..queues)
            .map(|queue| {
                let shard = ctx.owner_of(topic, queue);
                QueueRoute {
                    queue,
                    shard: shard as u32,
                    address: ctx.addresses[shard].clone(),
                }
            })
            .collect(),
    }))
}

fn broker_info(ctx: &ShardContext) -> Response {
    let replication = match ctx.config.replication {
        ReplicationMode::AsyncMaster => "ASYNC_MASTER".to_string(),
        ReplicationMode::SyncMaster => format!("SYNC_MASTER/{}", ctx.config.replica_ack),
    };
    Response::BrokerInfo(BrokerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        shards: ctx.shards as u32,
        flush_mode: ctx.config.flush_mode.to_string(),
        role: ctx.role().to_string(),
        config_toml: ctx.config.to_toml(),
        epoch: ctx.epoch(),
        master_address: match ctx.role() {
            Role::Slave => ctx.config.master.clone().unwrap_or_default(),
            Role::Master => String::new(),
        },
        replication,
        shard_addresses: ctx.addresses.to_vec(),
    })
}

/// `ringmq admin promote`: every shard stops following and starts a new epoch; answered with
/// the new epoch once all shards are masters.
async fn promote(ctx: &Rc<ShardContext>) -> Result<Response> {
    // All shards change role together, so this shard tells whether anything happens.
    let already_master = ctx.role() == Role::Master;
    let mut epoch = promote_local(ctx)
        .await
        .map_err(|e| HandlerError::new(ErrorCode::Internal, e))?;
    for shard in (0..ctx.shards).filter(|s| *s != ctx.shard) {
        match ctx.mesh.call(shard, MeshRequest::Promote).await? {
            MeshReply::Promoted(Ok(e)) => epoch = epoch.max(e),
            MeshReply::Promoted(Err(e)) => {
                return Err(HandlerError::new(
                    ErrorCode::Internal,
                    format!("shard {shard}: {e}"),
                ))
            }
            other => {
                return Err(HandlerError::new(
                    ErrorCode::Internal,
                    format!("shard {shard} answered Promote with {other:?}"),
                ))
            }
        }
    }
    if already_master {
        log::info!("promote: already master (epoch {epoch}); nothing changed");
    } else {
        log::warn!("promoted to master: epoch {epoch}");
    }
    Ok(Response::Promoted { epoch })
}

/// Promotes this shard: stop the follower (so nothing more is appended from the old master),
/// then start a new epoch at the log end. A master stays as it is.
async fn promote_local(ctx: &Rc<ShardContext>) -> std::result::Result<u64, String> {
    if ctx.role() == Role::Master {
        return Ok(ctx.epoch());
    }
    ctx.stop_following();
    let follower = ctx.follower.borrow_mut().take();
    if let Some(f) = follower {
        f.await;
    }
    let end = ctx.store().watermarks().appended.0;
    let epoch = ctx
        .become_master(end)
        .await
        .map_err(|e| format!("cannot record the new epoch: {e}"))?;
    // The old master may come back as a master: it must learn that it was superseded, and
    // we must learn if it was not.
    glommio::spawn_local(crate::replication::peer_watch::watch_peer(ctx.clone())).detach();
    Ok(epoch)
}

/// NOT_MASTER, naming the master, for writes that reach a slave.
fn not_on_a_slave(ctx: &ShardContext, what: &str) -> Result<()> {
    if ctx.role() == Role::Master {
        // A fenced master is read-only too (see replication::peer_watch).
        return match ctx.fence_message() {
            None => Ok(()),
            Some(why) => Err(HandlerError::new(ErrorCode::NotMaster, why)),
        };
    }
    Err(HandlerError::new(
        ErrorCode::NotMaster,
        format!(
            "this broker is a slave{}; {what} on the master",
            ctx.master_hint()
        ),
    ))
}

async fn produce(ctx: &Rc<ShardContext>, p: ProduceRequest, body: Bytes) -> Result<Response> {
    not_on_a_slave(ctx, "produce")?;
    let queues = queue_count(ctx, &p.topic)?;
    let queue = match p.queue {
        Some(q) => {
            check_queue(ctx, &p.topic, q)?;
            q
        }
        None => ctx.pick_local_queue(&p.topic, queues),
    };
    let count = message::validate_batch(&body, MAX_BATCH_MESSAGES)
        .map_err(|e| HandlerError::new(ErrorCode::InvalidBatch, e.to_string()))?;
    if count != p.message_count {
        return Err(HandlerError::new(
            ErrorCode::InvalidBatch,
            format!(
                "the header says {} message(s) but the body holds {count}",
                p.message_count
            ),
        ));
    }
    let producer = (p.producer_id != 0).then_some(ProducerSeq {
        producer_id: p.producer_id,
        epoch: p.producer_epoch,
        base_sequence: p.base_sequence,
    });
    let store = ctx.store();
    let appended = store
        .append(AppendRequest {
            topic: &p.topic,
            queue_id: queue,
            message_count: count,
            producer,
            body: &body,
        })
        .await?;
    let tracker = ctx.tracker();
    tracker.note_end(appended.end.0);
    // The local flush rule and the slave's acknowledgement are awaited together: the record
    // travels to the slave while our own write and fdatasync are under way.
    let local = async {
        if ctx.config.flush_mode != FlushMode::SyncFlush {
            return Ok(());
        }
        let deadline = Duration::from_millis(ctx.config.flush_timeout_ms);
        match glommio::timer::timeout(deadline, async {
            Ok(store.wait_durable(appended.end).await)
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(HandlerError::new(
                ErrorCode::FlushDiskTimeout,
                format!(
                    "stored at queue {queue} offset {} but not durable within {} ms",
                    appended.base_offset, ctx.config.flush_timeout_ms
                ),
            )),
        }
    };
    let replica = async {
        if ctx.config.replication != ReplicationMode::SyncMaster {
            return Ok(());
        }
        let deadline = Duration::from_millis(ctx.config.replica_timeout_ms);
        tracker
            .wait_replicated(appended.end, ctx.config.replica_ack, deadline)
            .await
            .map_err(|e| {
                let why = match e {
                    ReplicaWaitError::NotAvailable => "no slave is connected".to_string(),
                    ReplicaWaitError::Timeout => format!(
                        "the slave did not acknowledge ({}) within {} ms",
                        ctx.config.replica_ack, ctx.config.replica_timeout_ms
                    ),
                    ReplicaWaitError::Fenced => "this master was fenced".to_string(),
                };
                HandlerError::new(
                    e.code(),
                    format!(
                        "stored on the master at queue {queue} offset {} but {why}; an \
                         idempotent producer may retry",
                        appended.base_offset
                    ),
                )
            })
    };
    let (local, replica) = futures::join!(local, replica);
    // Fenced while waiting (a newer epoch exists): the record may be truncated when this
    // broker rejoins as a slave, so it is not acknowledged.
    if let Some(why) = ctx.fence_message() {
        return Err(HandlerError::new(
            ErrorCode::NotMaster,
            format!(
                "stored at queue {queue} offset {} but not acknowledged: {why}",
                appended.base_offset
            ),
        ));
    }
    local?;
    replica?;
    Ok(Response::Produced(ProduceAck {
        queue,
        base_offset: appended.base_offset.0,
        count: appended.count,
        duplicate: appended.duplicate,
        durability: durability_reached(ctx, appended.end),
        epoch: ctx.epoch(),
    }))
}

/// The strongest durability the watermarks show for bytes below `end`, read after the flush
/// and replica rules have been awaited (so it is at least what the modes promise).
fn durability_reached(ctx: &ShardContext, end: LogPosition) -> Durability {
    let tracker = ctx.tracker();
    if tracker.acked(ReplicaAck::Durable) >= end.0 {
        Durability::ReplicaDurable
    } else if tracker.acked(ReplicaAck::Received) >= end.0 {
        Durability::ReplicaReceived
    } else if ctx.store().watermarks().durable >= end {
        Durability::Disk
    } else {
        Durability::Memory
    }
}

async fn fetch(ctx: &Rc<ShardContext>, f: FetchRequest) -> Result<(Response, Bytes)> {
    check_queue(ctx, &f.topic, f.queue)?;
    let stats = ctx.store().queue_stats(&f.topic, f.queue);
    let wait_ms = f.max_wait_ms.min(MAX_LONG_POLL_MS);
    if f.offset >= stats.visible_end_offset.0 && wait_ms > 0 {
        let wait = async {
            let _ = glommio::timer::timeout(Duration::from_millis(u64::from(wait_ms)), async {
                ctx.store()
                    .wait_visible_beyond(&f.topic, f.queue, QueueOffset(f.offset))
                    .await;
                Ok(())
            })
            .await;
        };
        future::or(wait, ctx.shutdown_requested()).await;
    }
    let stats = ctx.store().queue_stats(&f.topic, f.queue);
    if f.offset == stats.visible_end_offset.0 {
        return Ok((
            Response::Fetched(FetchHeader {
                queue: f.queue,
                next_offset: f.offset,
                min_offset: stats.min_offset.0,
                end_offset: stats.visible_end_offset.0,
            }),
            Bytes::new(),
        ));
    }
    let batch = ctx
        .store()
        // Capped, not refused: the connection reserves room for at most this much.
        .read(
            &f.topic,
            f.queue,
            QueueOffset(f.offset),
            f.max_bytes.min(MAX_FETCH_BYTES),
        )
        .await?;
    Ok((
        Response::Fetched(FetchHeader {
            queue: f.queue,
            next_offset: batch.next_offset.0,
            min_offset: batch.min_offset.0,
            end_offset: batch.end_offset.0,
        }),
        batch.records,
    ))
}

fn local_queue_stats(ctx: &ShardContext, topic: &str) -> Vec<QueueStat> {
    let Some(meta) = ctx.topic(topic) else {
        return Vec::new();
    };
    (0..meta.queues)
        .filter(|q| ctx.owner_of(topic, *q) == ctx.shard)
        .map(|queue| {
            let s = ctx.store().queue_stats(topic, queue);
            QueueStat {
                queue,
                min_offset: s.min_offset.0,
                end_offset: s.visible_end_offset.0,
                bytes: s.bytes,
            }
        })
        .collect()
}

/// Gathers the statistics of every queue of `topic` from the shards that own them.
async fn queue_stats(ctx: &Rc<ShardContext>, topic: &str) -> Result<Response> {
    queue_count(ctx, topic)?;
    let mut all = local_queue_stats(ctx, topic);
    for shard in (0..ctx.shards).filter(|s| *s != ctx.shard) {
        let request = MeshRequest::LocalQueueStats {
            topic: topic.to_string(),
        };
        if let MeshReply::QueueStats(stats) = ctx.mesh.call(shard, request).await? {
            all.extend(stats);
        }
    }
    all.sort_by_key(|s| s.queue);
    Ok(Response::QueueStats(all))
}

fn local_shard_stats(ctx: &ShardContext) -> ShardStats {
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
        replication: ctx.tracker().stats(ctx.role(), ctx.epoch(), w.appended.0),
    }
}

/// Counters of every shard, gathered over the mesh.
async fn broker_stats(ctx: &Rc<ShardContext>) -> Result<Response> {
    let mut all = vec![local_shard_stats(ctx)];
    for shard in (0..ctx.shards).filter(|s| *s != ctx.shard) {
        if let MeshReply::ShardStats(s) = ctx.mesh.call(shard, MeshRequest::LocalShardStats).await?
        {
            all.push(s);
        }
    }
    all.sort_by_key(|s| s.shard);
    Ok(Response::BrokerStats(all))
}
