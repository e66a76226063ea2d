//! One client connection.
//!
//! A short loop around the sans-io codec: read bytes into a reused buffer, decode every
//! complete frame, run each request in its own task (so a connection pipelines and responses
//! may complete out of order, matched by request id), and batch the responses into one write.
//!
//! Backpressure: each request holds a permit from the connection's in-flight budget (a count
//! and a byte total); when the budget is spent the loop stops reading, so a flooding client
//! slows down instead of growing the broker's memory.
//!
//! A frame that cannot be decoded gets an error reply (with its request id when the preamble
//! was readable) and the connection is closed: after a framing error the byte stream cannot be
//! trusted. Other connections are untouched.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures_lite::future;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use crate::protocol::{self, Frame, Request, WireError};
use crate::server::handlers;
use crate::shard::ShardContext;

/// Bytes read from the socket per read call; also the initial decode buffer size.
const READ_CHUNK_BYTES: usize = 64 << 10;

pub async fn serve(ctx: Rc<ShardContext>, stream: TcpStream) {
    ctx.connection_opened();
    let _ = stream.set_nodelay(true);
    // For the replication handshake: only the configured peer may follow.
    let remote = stream.peer_addr().ok();
    let (mut reader, writer) = stream.split();
    let outbox = Rc::new(Outbox::new());
    let writer_task = glommio::spawn_local(write_loop(writer, outbox.clone()));
    let budget = Budget::new(&ctx);
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let handoff = match read_loop(&ctx, &mut reader, &mut buf, &outbox, &budget).await {
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
                ctx.clone(),
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
            let _ = writer.close().await;
        }
        _ => {}
    }
    ctx.connection_closed();
}

/// The connection's in-flight budget.
struct Budget {
    requests: Rc<Semaphore>,
    bytes: Rc<Semaphore>,
    max_requests: u64,
    max_bytes: u64,
}

impl Budget {
    fn new(ctx: &ShardContext) -> Budget {
        let max_requests = u64::from(ctx.config.max_inflight_requests_per_connection);
        let max_bytes = ctx.config.max_inflight_bytes_per_connection;
        Budget {
            requests: Rc::new(Semaphore::new(max_requests)),
            bytes: Rc::new(Semaphore::new(max_bytes)),
            max_requests,
            max_bytes,
        }
    }

    /// Waits until every in-flight request has finished.
    async fn drain(&self) {
        let _ = self.requests.acquire(self.max_requests).await;
        let _ = self.bytes.acquire(self.max_bytes).await;
    }
}

/// Why a connection was closed by the broker.
#[derive(Debug)]
enum Closed {
    ByPeer,
    Io(std::io::Error),
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
            Closed::BadFrame(e) => write!(f, "bad frame: {e}"),
            Closed::PartialFrameTimeout => write!(f, "frame left half-sent"),
            Closed::Shutdown => write!(f, "broker shutting down"),
            Closed::Replication(..) => write!(f, "handed to replication"),
        }
    }
}

async fn read_loop(
    ctx: &Rc<ShardContext>,
    reader: &mut ReadHalf<TcpStream>,
    buf: &mut BytesMut,
    outbox: &Rc<Outbox>,
    budget: &Budget,
) -> Result<(), Closed> {
    let mut first = true;
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let partial_timeout = Duration::from_millis(ctx.config.partial_frame_timeout_ms);
    loop {
        loop {
            match Frame::decode(buf) {
                Ok(Some(frame)) => {
                    dispatch(ctx, frame, first, outbox, budget).await?;
                    first = false;
                }
                Ok(None) => break,
                Err(e) => {
                    // Without a readable preamble there is no request id: answer with 0 so
                    // the client still learns why it is being disconnected.
                    let request_id = e.request_id().unwrap_or(0);
                    outbox.push(&protocol::error_frame(
                        0,
                        request_id,
                        e.code(),
                        &e.to_string(),
                    ));
                    return Err(Closed::BadFrame(e));
                }
            }
        }
        let read = async {
            if buf.is_empty() {
                Some(reader.read(&mut chunk).await)
            } else {
                glommio::timer::timeout(partial_timeout, async {
                    Ok(reader.read(&mut chunk).await)
                })
                .await
                .ok()
            }
        };
        let shutdown = async {
            ctx.shutdown_requested().await;
            None
        };
        match future::or(async { Some(read.await) }, shutdown).await {
            None => return Err(Closed::Shutdown),
            Some(None) => return Err(Closed::PartialFrameTimeout),
            Some(Some(Ok(0))) => return Err(Closed::ByPeer),
            Some(Some(Ok(n))) => buf.extend_from_slice(&chunk[..n]),
            Some(Some(Err(e))) => return Err(Closed::Io(e)),
        }
    }
}

/// Starts one request under the budget. Waiting for a permit here is the backpressure.
async fn dispatch(
    ctx: &Rc<ShardContext>,
    frame: Frame,
    first: bool,
    outbox: &Rc<Outbox>,
    budget: &Budget,
) -> Result<(), Closed> {
    let request = match Request::from_frame(&frame) {
        Ok(Request::ReplFollow(req)) if first => {
            return Err(Closed::Replication(frame.request_id, Box::new(req)))
        }
        Ok(r) => r,
        Err(e) => {
            // Unknown opcode or a header that does not verify: the client speaks something
            // we do not, so answer and hang up rather than guess at the next frame.
            outbox.push(&protocol::error_frame(
                frame.opcode,
                frame.request_id,
                e.code(),
                &e.to_string(),
            ));
            return Err(Closed::BadFrame(e));
        }
    };
    let body_bytes = frame.body.len() as u64;
    let request_permit = budget
        .requests
        .acquire_static_permit(1)
        .await
        .map_err(|_| Closed::Shutdown)?;
    let bytes_permit = budget
        .bytes
        .acquire_static_permit(body_bytes)
        .await
        .map_err(|_| Closed::Shutdown)?;
    let oneway = frame.flags.is_oneway();
    let ctx = ctx.clone();
    let outbox = outbox.clone();
    glommio::spawn_local(async move {
        let response = handlers::handle_request(&ctx, frame, request).await;
        if !oneway {
            outbox.push(&response);
        }
        drop(request_permit);
        drop(bytes_permit);
    })
    .detach();
    Ok(())
}

/// Encoded responses waiting for the writer. Handlers encode straight into one buffer, so
/// responses that complete together leave in one write.
struct Outbox {
    buf: RefCell<BytesMut>,
    wake_tx: LocalSender<()>,
    wake_rx: LocalReceiver<()>,
    closed: Cell<bool>,
}

impl Outbox {
    fn new() -> Outbox {
        let (wake_tx, wake_rx) = local_channel::new_bounded(1);
        Outbox {
            buf: RefCell::new(BytesMut::with_capacity(READ_CHUNK_BYTES)),
            wake_tx,
            wake_rx,
            closed: Cell::new(false),
        }
    }

    fn push(&self, frame: &Frame) {
        frame.encode(&mut self.buf.borrow_mut());
        // A full wake channel means the writer is already due to run.
        let _ = self.wake_tx.try_send(());
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
        let pending = outbox.buf.borrow_mut().split();
        if !pending.is_empty() {
            if writer.write_all(&pending).await.is_err() {
                // The peer is gone; responses still produced are dropped with the outbox.
                let _ = writer.close().await;
                return None;
            }
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
