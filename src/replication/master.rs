//! The master side of a shard's replication: the follower session.
//!
//! A slave's shard connects to the same shard's client port and sends `ReplFollow` as its
//! first frame; the connection becomes a replication session ([`serve_follower`]):
//!
//! 1. Refuse a follower with another shard count or segment size (positions must match byte
//!    for byte), or one whose epoch is newer than ours (then *we* are the stale master).
//! 2. Answer with the point where the two logs stop agreeing ([`epoch::divergence`]) and our
//!    epoch history; the follower truncates to that point.
//! 3. Stream `ReplData` frames of whole records from there: from the log files while the
//!    follower is behind (1 MiB reads, at most [`WINDOW_BYTES`] unacknowledged), then from the
//!    store's in-memory tail feed, so a caught-up follower gets a record while our own write
//!    and fdatasync are still under way. An empty `ReplData` every [`HEARTBEAT`] says "alive,
//!    my log ends here".
//! 4. The follower acknowledges `received` (appended to its log) and `durable` (its fdatasync
//!    covered it); each ack moves the [`ReplicaTracker`](crate::replication::tracker::ReplicaTracker), which wakes SYNC_MASTER produce
//!    requests and, under SYNC_MASTER, raises the store's visible cap.
//!
//! One follower per shard: a new session replaces the old one (a restarted slave reconnects
//! before the old connection is noticed dead). A session that hears nothing for
//! [`LINK_TIMEOUT`] ends, so a partitioned slave shows as gone within seconds.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures_lite::future;
use glommio::net::TcpStream;

use crate::protocol::{
    self, ErrorCode, Frame, ReplAck, ReplData, ReplFollowRequest, ReplFollowResponse, Response,
};
use crate::replication::epoch::{self, divergence, EpochHistory};
use crate::replication::state::Replication;
use crate::replication::{ReplicaAck, ReplicationMode, Role};
use crate::storage::LogPosition;

/// How often each side sends something when it has nothing else to say.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A link that hears nothing for this long is dropped.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(3);
/// Most bytes sent and not yet acknowledged as received.
const WINDOW_BYTES: u64 = 64 << 20;
/// Size of one read of the log files while catching a follower up.
const CATCH_UP_READ_BYTES: usize = 1 << 20;
/// Most bytes the in-memory tail feed holds for a follower that stopped reading.
const FEED_MAX_BYTES: usize = 32 << 20;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether `remote` is the host named by `peer` (`host:port` or `host`). Resolving a name is
/// a blocking lookup, so it runs on the blocking pool.
async fn is_peer_host(peer: &str, remote: IpAddr) -> bool {
    let host = match peer.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => peer,
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip == remote;
    }
    glommio::executor()
        .spawn_blocking(move || {
            (host.as_str(), 0)
                .to_socket_addrs()
                .map(|mut addrs| addrs.any(|a| a.ip() == remote))
                .unwrap_or(false)
        })
        .await
}

/// Why a follow request is refused, before any byte is streamed. A follower with a newer epoch
/// also fences this master: someone minted that epoch after ours.
async fn check_follower(
    repl: &Replication,
    req: &ReplFollowRequest,
    remote: Option<SocketAddr>,
) -> Result<(), (ErrorCode, String)> {
    if repl.role() != Role::Master {
        return Err((
            ErrorCode::NotMaster,
            format!(
                "this broker is a slave{}; follow the master instead",
                repl.master_hint()
            ),
        ));
    }
    // Until there is authentication, only the configured slave may read the log this way.
    if !repl.ctx.config.replication.accepts_followers() {
        return Err((
            ErrorCode::ReplicationRefused,
            "this master has no replication configured: start it with --peer <slave host:port> \
             (or --replication sync_master) to let a slave follow it"
                .to_string(),
        ));
    }
    let any_host = repl.ctx.config.replication.followers_from_any_host;
    if let Some(peer) = repl
        .ctx
        .config
        .replication
        .pair_peer()
        .filter(|_| !any_host)
    {
        let from_peer = match remote {
            Some(r) => is_peer_host(peer, r.ip()).await,
            None => false,
        };
        if !from_peer {
            return Err((
                ErrorCode::ReplicationRefused,
                format!(
                    "only this master's peer {peer} may follow it; this connection comes from {}",
                    remote.map_or("an unknown address".to_string(), |r| r.to_string())
                ),
            ));
        }
    }
    if req.shards as usize != repl.ctx.shards || req.shard as usize != repl.ctx.shard {
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "shard layout differs: the master has {} shards (this is shard {}), the slave \
                 has {} (it asked for shard {}); run both brokers with the same --cores",
                repl.ctx.shards, repl.ctx.shard, req.shards, req.shard
            ),
        ));
    }
    if req.segment_bytes != repl.ctx.config.storage.segment_bytes {
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "segment_bytes differ: master {}, slave {}; a replica must place every record \
                 at the master's position, so both need the same segment size",
                repl.ctx.config.storage.segment_bytes, req.segment_bytes
            ),
        ));
    }
    if req.node_id != 0 && req.node_id == repl.node_id() {
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "the slave has this master's node id {}: their epochs would not be unique (a \
                 copied data dir?); delete <data-dir>/node_id on one of them or set --node-id",
                req.node_id
            ),
        ));
    }
    let ours = repl.epoch();
    let theirs = req.epochs.last().map_or(0, |e| e.epoch);
    if theirs > ours {
        let who = remote.map_or_else(|| "the follower".to_string(), |r| r.ip().to_string());
        repl.fence_superseded(theirs, &who);
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "the slave's epoch {} is newer than this master's {}: this master was \
                 superseded by a promotion; restart it with --role slave --master <new master>",
                epoch::describe(theirs),
                epoch::describe(ours)
            ),
        ));
    }
    Ok(())
}

/// Runs a replication session on a connection whose first frame was `ReplFollow`. `buf` holds
/// bytes read past that frame.
pub async fn serve_follower(
    repl: Rc<Replication>,
    request_id: u64,
    req: ReplFollowRequest,
    remote: Option<SocketAddr>,
    reader: ReadHalf<TcpStream>,
    mut writer: WriteHalf<TcpStream>,
    buf: BytesMut,
) {
    let mut out = BytesMut::new();
    if let Err((code, msg)) = check_follower(&repl, &req, remote).await {
        log::warn!("shard {}: refusing a follower: {msg}", repl.ctx.shard);
        protocol::error_frame(
            protocol::Opcode::ReplFollow.as_u16(),
            request_id,
            code,
            &msg,
        )
        .encode(&mut out);
        let _ = writer.write_all(&out).await;
        let _ = writer.close().await;
        return;
    }
    let store = repl.ctx.store();
    let master_end = store.watermarks().appended.0;
    // A history out of order shares nothing with ours: the follower re-syncs from 0.
    let theirs = EpochHistory::from_entries(req.epochs.clone()).unwrap_or_default();
    let epochs = repl.epochs();
    let agreed = divergence(&epochs, master_end, &theirs, req.log_end);
    // Where the logs agree may lie below our oldest segment (retention deleted it while the
    // follower was away): what the follower lacks is gone here, so it starts over at our
    // oldest segment with an empty log instead of asking for bytes we no longer have.
    let oldest = store.first_position().0;
    let reset = agreed < oldest;
    let start = agreed.max(oldest);
    let tracker = repl.tracker();
    let id = tracker.begin_session(1);
    // Only SYNC_MASTER waits for the slave's fdatasync; otherwise it syncs at its own pace.
    let want_durable = repl.ctx.config.replication.mode == ReplicationMode::SyncMaster
        && repl.ctx.config.replication.replica_ack == ReplicaAck::Durable;
    Response::ReplFollowing(ReplFollowResponse {
        start,
        master_end,
        want_durable,
        epochs: epochs.entries().to_vec(),
        reset,
    })
    .to_frame(request_id, Bytes::new())
    .encode(&mut out);
    if writer.write_all(&out).await.is_err() {
        tracker.end_session(id);
        return;
    }
    log::info!(
        "shard {}: follower connected: its log ends at {}, streaming from {start} (ours ends at \
         {master_end}){}",
        repl.ctx.shard,
        req.log_end,
        if reset {
            format!(
                "; our logs agree only below our oldest segment {oldest} (retention deleted \
                 the rest), so it drops its log and starts an empty one there"
            )
        } else if start < req.log_end {
            format!("; it truncates {} bytes", req.log_end - start)
        } else {
            String::new()
        }
    );
    // The follower's own word on what it has on disk; what it merely appended is not.
    tracker.streaming(id, start, req.log_durable, master_end);
    // A follower of ours is no newer master: a start-up fence is lifted.
    repl.peer_heard();
    let acks = glommio::spawn_local(read_acks(repl.clone(), id, reader, buf));
    let session = {
        let repl = repl.clone();
        async move {
            let r = stream_log(&repl, id, start, &mut writer).await;
            (r, writer)
        }
    };
    let (streamed, mut writer) = match glommio::spawn_local_into(session, repl.replication_queue) {
        Ok(task) => task.await,
        Err(e) => {
            tracker.end_session(id);
            log::error!(
                "shard {}: cannot start the follower session: {e}",
                repl.ctx.shard
            );
            return;
        }
    };
    tracker.end_session(id);
    // A session that replaced this one may already be using the feed.
    if !tracker.has_session() {
        store.tail_feed_stop();
    }
    let _ = writer.close().await;
    let _ = acks.await;
    match streamed {
        Ok(()) => log::info!("shard {}: follower session {id} ended", repl.ctx.shard),
        Err(e) => log::warn!("shard {}: follower session {id} ended: {e}", repl.ctx.shard),
    }
}

/// Sends the log from `start` until the session is superseded, the link fails or the broker
/// shuts down.
async fn stream_log(
    repl: &Rc<Replication>,
    id: u64,
    start: u64,
    writer: &mut WriteHalf<TcpStream>,
) -> Result<(), String> {
    let tracker = repl.tracker();
    let mut next = start;
    let mut out = BytesMut::new();
    let mut last_sent = Instant::now();
    let mut pace = Pacer::new(repl.ctx.config.replication.replica_catchup_bytes_per_sec);
    loop {
        if !tracker.is_current(id)
            || repl.ctx.is_shutting_down()
            || repl.role() != Role::Master
            || repl.is_superseded()
        {
            return Ok(());
        }
        let store = repl.ctx.store();
        if next > tracker.acked(ReplicaAck::Received) + WINDOW_BYTES {
            let wait = tracker.wait_acked_beyond(next - WINDOW_BYTES, id);
            if glommio::timer::timeout(HEARTBEAT, async {
                wait.await;
                Ok(())
            })
            .await
            .is_err()
            {
                send_heartbeat(repl, writer, &mut out).await?;
                last_sent = Instant::now();
            }
            continue;
        }
        let chunk = if let Some(c) = store.tail_take(LogPosition(next)) {
            Some(c)
        } else if store.tail_feed_covers(LogPosition(next)) {
            None
        } else if next < store.watermarks().written.0 {
            let c = store
                .read_log(LogPosition(next), CATCH_UP_READ_BYTES)
                .await
                .map_err(|e| format!("reading the log at {next}: {e}"))?;
            // Catching up must not starve produce requests on this shard: let the other task
            // queues run after every read, and keep to the read budget.
            glommio::executor().yield_task_queue_now().await;
            pace.spent(c.bytes.len() as u64).await;
            Some(c)
        } else {
            // Everything written is sent: follow the tail in memory from here if nothing is
            // buffered beyond `next` (no await between the check and the start).
            if store.tail_feed_start(LogPosition(next), FEED_MAX_BYTES) {
                pace = Pacer::new(repl.ctx.config.replication.replica_catchup_bytes_per_sec);
                continue;
            }
            None
        };
        match chunk {
            Some(c) if !c.bytes.is_empty() => {
                let master_end = store.watermarks().appended.0;
                ReplData {
                    position: c.position.0,
                    master_end,
                    master_time_ms: now_ms(),
                    confirmed: repl.confirmed(),
                }
                .to_frame(0, c.bytes)
                .encode(&mut out);
                writer
                    .write_all(&out)
                    .await
                    .map_err(|e| format!("sending to the follower: {e}"))?;
                out.clear();
                last_sent = Instant::now();
                next = c.next.0;
                tracker.sent(id, next);
            }
            Some(c) => next = c.next.0,
            None => {
                let covered = store.tail_feed_covers(LogPosition(next));
                let wait = async {
                    if covered {
                        store.wait_appended_beyond(LogPosition(next)).await
                    } else {
                        store.wait_written_beyond(LogPosition(next)).await
                    }
                };
                // The slave serves reads up to our confirmed position: tell it as soon as
                // that moves (our fdatasync, or the slave's own ack under SYNC_MASTER), not
                // only at the next heartbeat.
                let confirmed = repl.confirmed();
                let durable = store.watermarks().durable;
                let (received, synced) = (
                    tracker.acked(ReplicaAck::Received),
                    tracker.acked(ReplicaAck::Durable),
                );
                let confirm_moves = async {
                    future::or(
                        store.wait_progress_beyond(LogPosition(u64::MAX), durable),
                        tracker.wait_acks_change(id, received, synced),
                    )
                    .await
                };
                let budget = HEARTBEAT.saturating_sub(last_sent.elapsed());
                let woke = glommio::timer::timeout(budget, async {
                    future::or(wait, confirm_moves).await;
                    Ok(())
                })
                .await;
                if woke.is_err() || repl.confirmed() != confirmed {
                    send_heartbeat(repl, writer, &mut out).await?;
                    last_sent = Instant::now();
                }
            }
        }
    }
}

/// Keeps catch-up reads under `bytes_per_sec` (0 = no limit), measured from the first read.
struct Pacer {
    bytes_per_sec: u64,
    since: Option<Instant>,
    bytes: u64,
}

impl Pacer {
    fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec,
            since: None,
            bytes: 0,
        }
    }

    async fn spent(&mut self, n: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(since.elapsed()) {
            glommio::timer::sleep(wait).await;
        }
    }
}

async fn send_heartbeat(
    repl: &Replication,
    writer: &mut WriteHalf<TcpStream>,
    out: &mut BytesMut,
) -> Result<(), String> {
    out.clear();
    ReplData {
        position: 0,
        master_end: repl.ctx.store().watermarks().appended.0,
        master_time_ms: now_ms(),
        confirmed: repl.confirmed(),
    }
    .to_frame(0, Bytes::new())
    .encode(out);
    let r = writer
        .write_all(out)
        .await
        .map_err(|e| format!("heartbeat to the follower: {e}"));
    out.clear();
    r
}

/// Reads the follower's acknowledgements until the link fails, goes quiet for
/// [`LINK_TIMEOUT`], or the session is superseded.
async fn read_acks(
    repl: Rc<Replication>,
    id: u64,
    mut reader: ReadHalf<TcpStream>,
    mut buf: BytesMut,
) {
    let tracker = repl.tracker();
    let mut chunk = vec![0u8; 16 << 10];
    let outcome: Result<(), String> = async {
        let mut last_heard = Instant::now();
        loop {
            while let Some(frame) = Frame::decode(&mut buf).map_err(|e| e.to_string())? {
                on_follower_frame(&repl, id, &frame)?;
            }
            if !tracker.is_current(id) || repl.ctx.is_shutting_down() {
                return Ok(());
            }
            if last_heard.elapsed() > LINK_TIMEOUT {
                return Err(format!("no word from the follower for {LINK_TIMEOUT:?}"));
            }
            // Short reads so a superseded session or a shutdown is noticed quickly.
            let read =
                glommio::timer::timeout(HEARTBEAT, async { Ok(reader.read(&mut chunk).await) })
                    .await;
            match read {
                Err(_) => {}
                Ok(Ok(0)) => return Err("the follower closed the link".into()),
                Ok(Ok(n)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    last_heard = Instant::now();
                }
                Ok(Err(e)) => return Err(format!("reading from the follower: {e}")),
            }
        }
    }
    .await;
    if let Err(e) = outcome {
        if tracker.is_current(id) {
            log::warn!("shard {}: follower link: {e}", repl.ctx.shard);
        }
    }
    tracker.end_session(id);
}

fn on_follower_frame(repl: &Replication, id: u64, frame: &Frame) -> Result<(), String> {
    let ack =
        ReplAck::from_frame(frame).map_err(|e| format!("bad frame from the follower: {e}"))?;
    let tracker = repl.tracker();
    tracker.on_ack(id, ack.received, ack.durable);
    if repl.ctx.config.replication.mode == ReplicationMode::SyncMaster {
        repl.raise_visible_cap();
    }
    Ok(())
}
