//! The master side of a shard's replication: the follower session and the [`ReplicaTracker`].
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
//!    covered it); each ack moves the [`ReplicaTracker`], which wakes SYNC_MASTER produce
//!    requests and, under SYNC_MASTER, raises the store's visible cap.
//!
//! One follower per shard: a new session replaces the old one (a restarted slave reconnects
//! before the old connection is noticed dead). A session that hears nothing for
//! [`LINK_TIMEOUT`] ends, so a partitioned slave shows as gone within seconds.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures_lite::future;
use glommio::net::TcpStream;

use crate::protocol::{
    self, ErrorCode, Frame, ReplAck, ReplData, ReplFollowRequest, ReplFollowResponse, ReplicaStats,
    Response,
};
use crate::replication::epoch::{self, divergence, EpochHistory};
use crate::replication::{ReplicaAck, ReplicationMode, Role};
use crate::shard::ShardContext;
use crate::storage::{LogPosition, Signal};

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
/// Samples kept for the lag in milliseconds (one per millisecond with appends at most).
const MAX_LAG_SAMPLES: usize = 100_000;

/// Why a SYNC_MASTER wait for the slave failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaWaitError {
    /// No slave is connected (FLUSH_SLAVE_TIMEOUT's sibling, SLAVE_NOT_AVAILABLE).
    NotAvailable,
    /// A slave is connected but did not acknowledge in time (FLUSH_SLAVE_TIMEOUT).
    Timeout,
    /// This master learnt of a newer epoch while waiting: it acks nothing more (NOT_MASTER).
    Fenced,
}

impl ReplicaWaitError {
    pub fn code(self) -> ErrorCode {
        match self {
            ReplicaWaitError::NotAvailable => ErrorCode::SlaveNotAvailable,
            ReplicaWaitError::Timeout => ErrorCode::FlushSlaveTimeout,
            ReplicaWaitError::Fenced => ErrorCode::NotMaster,
        }
    }
}

/// Replication progress of one shard, on either side of the link.
///
/// On a master: the follower session, the positions it acknowledged, and the samples that turn
/// the unacknowledged bytes into an age. On a slave: the link to the master and how far behind
/// the master's log end it is. Lives on the shard's thread.
#[derive(Default)]
pub struct ReplicaTracker {
    st: RefCell<TrackerState>,
    /// Notified when acknowledged positions move or the session changes.
    changed: Signal,
}

#[derive(Default)]
struct TrackerState {
    /// Id of the live session (master: follower session; slave: link to the master).
    session: Option<u64>,
    next_session: u64,
    /// 1 = connecting / handshaking, 2 = streaming.
    link: u8,
    /// Master: the follower's acknowledged positions. Slave: our own appended / durable.
    received: u64,
    durable: u64,
    /// Slave: the master's log end as last heard.
    peer_end: u64,
    /// Master: end of what the session has sent; acks beyond it are not believed.
    sent: u64,
    connects: u64,
    /// (log end, when it was reached), oldest first: the age of the oldest byte the other side
    /// does not have yet.
    samples: VecDeque<(u64, Instant)>,
    rate_window: Option<(Instant, u64)>,
    rate: u64,
    /// Master: a newer epoch exists; every wait fails from now on.
    fenced: bool,
}

impl TrackerState {
    fn sample(&mut self, end: u64) {
        let now = Instant::now();
        let full = self.samples.len() >= MAX_LAG_SAMPLES;
        match self.samples.back_mut() {
            Some((e, _)) if *e >= end => {}
            // Within a millisecond of the last sample, or out of room: extend the last one (the
            // oldest samples are the ones that say how old the lag is).
            Some((e, t)) if full || now.duration_since(*t) < Duration::from_millis(1) => *e = end,
            _ => self.samples.push_back((end, now)),
        }
    }

    fn progress(&mut self, received: u64, durable: u64) {
        self.received = self.received.max(received);
        self.durable = self.durable.max(durable);
        while self
            .samples
            .front()
            .is_some_and(|(e, _)| *e <= self.received)
        {
            self.samples.pop_front();
        }
        let now = Instant::now();
        match self.rate_window {
            Some((t, at)) if now.duration_since(t) >= Duration::from_secs(1) => {
                let secs = now.duration_since(t).as_secs_f64();
                self.rate = ((self.received - at) as f64 / secs) as u64;
                self.rate_window = Some((now, self.received));
            }
            Some(_) => {}
            None => self.rate_window = Some((now, self.received)),
        }
    }
}

impl ReplicaTracker {
    /// Starts a session (master: a follower connected; slave: dialling the master) and returns
    /// its id; any older session is superseded.
    pub fn begin_session(&self, link: u8) -> u64 {
        let mut st = self.st.borrow_mut();
        st.next_session += 1;
        let id = st.next_session;
        st.session = Some(id);
        st.link = link;
        drop(st);
        self.changed.notify_all();
        id
    }

    /// Marks session `id` as streaming from `start` (both sides have everything below it);
    /// the other side has made `durable` of it durable (what it said, never more than
    /// `start`: a follower's appended end is not on its disk yet).
    pub fn streaming(&self, id: u64, start: u64, durable: u64, peer_end: u64) {
        let mut st = self.st.borrow_mut();
        if st.session != Some(id) {
            return;
        }
        st.link = 2;
        st.connects += 1;
        st.received = start;
        st.durable = durable.min(start);
        st.sent = start;
        st.peer_end = peer_end;
        st.samples.retain(|(e, _)| *e > start);
        st.rate_window = None;
        drop(st);
        self.changed.notify_all();
    }

    pub fn end_session(&self, id: u64) {
        let mut st = self.st.borrow_mut();
        if st.session == Some(id) {
            st.session = None;
            st.link = 0;
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Master: a newer epoch exists; pending and future waits fail with
    /// [`ReplicaWaitError::Fenced`].
    pub fn set_fenced(&self) {
        self.st.borrow_mut().fenced = true;
        self.changed.notify_all();
    }

    pub fn has_session(&self) -> bool {
        self.st.borrow().session.is_some()
    }

    pub fn is_current(&self, id: u64) -> bool {
        self.st.borrow().session == Some(id)
    }

    pub fn is_streaming(&self) -> bool {
        let st = self.st.borrow();
        st.session.is_some() && st.link == 2
    }

    /// The follower (master side) or this slave (slave side) has `received` / `durable`.
    pub fn on_progress(&self, id: u64, received: u64, durable: u64) {
        let mut st = self.st.borrow_mut();
        if st.session != Some(id) {
            return;
        }
        st.progress(received, durable);
        drop(st);
        self.changed.notify_all();
    }

    /// Master: session `id` has sent everything below `end`.
    pub fn sent(&self, id: u64, end: u64) {
        let mut st = self.st.borrow_mut();
        if st.session == Some(id) {
            st.sent = st.sent.max(end);
        }
    }

    /// Master: the follower of session `id` acknowledged. A follower cannot have more than it
    /// was sent, nor have made durable more than it received: anything beyond is clamped, so a
    /// confused follower can never release a SYNC_MASTER ack early.
    pub fn on_ack(&self, id: u64, received: u64, durable: u64) {
        let sent = self.st.borrow().sent;
        let received = received.min(sent);
        self.on_progress(id, received, durable.min(received));
    }

    /// Master: the log now ends at `end` (for the lag's age). Slave: the master said its log
    /// ends at `end`.
    pub fn note_end(&self, end: u64) {
        let mut st = self.st.borrow_mut();
        st.peer_end = st.peer_end.max(end);
        st.sample(end);
    }

    /// Acknowledged position for `kind`.
    pub fn acked(&self, kind: ReplicaAck) -> u64 {
        let st = self.st.borrow();
        match kind {
            ReplicaAck::Received => st.received,
            ReplicaAck::Durable => st.durable,
        }
    }

    /// Waits until the follower has acknowledged everything below `end` as `kind`.
    pub async fn wait_replicated(
        &self,
        end: LogPosition,
        kind: ReplicaAck,
        timeout: Duration,
    ) -> Result<(), ReplicaWaitError> {
        if self.st.borrow().fenced {
            return Err(ReplicaWaitError::Fenced);
        }
        if !self.is_streaming() {
            return Err(ReplicaWaitError::NotAvailable);
        }
        let done = glommio::timer::timeout(timeout, async {
            self.changed
                .wait_until(|| {
                    let st = self.st.borrow();
                    st.fenced || st.session.is_none() || self.acked(kind) >= end.0
                })
                .await;
            Ok(())
        })
        .await;
        if self.st.borrow().fenced {
            Err(ReplicaWaitError::Fenced)
        } else if self.acked(kind) >= end.0 {
            Ok(())
        } else if done.is_ok() || !self.is_streaming() {
            Err(ReplicaWaitError::NotAvailable)
        } else {
            Err(ReplicaWaitError::Timeout)
        }
    }

    /// Resolves when the acknowledged positions differ from `received` / `durable` or the
    /// session changes.
    async fn wait_acks_change(&self, id: u64, received: u64, durable: u64) {
        self.changed
            .wait_until(|| {
                let st = self.st.borrow();
                st.received != received || st.durable != durable || st.session != Some(id)
            })
            .await
    }

    /// Resolves when acknowledgements move past `pos` or the session changes.
    async fn wait_acked_beyond(&self, pos: u64, id: u64) {
        self.changed
            .wait_until(|| {
                let st = self.st.borrow();
                st.received > pos || st.session != Some(id)
            })
            .await
    }

    /// Stats for BrokerStats; `log_end` is this shard's append position.
    pub fn stats(&self, role: Role, epoch: u64, log_end: u64) -> ReplicaStats {
        let st = self.st.borrow();
        let (end, have) = match role {
            Role::Master => (log_end, st.received),
            Role::Slave => (st.peer_end.max(log_end), log_end),
        };
        // A master that never had a slave has no lag to speak of; once one was seen, the lag is
        // what it lacks, connected or not.
        let lag_bytes = if st.connects > 0 || role == Role::Slave {
            end.saturating_sub(have)
        } else {
            0
        };
        let lag_ms = if lag_bytes == 0 {
            0
        } else {
            st.samples
                .iter()
                .find(|(e, _)| *e > have)
                .map_or(0, |(_, t)| t.elapsed().as_millis() as u64)
        };
        let rate = match st.rate_window {
            _ if st.session.is_none() => 0,
            Some((t, at)) if t.elapsed() >= Duration::from_secs(2) => {
                ((st.received - at) as f64 / t.elapsed().as_secs_f64()) as u64
            }
            _ => st.rate,
        };
        ReplicaStats {
            role: match role {
                Role::Master => 0,
                Role::Slave => 1,
            },
            epoch,
            link: if st.session.is_some() { st.link } else { 0 },
            peer_received: st.received,
            peer_durable: st.durable,
            log_end: end,
            lag_bytes,
            lag_ms,
            catchup_bytes_per_sec: rate,
            connects: st.connects,
        }
    }
}

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
    ctx: &ShardContext,
    req: &ReplFollowRequest,
    remote: Option<SocketAddr>,
) -> Result<(), (ErrorCode, String)> {
    if ctx.role() != Role::Master {
        return Err((
            ErrorCode::NotMaster,
            format!(
                "this broker is a slave{}; follow the master instead",
                ctx.master_hint()
            ),
        ));
    }
    // Until there is authentication, only the configured slave may read the log this way.
    if !ctx.config.replication.accepts_followers() {
        return Err((
            ErrorCode::ReplicationRefused,
            "this master has no replication configured: start it with --peer <slave host:port> \
             (or --replication sync_master) to let a slave follow it"
                .to_string(),
        ));
    }
    if let Some(peer) = ctx.config.replication.pair_peer() {
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
    if req.shards as usize != ctx.shards || req.shard as usize != ctx.shard {
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "shard layout differs: the master has {} shards (this is shard {}), the slave \
                 has {} (it asked for shard {}); run both brokers with the same --cores",
                ctx.shards, ctx.shard, req.shards, req.shard
            ),
        ));
    }
    if req.segment_bytes != ctx.config.storage.segment_bytes {
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "segment_bytes differ: master {}, slave {}; a replica must place every record \
                 at the master's position, so both need the same segment size",
                ctx.config.storage.segment_bytes, req.segment_bytes
            ),
        ));
    }
    if req.node_id != 0 && req.node_id == ctx.node_id() {
        return Err((
            ErrorCode::ReplicationRefused,
            format!(
                "the slave has this master's node id {}: their epochs would not be unique (a \
                 copied data dir?); delete <data-dir>/node_id on one of them or set --node-id",
                req.node_id
            ),
        ));
    }
    let ours = ctx.epoch();
    let theirs = req.epochs.last().map_or(0, |e| e.epoch);
    if theirs > ours {
        let who = remote.map_or_else(|| "the follower".to_string(), |r| r.ip().to_string());
        ctx.fence_superseded(theirs, &who);
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
    ctx: Rc<ShardContext>,
    request_id: u64,
    req: ReplFollowRequest,
    remote: Option<SocketAddr>,
    reader: ReadHalf<TcpStream>,
    mut writer: WriteHalf<TcpStream>,
    buf: BytesMut,
) {
    let mut out = BytesMut::new();
    if let Err((code, msg)) = check_follower(&ctx, &req, remote).await {
        log::warn!("shard {}: refusing a follower: {msg}", ctx.shard);
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
    let store = ctx.store();
    let master_end = store.watermarks().appended.0;
    // A history out of order shares nothing with ours: the follower re-syncs from 0.
    let theirs = EpochHistory::from_entries(req.epochs.clone()).unwrap_or_default();
    let epochs = ctx.epochs();
    let start = divergence(&epochs, master_end, &theirs, req.log_end);
    let tracker = ctx.tracker();
    let id = tracker.begin_session(1);
    // Only SYNC_MASTER waits for the slave's fdatasync; otherwise it syncs at its own pace.
    let want_durable = ctx.config.replication.mode == ReplicationMode::SyncMaster
        && ctx.config.replication.replica_ack == ReplicaAck::Durable;
    Response::ReplFollowing(ReplFollowResponse {
        start,
        master_end,
        want_durable,
        epochs: epochs.entries().to_vec(),
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
        ctx.shard,
        req.log_end,
        if start < req.log_end {
            format!("; it truncates {} bytes", req.log_end - start)
        } else {
            String::new()
        }
    );
    // The follower's own word on what it has on disk; what it merely appended is not.
    tracker.streaming(id, start, req.log_durable, master_end);
    // A follower of ours is no newer master: a start-up fence is lifted.
    ctx.peer_heard();
    let acks = glommio::spawn_local(read_acks(ctx.clone(), id, reader, buf));
    let session = {
        let ctx = ctx.clone();
        async move {
            let r = stream_log(&ctx, id, start, &mut writer).await;
            (r, writer)
        }
    };
    let (streamed, mut writer) = match glommio::spawn_local_into(session, ctx.replication_queue) {
        Ok(task) => task.await,
        Err(e) => {
            tracker.end_session(id);
            log::error!(
                "shard {}: cannot start the follower session: {e}",
                ctx.shard
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
        Ok(()) => log::info!("shard {}: follower session {id} ended", ctx.shard),
        Err(e) => log::warn!("shard {}: follower session {id} ended: {e}", ctx.shard),
    }
}

/// Sends the log from `start` until the session is superseded, the link fails or the broker
/// shuts down.
async fn stream_log(
    ctx: &Rc<ShardContext>,
    id: u64,
    start: u64,
    writer: &mut WriteHalf<TcpStream>,
) -> Result<(), String> {
    let tracker = ctx.tracker();
    let mut next = start;
    let mut out = BytesMut::new();
    let mut last_sent = Instant::now();
    let mut pace = Pacer::new(ctx.config.replication.replica_catchup_bytes_per_sec);
    loop {
        if !tracker.is_current(id)
            || ctx.is_shutting_down()
            || ctx.role() != Role::Master
            || ctx.is_superseded()
        {
            return Ok(());
        }
        let store = ctx.store();
        if next > tracker.acked(ReplicaAck::Received) + WINDOW_BYTES {
            let wait = tracker.wait_acked_beyond(next - WINDOW_BYTES, id);
            if glommio::timer::timeout(HEARTBEAT, async {
                wait.await;
                Ok(())
            })
            .await
            .is_err()
            {
                send_heartbeat(ctx, writer, &mut out).await?;
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
                pace = Pacer::new(ctx.config.replication.replica_catchup_bytes_per_sec);
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
                    confirmed: ctx.confirmed(),
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
                let confirmed = ctx.confirmed();
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
                if woke.is_err() || ctx.confirmed() != confirmed {
                    send_heartbeat(ctx, writer, &mut out).await?;
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
    ctx: &ShardContext,
    writer: &mut WriteHalf<TcpStream>,
    out: &mut BytesMut,
) -> Result<(), String> {
    out.clear();
    ReplData {
        position: 0,
        master_end: ctx.store().watermarks().appended.0,
        master_time_ms: now_ms(),
        confirmed: ctx.confirmed(),
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
    ctx: Rc<ShardContext>,
    id: u64,
    mut reader: ReadHalf<TcpStream>,
    mut buf: BytesMut,
) {
    let tracker = ctx.tracker();
    let mut chunk = vec![0u8; 16 << 10];
    let outcome: Result<(), String> = async {
        let mut last_heard = Instant::now();
        loop {
            while let Some(frame) = Frame::decode(&mut buf).map_err(|e| e.to_string())? {
                on_follower_frame(&ctx, id, &frame)?;
            }
            if !tracker.is_current(id) || ctx.is_shutting_down() {
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
            log::warn!("shard {}: follower link: {e}", ctx.shard);
        }
    }
    tracker.end_session(id);
}

fn on_follower_frame(ctx: &ShardContext, id: u64, frame: &Frame) -> Result<(), String> {
    let ack =
        ReplAck::from_frame(frame).map_err(|e| format!("bad frame from the follower: {e}"))?;
    let tracker = ctx.tracker();
    tracker.on_ack(id, ack.received, ack.durable);
    if ctx.config.replication.mode == ReplicationMode::SyncMaster {
        ctx.raise_visible_cap();
    }
    Ok(())
}
