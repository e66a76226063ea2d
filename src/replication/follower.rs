//! The slave side: each shard of a slave follows the same shard of its master.
//!
//! [`follow`] runs for as long as the shard is a slave. Each round:
//! 1. Ask the master's shard 0 (`--master`) for its layout (`BrokerInfo`): the shard count
//!    must match ours; the answer names the address of our shard on the master. Shard 0 also
//!    copies the master's topic table, so fetches on the slave know the topics.
//! 2. Send `ReplFollow` (our log end and epoch history) to that shard. The master answers with
//!    where our logs stop agreeing; if that is before our end we close the store, truncate the
//!    log there (recovery zeroes the tail and rebuilds the indexes) and reopen it. Only then is
//!    the master's epoch history adopted: the other order could leave a diverged tail that
//!    claims the master's epochs after a crash.
//! 3. Append every `ReplData` with [`ShardStore::append_replicated`] (CRCs and positions
//!    checked) and acknowledge `received` (appended) and `durable` (fdatasync covered it). When
//!    the master wants durable acks (SYNC_MASTER, durable), or our own flush mode is
//!    SYNC_FLUSH, a syncer requests an fdatasync of what arrived (one group commit covers many
//!    batches); under our ASYNC_FLUSH otherwise, the flusher's interval decides.
//!
//! A failed round is retried with backoff (100 ms doubling to 2 s); a refusal (layout
//! mismatch, fencing) is logged as an error and retried slowly, since only an operator can fix
//! it. A promotion ends the loop (see `replication::promotion`).

use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures_lite::future;
use glommio::net::TcpStream;

use crate::protocol::{
    ErrorCode, Frame, Opcode, RemoteError, ReplAck, ReplData, ReplFollowRequest, Request, Response,
};
use crate::replication::epoch::EpochHistory;
use crate::replication::master::{HEARTBEAT, LINK_TIMEOUT};
use crate::replication::state::Replication;
use crate::replication::ReplicationError;
use crate::shard::topic_writes;
use crate::shard::topics::TopicChange;
use crate::storage::{FlushMode, LogPosition, ShardStore};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TOPIC_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Follows the master until this shard is promoted or the broker shuts down.
pub async fn follow(repl: Rc<Replication>) {
    let Some(master) = repl.ctx.config.replication.master.clone() else {
        log::error!(
            "shard {}: role slave without a master address",
            repl.ctx.shard
        );
        return;
    };
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    while repl.following() {
        let id = repl.tracker().begin_session(1);
        let outcome = follow_once(&repl, id, &master).await;
        repl.tracker().end_session(id);
        if !repl.following() {
            break;
        }
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                let msg = e.to_string();
                // A master that stays down would otherwise fill the log.
                if msg != last_error {
                    match e {
                        ReplicationError::Refused { .. } => {
                            log::error!("shard {}: {msg}", repl.ctx.shard)
                        }
                        _ => log::warn!("shard {}: {msg}; retrying", repl.ctx.shard),
                    }
                    last_error = msg;
                }
                if matches!(e, ReplicationError::Refused { .. }) {
                    backoff = Duration::from_secs(5);
                }
            }
        }
        let wait = glommio::timer::sleep(backoff);
        future::or(wait, async {
            while repl.following() {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        backoff = (backoff * 2).min(Duration::from_secs(2)).max(backoff);
    }
    log::info!("shard {}: stopped following {master}", repl.ctx.shard);
}

/// `host:port` to one socket address. glommio's `TcpStream::connect` with a name looks it up
/// synchronously on the executor (stalling every connection of the shard for as long as DNS
/// takes) and panics when the lookup returns no address; a literal address is parsed here and
/// a name is looked up on the executor's blocking thread.
async fn resolve(peer: &str) -> std::io::Result<std::net::SocketAddr> {
    if let Ok(addr) = peer.parse() {
        return Ok(addr);
    }
    let name = peer.to_string();
    glommio::executor()
        .spawn_blocking(move || {
            std::net::ToSocketAddrs::to_socket_addrs(&name)?
                .next()
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{name} resolves to no address"),
                    )
                })
        })
        .await
}

/// A framed connection to one address of the master (or, for the peer watch, the peer).
pub(crate) struct Link {
    peer: String,
    reader: ReadHalf<TcpStream>,
    writer: WriteHalf<TcpStream>,
    buf: BytesMut,
    next_id: u64,
}

impl Link {
    pub(crate) async fn connect(peer: &str) -> Result<Link, ReplicationError> {
        let io = |source| ReplicationError::Io {
            peer: peer.to_string(),
            source,
        };
        let addr = resolve(peer).await.map_err(io)?;
        let stream = glommio::timer::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|e| {
                io(match e {
                    glommio::GlommioError::IoError(e) => e,
                    glommio::GlommioError::TimedOut(d) => std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {d:?}"),
                    ),
                    other => std::io::Error::other(other.to_string()),
                })
            })?;
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.split();
        Ok(Link {
            peer: peer.to_string(),
            reader,
            writer,
            buf: BytesMut::with_capacity(64 << 10),
            next_id: 1,
        })
    }

    pub(crate) fn protocol(&self, detail: impl Into<String>) -> ReplicationError {
        ReplicationError::Protocol {
            peer: self.peer.clone(),
            detail: detail.into(),
        }
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), ReplicationError> {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        self.writer
            .write_all(&out)
            .await
            .map_err(|source| ReplicationError::Io {
                peer: self.peer.clone(),
                source,
            })
    }

    /// The next frame, waiting at most `timeout`.
    async fn recv(&mut self, timeout: Duration) -> Result<Frame, ReplicationError> {
        let mut chunk = vec![0u8; 256 << 10];
        loop {
            if let Some(f) =
                Frame::decode(&mut self.buf).map_err(|e| self.protocol(e.to_string()))?
            {
                return Ok(f);
            }
            let n =
                glommio::timer::timeout(timeout, async { Ok(self.reader.read(&mut chunk).await) })
                    .await
                    .map_err(|_| self.protocol(format!("nothing heard for {timeout:?}")))?
                    .map_err(|source| ReplicationError::Io {
                        peer: self.peer.clone(),
                        source,
                    })?;
            if n == 0 {
                return Err(self.protocol("the master closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One request, one response (errors from the master become `Refused` or `Protocol`).
    pub(crate) async fn call(
        &mut self,
        request: Request,
    ) -> Result<(Response, Bytes), ReplicationError> {
        let opcode = request.opcode();
        let id = self.next_id;
        self.next_id += 1;
        self.send(&request.to_frame(id, Bytes::new())).await?;
        let frame = self.recv(CONNECT_TIMEOUT * 2).await?;
        if frame.status != 0 {
            let Some(e) = RemoteError::from_frame(&frame) else {
                return Err(self.protocol(format!("{opcode}: unreadable error response")));
            };
            let refused = matches!(e.code, ErrorCode::ReplicationRefused | ErrorCode::NotMaster);
            let detail = format!("{opcode}: {e}");
            return Err(if refused {
                ReplicationError::Refused {
                    peer: self.peer.clone(),
                    detail,
                }
            } else {
                self.protocol(detail)
            });
        }
        let response =
            Response::from_frame(opcode, &frame).map_err(|e| self.protocol(e.to_string()))?;
        Ok((response, frame.body))
    }
}

async fn follow_once(
    repl: &Rc<Replication>,
    id: u64,
    master: &str,
) -> Result<(), ReplicationError> {
    // 1. The master's layout (and, on shard 0, its topics).
    let mut control = Link::connect(master).await?;
    let info = match control.call(Request::BrokerInfo).await? {
        (Response::BrokerInfo(info), _) => info,
        (other, _) => return Err(control.protocol(format!("BrokerInfo answered with {other:?}"))),
    };
    if info.shards as usize != repl.ctx.shards {
        return Err(ReplicationError::Refused {
            peer: master.to_string(),
            detail: format!(
                "the master has {} shards and this slave {}; run both with the same --cores",
                info.shards, repl.ctx.shards
            ),
        });
    }
    let Some(address) = info.shard_addresses.get(repl.ctx.shard).cloned() else {
        return Err(control.protocol("BrokerInfo lists no address for our shard"));
    };
    if repl.ctx.shard == 0 {
        sync_topics(repl, &mut control).await?;
    }

    // 2. Agree on where to start.
    let store = repl.ctx.store();
    let w = store.watermarks();
    let our_end = w.appended.0;
    let mut link = Link::connect(&address).await?;
    let request = Request::ReplFollow(ReplFollowRequest {
        shard: repl.ctx.shard as u32,
        shards: repl.ctx.shards as u32,
        segment_bytes: repl.ctx.config.storage.segment_bytes,
        log_end: our_end,
        epochs: repl.epochs().entries().to_vec(),
        log_durable: w.durable.0,
        node_id: repl.node_id(),
    });
    let answer = match link.call(request).await? {
        (Response::ReplFollowing(a), _) => a,
        (other, _) => return Err(link.protocol(format!("ReplFollow answered with {other:?}"))),
    };
    let Some(history) = EpochHistory::from_entries(answer.epochs.clone()) else {
        return Err(link.protocol("the master's epoch history is not ordered"));
    };
    if answer.reset {
        if answer.start % repl.ctx.config.storage.segment_bytes != 0 {
            return Err(link.protocol(format!(
                "the master asks for a reset to {}, which is not a segment boundary",
                answer.start
            )));
        }
    } else if answer.start > our_end {
        return Err(link.protocol(format!(
            "the master would stream from {} but our log ends at {our_end}",
            answer.start
        )));
    }
    if history.current() < repl.epoch() {
        return Err(ReplicationError::Refused {
            peer: address,
            detail: format!(
                "the master's epoch {} is older than ours {}: it was superseded",
                history.current(),
                repl.epoch()
            ),
        });
    }
    if answer.reset {
        log::warn!(
            "shard {}: the master keeps nothing below {} and our log (ending at {our_end}) \
             shares nothing with it from there: dropping our log and starting an empty one at {}",
            repl.ctx.shard,
            answer.start,
            answer.start
        );
        reset_store(repl, answer.start).await?;
    } else if answer.start < our_end {
        log::warn!(
            "shard {}: our log diverged from the master's at {}; truncating {} bytes",
            repl.ctx.shard,
            answer.start,
            our_end - answer.start
        );
        truncate_store(repl, answer.start).await?;
    }
    repl.set_epochs(history).await?;
    let store = repl.ctx.store();
    let w = store.watermarks();
    let start = w.appended.0;
    repl.tracker()
        .streaming(id, start, w.durable.0, answer.master_end);
    repl.tracker().note_end(answer.master_end);
    log::info!(
        "shard {}: following {address} from {start} (master log ends at {}, epoch {})",
        repl.ctx.shard,
        answer.master_end,
        repl.epoch()
    );

    // 3. Stream.
    let Link {
        peer,
        mut reader,
        writer,
        buf,
        ..
    } = link;
    // Our own SYNC_FLUSH means "sync what arrives" as it does for produce requests (nothing
    // else would ask our flusher to); a master that waits for durable acks needs the same.
    let eager_sync =
        answer.want_durable || repl.ctx.config.storage.flush_mode == FlushMode::SyncFlush;
    let acks = glommio::spawn_local(send_acks(repl.clone(), id, writer, eager_sync));
    let topics = (repl.ctx.shard == 0)
        .then(|| glommio::spawn_local(keep_topics_synced(repl.clone(), id, control)));
    let result = receive(repl, id, &peer, &mut reader, buf).await;
    repl.tracker().end_session(id);
    let _ = acks.await;
    if let Some(t) = topics {
        let _ = t.await;
    }
    result
}

/// Appends what the master sends until the link fails or the session ends.
async fn receive(
    repl: &Rc<Replication>,
    id: u64,
    peer: &str,
    reader: &mut ReadHalf<TcpStream>,
    mut buf: BytesMut,
) -> Result<(), ReplicationError> {
    let protocol = |detail: String| ReplicationError::Protocol {
        peer: peer.to_string(),
        detail,
    };
    let tracker = repl.tracker();
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        while let Some(frame) = Frame::decode(&mut buf).map_err(|e| protocol(e.to_string()))? {
            if frame.opcode != Opcode::ReplData.as_u16() {
                return Err(protocol(format!(
                    "unexpected opcode {} on the stream",
                    frame.opcode
                )));
            }
            let data = ReplData::from_frame(&frame).map_err(|e| protocol(e.to_string()))?;
            tracker.note_end(data.master_end);
            // Reads stop at what the master confirmed (the store also keeps them below our
            // durable mark): the rest may still be truncated if the master fails over.
            repl.confirm_up_to(data.confirmed);
            if !frame.body.is_empty() {
                let store = repl.ctx.store();
                let (end, topics) = store
                    .append_replicated(LogPosition(data.position), &frame.body)
                    .await?;
                // `%SYS%` queues are the broker's own and never in the topic table.
                if topics
                    .iter()
                    .any(|t| !t.starts_with("%SYS%") && repl.ctx.topic(t).is_none())
                {
                    // Before acknowledging, so a caught-up slave always knows its topics (and
                    // a promoted one can serve them).
                    request_topic_sync(repl).await;
                }
                tracker.note_end(end.0.max(data.master_end));
                tracker.on_progress(id, end.0, store.watermarks().durable.0);
            }
        }
        if !tracker.is_current(id) || !repl.following() {
            return Ok(());
        }
        let read = async {
            glommio::timer::timeout(LINK_TIMEOUT, async { Ok(reader.read(&mut chunk).await) })
                .await
                .map(Some)
        };
        // Wake up for a promotion or shutdown without waiting for the master.
        let stop = async {
            while tracker.is_current(id) && repl.following() {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            Ok(None)
        };
        match future::or(read, stop).await {
            Ok(None) => return Ok(()),
            Err(_) => return Err(protocol(format!("nothing heard for {LINK_TIMEOUT:?}"))),
            Ok(Some(Ok(0))) => return Err(protocol("the master closed the link".into())),
            Ok(Some(Ok(n))) => buf.extend_from_slice(&chunk[..n]),
            Ok(Some(Err(source))) => {
                return Err(ReplicationError::Io {
                    peer: peer.to_string(),
                    source,
                })
            }
        }
    }
}

/// Acknowledges progress as it happens (and at least every heartbeat); with `eager_sync`,
/// also asks our flusher to make what arrived durable at once (group-committed).
async fn send_acks(
    repl: Rc<Replication>,
    id: u64,
    mut writer: WriteHalf<TcpStream>,
    eager_sync: bool,
) {
    let tracker = repl.tracker();
    let mut sent = (u64::MAX, u64::MAX);
    let mut out = BytesMut::new();
    let syncer = eager_sync.then(|| {
        let repl = repl.clone();
        glommio::spawn_local(async move {
            while repl.tracker().is_current(id) {
                let store = repl.ctx.store();
                let w = store.watermarks();
                if w.durable < w.appended {
                    if store.wait_durable(w.appended).await.is_err() {
                        break;
                    }
                } else {
                    let _ = glommio::timer::timeout(HEARTBEAT, async {
                        store.wait_appended_beyond(w.appended).await;
                        Ok(())
                    })
                    .await;
                }
            }
        })
    });
    while tracker.is_current(id) {
        let store = repl.ctx.store();
        let w = store.watermarks();
        let now = (w.appended.0, w.durable.0);
        tracker.on_progress(id, now.0, now.1);
        if now != sent {
            out.clear();
            ReplAck {
                received: now.0,
                durable: now.1,
            }
            .to_frame(0)
            .encode(&mut out);
            if writer.write_all(&out).await.is_err() {
                break;
            }
            sent = now;
        }
        let _ = glommio::timer::timeout(HEARTBEAT, async {
            store
                .wait_progress_beyond(LogPosition(now.0), LogPosition(now.1))
                .await;
            Ok(())
        })
        .await;
        if sent == now {
            // Heartbeat: say it again so the master knows we are alive.
            sent = (u64::MAX, u64::MAX);
        }
    }
    tracker.end_session(id);
    let _ = writer.close().await;
    if let Some(s) = syncer {
        let _ = s.await;
    }
}

/// Closes the store, truncates its log to `at` and reopens it.
async fn truncate_store(repl: &Rc<Replication>, at: u64) -> Result<(), ReplicationError> {
    let old = repl.ctx.store();
    old.close().await?;
    let (store, report) = ShardStore::open_truncated(
        &repl.ctx.shard_dir(),
        repl.ctx.config.storage.clone(),
        LogPosition(at),
    )
    .await?;
    log::warn!(
        "shard {}: reopened after truncation: {report}",
        repl.ctx.shard
    );
    repl.ctx.set_store(store);
    // What was confirmed beyond `at` belonged to the diverged history: the records written
    // there next are confirmed only when the new master says so.
    repl.truncated_to(at);
    Ok(())
}

/// Closes the store, drops its whole log and opens an empty one starting at `base`.
async fn reset_store(repl: &Rc<Replication>, base: u64) -> Result<(), ReplicationError> {
    let old = repl.ctx.store();
    old.close().await?;
    let (store, report) = ShardStore::open_reset(
        &repl.ctx.shard_dir(),
        repl.ctx.config.storage.clone(),
        LogPosition(base),
    )
    .await?;
    log::warn!(
        "shard {}: reopened empty at {base}: {report}",
        repl.ctx.shard
    );
    repl.ctx.set_store(store);
    // Nothing is confirmed until the master says so.
    repl.start_confirmed_at(base);
    Ok(())
}

/// Merges every topic the master lists into the local table (shard 0 is its writer). The
/// topic log (`broker::topic_log`) brings each change in log order; this copy is the
/// catch-all for topics whose records retention dropped before this slave read them. A
/// merge never undoes a deletion, so a list answered just before one cannot revive it.
async fn sync_topics(repl: &Rc<Replication>, control: &mut Link) -> Result<(), ReplicationError> {
    let topics = match control.call(Request::ListTopics).await? {
        (Response::Topics(t), _) => t,
        (other, _) => return Err(control.protocol(format!("ListTopics answered with {other:?}"))),
    };
    for t in topics {
        let change = TopicChange::Create {
            name: t.name.clone(),
            queues: t.queues,
        };
        topic_writes::merge_change(&repl.ctx, &change)
            .await
            .map_err(|e| control.protocol(format!("copying topic {}: {e}", t.name)))?;
    }
    Ok(())
}

/// Has shard 0 copy the master's topic table now; waits until it did (or failed).
async fn request_topic_sync(repl: &Rc<Replication>) {
    if repl.ctx.shard == 0 {
        sync_topics_now(repl).await;
        return;
    }
    if let Err(e) = repl
        .ctx
        .mesh
        .call(0, crate::shard::mesh::MeshRequest::SyncTopics)
        .await
    {
        log::warn!(
            "shard {}: asking shard 0 for a topic sync: {e}",
            repl.ctx.shard
        );
    }
}

/// Shard 0: copies the master's topic table over a fresh control connection.
pub async fn sync_topics_now(repl: &Rc<Replication>) {
    let Some(master) = repl.ctx.config.replication.master.clone() else {
        return;
    };
    let r = async {
        let mut link = Link::connect(&master).await?;
        sync_topics(repl, &mut link).await
    }
    .await;
    if let Err(e) = r {
        log::warn!("shard 0: copying the master's topics: {e}");
    }
}

async fn keep_topics_synced(repl: Rc<Replication>, id: u64, mut control: Link) {
    while repl.tracker().is_current(id) {
        // Short naps, so the end of the session does not wait for a whole interval.
        let started = std::time::Instant::now();
        while started.elapsed() < TOPIC_SYNC_INTERVAL && repl.tracker().is_current(id) {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        if !repl.tracker().is_current(id) {
            break;
        }
        if let Err(e) = sync_topics(&repl, &mut control).await {
            log::debug!("shard 0: topic sync: {e}");
            // The stream decides whether the master is gone; reconnect the control link.
            match Link::connect(&control.peer).await {
                Ok(l) => control = l,
                Err(_) => continue,
            }
        }
    }
}
