//! One client connection.
//!
//! A short loop around the sans-io codec: read bytes into a reused buffer, decode every
//! complete frame, run each request in its own task (so a connection pipelines and responses
//! may complete out of order, matched by request id), and batch the responses into one write.
//!
//! Bounds (see [`bounds`](super::bounds) for the accounting):
//! - Each request holds a permit from the connection's request count budget, and its bytes
//!   (body, then response until written to the socket) are charged to its byte budget. When
//!   either is spent the loop stops reading, so a flooding client, or one that never reads its
//!   responses, slows down into TCP backpressure instead of growing the broker's memory.
//! - Every byte charged to a connection's budget, and its read buffer, is also charged to the
//!   shard's budget, shared by all its connections. Past it a produce is answered
//!   SYSTEM_BUSY (before it is dispatched), other requests wait for room, and a reader
//!   between frames waits before reading the next; a reader inside a frame reads on.
//! - A frame must arrive whole within `partial_frame_timeout_ms` of its first byte: one
//!   deadline for the frame, not an idle timeout per read, so a client trickling a byte now
//!   and then cannot keep a half-sent frame (and its buffer) forever. Between frames a
//!   connection may idle as long as it likes.
//! - An idle connection costs a small read chunk and two parked tasks, no timer: shutdown
//!   reaches it through the listener's stop signal.
//!
//! A frame that cannot be decoded gets an error reply (with its request id when the preamble
//! was readable) and the connection is closed: after a framing error the byte stream cannot be
//! trusted. Other connections are untouched.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures_lite::future;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use crate::broker::Services;
use crate::protocol::{self, ErrorCode, Frame, Request, WireError};
use crate::server::bounds::{self, Admission, ByteBudget, ServerStats, ShardBudget};
use crate::server::handlers;
use crate::shard::ShardContext;

/// Bytes read from the socket per read call once a connection carries traffic.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Read chunk of a connection that has not yet filled one: most connections that sit idle
/// (pools, monitors) never need more, and 2,000 of them should not cost 128 MiB.
const IDLE_READ_CHUNK_BYTES: usize = 4 << 10;

pub async fn serve(
    services: Rc<Services>,
    stream: TcpStream,
    stop: Rc<Semaphore>,
    stats: Arc<ServerStats>,
    shard: Rc<ShardBudget>,
) {
    let ctx = services.shard.clone();
    ctx.connection_opened();
    let _ = stream.set_nodelay(true);
    // For the replication handshake: only the configured peer may follow.
    let remote = stream.peer_addr().ok();
    let (mut reader, writer) = stream.split();
    let budget = Rc::new(Budget::new(&ctx, shard.clone()));
    let outbox = Rc::new(Outbox::new(budget.clone(), stats.clone()));
    let writer_task = glommio::spawn_local(write_loop(writer, outbox.clone()));
    let mut buf = BytesMut::new();
    let conn = Conn {
        ctx: &ctx,
        services: &services,
        outbox: &outbox,
        budget: &budget,
        stop: &stop,
        stats: &stats,
        shard: &shard,
        read_charged: Cell::new(0),
    };
    let read_result = conn.read_loop(&mut reader, &mut buf).await;
    // The read buffer is either dropped or handed to replication, which has its own bounds.
    shard.release(conn.read_charged.replace(0));
    let handoff = match read_result {
        Err(Closed::Replication(request_id, req)) => Some((request_id, req)),
        Err(reason) => {
            log::debug!("shard {}: closing connection: {reason}", ctx.shard);
            None
        }
        Ok(()) => None,
    };
    budget.drain().await;
    outbox.close();
    let writer = writer_task.await;
    match (handoff, writer) {
        (Some((request_id, req)), Some(writer)) => {
            // The connection becomes a replication stream (see replication/master.rs).
            crate::replication::master::serve_follower(
                services.replication.clone(),
                request_id,
                *req,
                remote,
                reader,
                writer,
                buf,
            )
            .await;
        }
        (None, Some(mut writer)) => {
            // Half-close, then read until the client closes (bounded): closing the socket
            // with a client's bytes unread would send an RST, and an RST makes the client's
            // kernel drop the responses it has not read yet — the very answers (an error
            // reply, NOT_MASTER) that say why it is being disconnected.
            let _ = writer.close().await;
            linger(&mut reader).await;
        }
        _ => {}
    }
    ctx.connection_closed();
}

/// Longest a closing connection waits for the client to close its side.
const LINGER_MS: u64 = 2_000;
/// Most bytes a closing connection reads and throws away while it waits.
const LINGER_MAX_BYTES: usize = 1 << 20;

/// Reads and discards until the peer closes, `LINGER_MS` pass or `LINGER_MAX_BYTES` arrive.
async fn linger(reader: &mut ReadHalf<TcpStream>) {
    let mut chunk = vec![0u8; IDLE_READ_CHUNK_BYTES];
    let mut discarded = 0;
    let _ = glommio::timer::timeout(Duration::from_millis(LINGER_MS), async {
        while discarded < LINGER_MAX_BYTES {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
        Ok(())
    })
    .await;
}

/// The connection's in-flight budget: requests being handled, and bytes held for it.
struct Budget {
    requests: Rc<Semaphore>,
    max_requests: u64,
    bytes: ByteBudget,
    /// The largest record the store accepts: a fetch may return one whole, whatever it asked.
    max_record_bytes: u64,
}

impl Budget {
    fn new(ctx: &ShardContext, shard: Rc<ShardBudget>) -> Budget {
        let max_requests = u64::from(ctx.config.server.max_inflight_requests_per_connection);
        Budget {
            requests: Rc::new(Semaphore::new(max_requests)),
            max_requests,
            bytes: ByteBudget::with_shard(
                ctx.config.server.max_inflight_bytes_per_connection,
                Some(shard),
            ),
            max_record_bytes: ctx.config.storage.max_record_bytes,
        }
    }

    /// Waits until every in-flight request has finished (their responses may still be
    /// waiting for the writer).
    async fn drain(&self) {
        let _ = self.requests.acquire(self.max_requests).await;
    }
}

/// Why a connection was closed by the broker.
#[derive(Debug)]
enum Closed {
    ByPeer,
    Io(std::io::Error),
    /// Writing a response failed: nobody reads this connection any more.
    PeerGone,
    BadFrame(WireError),
    PartialFrameTimeout,
    Shutdown,
    /// The first frame was `ReplFollow`: hand the connection to the replication layer.
    Replication(u64, Box<protocol::ReplFollowRequest>),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::ByPeer => write!(f, "peer closed"),
            Closed::Io(e) => write!(f, "read error: {e}"),
            Closed::PeerGone => write!(f, "a response could not be written"),
            Closed::BadFrame(e) => write!(f, "bad frame: {e}"),
            Closed::PartialFrameTimeout => write!(f, "frame not complete by its deadline"),
            Closed::Shutdown => write!(f, "closed by the listener (shutdown, or superseded)"),
            Closed::Replication(..) => write!(f, "handed to replication"),
        }
    }
}

/// What the reading side of one connection works with.
struct Conn<'a> {
    ctx: &'a Rc<ShardContext>,
    services: &'a Rc<Services>,
    outbox: &'a Rc<Outbox>,
    budget: &'a Rc<Budget>,
    stop: &'a Rc<Semaphore>,
    stats: &'a Arc<ServerStats>,
    shard: &'a Rc<ShardBudget>,
    /// The read buffer's capacity as last charged to the shard.
    read_charged: Cell<u64>,
}

impl Conn<'_> {
    /// Charges (or releases) the change of the read buffer's capacity to the shard.
    fn charge_read_buffer(&self, buf: &BytesMut) {
        let now = buf.capacity() as u64;
        let was = self.read_charged.replace(now);
        if now > was {
            self.shard.charge(now - was);
        } else if was > now {
            self.shard.release(was - now);
        }
    }

    /// Waits until the shard's charge leaves room for `bytes` below the line of `admission`.
    /// Between frames ([`Admission::NewFrame`]) and at dispatch; never inside a frame, so a
    /// frame being read can always be finished.
    async fn wait_for_shard_room(&self, bytes: u64, admission: Admission) -> Result<(), Closed> {
        let limit = self.shard.limit(admission);
        if self.shard.has_room(bytes, limit) {
            return Ok(());
        }
        self.stats.note_shard_waiting(true);
        let room = self
            .shard
            .wait_for_room(bytes, limit, || self.outbox.is_broken());
        let stopped = async {
            let _ = self.stop.acquire(1).await;
            false
        };
        let got_room = future::or(room, stopped).await;
        self.stats.note_shard_waiting(false);
        if got_room {
            Ok(())
        } else if self.outbox.is_broken() {
            Err(Closed::PeerGone)
        } else {
            Err(Closed::Shutdown)
        }
    }

    async fn read_loop(
        &self,
        reader: &mut ReadHalf<TcpStream>,
        buf: &mut BytesMut,
    ) -> Result<(), Closed> {
        let mut first = true;
        let mut chunk = vec![0u8; IDLE_READ_CHUNK_BYTES];
        let frame_timeout = Duration::from_millis(self.ctx.config.server.partial_frame_timeout_ms);
        // When the frame now at the front of `buf` must be complete.
        let mut frame_deadline: Option<Instant> = None;
        loop {
            let mut decoded = false;
            loop {
                match Frame::decode(buf) {
                    Ok(Some(frame)) => {
                        decoded = true;
                        self.dispatch(frame, first).await?;
                        first = false;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Without a readable preamble there is no request id: answer with 0 so
                        // the client still learns why it is being disconnected.
                        let request_id = e.request_id().unwrap_or(0);
                        self.outbox.push(&protocol::error_frame(
                            0,
                            request_id,
                            e.code(),
                            &e.to_string(),
                        ));
                        return Err(Closed::BadFrame(e));
                    }
                }
            }
            // After decoding too: decode reserves room for the rest of a partial frame.
            self.stats.note_read_buffer(buf.capacity() as u64);
            self.charge_read_buffer(buf);
            frame_deadline = if buf.is_empty() {
                None
            } else if decoded || frame_deadline.is_none() {
                // The bytes left over begin a new frame: its clock starts now.
                Some(Instant::now() + frame_timeout)
            } else {
                frame_deadline
            };
            if self.outbox.is_broken() {
                return Err(Closed::PeerGone);
            }
            if buf.is_empty() {
                // An empty buffer that grew for a large frame gives its capacity back before
                // waiting: charged to the shard, the capacities of idle readers could fill
                // the budget by themselves, and then every reader would wait for the others
                // (seen: 8 producers of 7 MiB messages under a 16 MiB budget stopped forever).
                if buf.capacity() > READ_CHUNK_BYTES {
                    *buf = BytesMut::new();
                    self.charge_read_buffer(buf);
                }
                self.wait_for_shard_room(0, Admission::NewFrame).await?;
            }
            let n = self.read(reader, &mut chunk, frame_deadline).await?;
            buf.extend_from_slice(&chunk[..n]);
            self.stats.note_read_buffer(buf.capacity() as u64);
            self.charge_read_buffer(buf);
            if n == chunk.len() && chunk.len() < READ_CHUNK_BYTES {
                // This connection carries traffic: read in full-size chunks from now on.
                chunk = vec![0u8; READ_CHUNK_BYTES];
            }
        }
    }

    /// One socket read, ended early by shutdown or by the frame deadline.
    async fn read(
        &self,
        reader: &mut ReadHalf<TcpStream>,
        chunk: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<usize, Closed> {
        let read = async {
            match deadline {
                None => Some(reader.read(chunk).await),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    glommio::timer::timeout(left, async { Ok(reader.read(chunk).await) })
                        .await
                        .ok()
                }
            }
        };
        let stopped = async {
            // Never granted: the listener closes the semaphore at shutdown.
            let _ = self.stop.acquire(1).await;
            None
        };
        match future::or(async { Some(read.await) }, stopped).await {
            None => Err(Closed::Shutdown),
            Some(None) => {
                self.stats.count_partial_frame_timeout();
                Err(Closed::PartialFrameTimeout)
            }
            Some(Some(Ok(0))) => Err(Closed::ByPeer),
            Some(Some(Ok(n))) => Ok(n),
            Some(Some(Err(e))) => Err(Closed::Io(e)),
        }
    }

    /// Whether the shard's budget takes `reserved` bytes for this request. A produce never
    /// waits: past the whole budget it is answered SYSTEM_BUSY (retriable; the producer backs
    /// off and re-sends) and dropped. Anything else waits while the shard is past the line of
    /// its [`Admission`], below the produce line.
    async fn shard_admits(
        &self,
        frame: &Frame,
        request: &Request,
        reserved: u64,
    ) -> Result<bool, Closed> {
        let admission = Admission::of(request);
        if admission != Admission::Produce {
            self.wait_for_shard_room(reserved, admission).await?;
            return Ok(true);
        }
        if self.shard.has_room(reserved, self.shard.limit(admission)) {
            return Ok(true);
        }
        // The refusal itself is counted once, in the listener's stats (reason `shard_budget`);
        // the produce answer counts among the produce results like any other.
        self.stats.count_shard_busy();
        self.services
            .shard
            .metrics
            .count_produce_result(ErrorCode::SystemBusy.name());
        if !frame.flags.is_oneway() {
            let message = format!(
                "shard in-flight byte budget spent ({} of {} bytes held by requests and unread \
                 responses); retry later",
                self.shard.used(),
                self.shard.max()
            );
            self.outbox.push(&protocol::error_frame(
                frame.opcode,
                frame.request_id,
                ErrorCode::SystemBusy,
                &message,
            ));
        }
        Ok(false)
    }

    /// Starts one request under the budget. Waiting for room here is the backpressure.
    async fn dispatch(&self, frame: Frame, first: bool) -> Result<(), Closed> {
        let request = match Request::from_frame(&frame) {
            Ok(Request::ReplFollow(req)) if first => {
                return Err(Closed::Replication(frame.request_id, Box::new(req)))
            }
            Ok(r) => r,
            Err(e) => {
                // Unknown opcode or a header that does not verify: the client speaks something
                // we do not, so answer and hang up rather than guess at the next frame.
                self.outbox.push(&protocol::error_frame(
                    frame.opcode,
                    frame.request_id,
                    e.code(),
                    &e.to_string(),
                ));
                return Err(Closed::BadFrame(e));
            }
        };
        let budget = self.budget;
        let request_permit = budget
            .requests
            .acquire_static_permit(1)
            .await
            .map_err(|_| Closed::Shutdown)?;
        // The body is in memory until the handler is done; the response is charged before it
        // exists, for the most it can be, so a burst of requests cannot overshoot the budget.
        let reserved = frame.body.len() as u64
            + bounds::response_reserve_bytes(&request, budget.max_record_bytes);
        if !self.shard_admits(&frame, &request, reserved).await? {
            return Ok(());
        }
        if !budget.bytes.has_room(reserved) {
            self.stats.note_waiting(true);
            let room = budget
                .bytes
                .wait_for_room(reserved, || self.outbox.is_broken());
            let stopped = async {
                let _ = self.stop.acquire(1).await;
                false
            };
            let got_room = future::or(room, stopped).await;
            self.stats.note_waiting(false);
            if !got_room {
                return Err(if self.outbox.is_broken() {
                    Closed::PeerGone
                } else {
                    Closed::Shutdown
                });
            }
        }
        budget.bytes.charge(reserved);
        self.stats.note_budget(budget.bytes.used());
        let oneway = frame.flags.is_oneway();
        let services = self.services.clone();
        let outbox = self.outbox.clone();
        let budget = budget.clone();
        let stats = self.stats.clone();
        stats.request_started();
        glommio::spawn_local(async move {
            let response = handlers::handle_request(&services, frame, request).await;
            // Swap the reservation for the real size; no await in between, so the reader
            // cannot slip into the gap.
            budget.bytes.release(reserved);
            if !oneway {
                outbox.push(&response);
            }
            drop(request_permit);
            stats.request_finished();
        })
        .detach();
        Ok(())
    }
}

/// A response body at least this long is written from its own buffer rather than copied
/// into the outbox's (a fetch's records: one copy fewer per fetched byte, and no regrowing of
/// the outbox's buffer to hold it).
const UNCOPIED_BODY_BYTES: usize = 64 << 10;

/// Encoded responses waiting for the writer. Handlers encode straight into one buffer, so
/// responses that complete together leave in one write; a long body goes into `sealed`
/// as it is, behind what `buf` held. Every byte in them is charged to the connection's byte
/// budget until the writer has written it.
struct Outbox {
    /// Parts to write before `buf`, in order.
    sealed: RefCell<VecDeque<Bytes>>,
    buf: RefCell<BytesMut>,
    /// Bytes encoded and not yet written (including a write in progress). Counted here, apart
    /// from the budget, for [`ServerStats`].
    queued: Cell<u64>,
    budget: Rc<Budget>,
    stats: Arc<ServerStats>,
    wake_tx: LocalSender<()>,
    wake_rx: LocalReceiver<()>,
    closed: Cell<bool>,
    /// A write failed: responses are dropped from now on instead of piling up.
    broken: Cell<bool>,
}

impl Outbox {
    fn new(budget: Rc<Budget>, stats: Arc<ServerStats>) -> Outbox {
        let (wake_tx, wake_rx) = local_channel::new_bounded(1);
        Outbox {
            sealed: RefCell::new(VecDeque::new()),
            buf: RefCell::new(BytesMut::new()),
            queued: Cell::new(0),
            budget,
            stats,
            wake_tx,
            wake_rx,
            closed: Cell::new(false),
            broken: Cell::new(false),
        }
    }

    fn push(&self, frame: &Frame) {
        if self.broken.get() {
            return;
        }
        {
            let mut buf = self.buf.borrow_mut();
            if frame.body.len() >= UNCOPIED_BODY_BYTES {
                frame.encode_head(&mut buf);
                let mut sealed = self.sealed.borrow_mut();
                sealed.push_back(buf.split().freeze());
                sealed.push_back(frame.body.clone());
            } else {
                frame.encode(&mut buf);
            }
        }
        let len = frame.encoded_len() as u64;
        self.queued.set(self.queued.get() + len);
        self.stats.note_outbox_total(len as i64);
        self.budget.bytes.charge(len);
        self.stats.note_outbox(self.queued.get());
        self.stats.note_budget(self.budget.bytes.used());
        // A full wake channel means the writer is already due to run.
        let _ = self.wake_tx.try_send(());
    }

    /// The writer has handed `bytes` to the kernel.
    fn written(&self, bytes: u64) {
        self.queued.set(self.queued.get() - bytes);
        self.stats.note_outbox_total(-(bytes as i64));
        self.budget.bytes.release(bytes);
    }

    /// The peer cannot be written to: drop what waits and release its charge.
    fn set_broken(&self) {
        self.broken.set(true);
        self.sealed.borrow_mut().clear();
        *self.buf.borrow_mut() = BytesMut::new();
        let queued = self.queued.replace(0);
        self.stats.note_outbox_total(-(queued as i64));
        self.budget.bytes.release(queued);
    }

    fn is_broken(&self) -> bool {
        self.broken.get()
    }

    fn close(&self) {
        self.closed.set(true);
        let _ = self.wake_tx.try_send(());
    }
}

/// Writes responses until the outbox closes; returns the write half unless the peer is gone.
async fn write_loop(
    mut writer: WriteHalf<TcpStream>,
    outbox: Rc<Outbox>,
) -> Option<WriteHalf<TcpStream>> {
    loop {
        // Take the buffer itself, not a split of it, so a large response's allocation is freed
        // once written instead of lingering as spare capacity behind the next small one.
        let sealed = outbox.sealed.borrow_mut().pop_front();
        let pending = match sealed {
            Some(part) => part,
            None => std::mem::take(&mut *outbox.buf.borrow_mut()).freeze(),
        };
        if !pending.is_empty() {
            if writer.write_all(&pending).await.is_err() {
                // The peer is gone; responses still produced are dropped.
                outbox.set_broken();
                let _ = writer.close().await;
                return None;
            }
            outbox.written(pending.len() as u64);
            continue;
        }
        if outbox.closed.get() {
            break;
        }
        if outbox.wake_rx.recv().await.is_none() {
            break;
        }
    }
    let _ = writer.flush().await;
    Some(writer)
}
