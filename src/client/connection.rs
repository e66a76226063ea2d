//! One pipelined connection to one broker port, usable from any thread.
//!
//! Plain blocking I/O and one reader thread per connection: no async runtime is needed, so a
//! plain Rust program (or a test) can use it directly. Requests are written under a mutex and
//! may be in flight many at a time; the reader thread matches each response to its request by
//! id and hands it to whoever waits (a blocking [`Pending::wait`] or a callback).

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::client::ClientError;
use crate::protocol::{Frame, FrameFlags, Opcode, RemoteError, Request, Response};

/// Default time to wait for a response: above the broker's default flush timeout (5 s), so a
/// slow flush reaches the client as FLUSH_DISK_TIMEOUT rather than a client-side timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block on a broker that takes no bytes (its socket buffer full: a
/// peer that is gone without a reset, a cable pulled). The connection is closed then, as a
/// write that stopped part-way leaves the stream unusable.
pub const WRITE_TIMEOUT: Duration = DEFAULT_REQUEST_TIMEOUT;

/// What a response is delivered to.
type Callback = Box<dyn FnOnce(Result<(Response, Bytes), ClientError>) + Send>;

enum Waiter {
    Channel(
        u16,
        mpsc::SyncSender<Result<(Response, Bytes), ClientError>>,
    ),
    Callback(u16, Callback),
}

impl Waiter {
    fn complete(self, outcome: Result<Frame, ClientError>) {
        match self {
            Waiter::Channel(op, tx) => {
                let _ = tx.send(outcome.and_then(|f| decode_response(op, f)));
            }
            Waiter::Callback(op, cb) => cb(outcome.and_then(|f| decode_response(op, f))),
        }
    }
}

fn decode_response(opcode: u16, frame: Frame) -> Result<(Response, Bytes), ClientError> {
    if let Some(remote) = RemoteError::from_frame(&frame) {
        return Err(ClientError::Remote(remote));
    }
    let opcode = Opcode::from_u16(opcode).expect("requests are sent with known opcodes");
    let response = Response::from_frame(opcode, &frame)?;
    Ok((response, frame.body))
}

struct Shared {
    pending: Mutex<Pendings>,
}

struct Pendings {
    waiters: HashMap<u64, Waiter>,
    /// Set once the reader has stopped; later requests fail at once with this reason.
    closed: Option<String>,
}

/// A pipelined connection. Cheap to share by reference across threads.
pub struct Connection {
    writer: Mutex<TcpStream>,
    /// The same socket, for [`Connection::close`]: a writer blocked in a write holds `writer`.
    control: TcpStream,
    shared: Arc<Shared>,
    next_request_id: AtomicU64,
    peer: String,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A request in flight; [`Pending::wait`] blocks for its response.
pub struct Pending {
    rx: mpsc::Receiver<Result<(Response, Bytes), ClientError>>,
}

impl Pending {
    pub fn wait(self, timeout: Duration) -> Result<(Response, Bytes), ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ClientError::Timeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::ConnectionClosed(
                "response channel dropped".into(),
            )),
        }
    }
}

impl Connection {
    pub fn connect(addr: &str) -> Result<Connection, ClientError> {
        Self::connect_timeout(addr, DEFAULT_CONNECT_TIMEOUT)
    }

    pub fn connect_timeout(addr: &str, timeout: Duration) -> Result<Connection, ClientError> {
        let io = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(io)?
            .next()
            .ok_or_else(|| io(std::io::Error::other("address resolves to nothing")))?;
        let stream = TcpStream::connect_timeout(&sockaddr, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io)?;
        let read_half = stream.try_clone().map_err(io)?;
        let control = stream.try_clone().map_err(io)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pendings {
                waiters: HashMap::new(),
                closed: None,
            }),
        });
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name(format!("ringmq-client-{addr}"))
            .spawn(move || read_loop(read_half, reader_shared))
            .map_err(io)?;
        Ok(Connection {
            writer: Mutex::new(stream),
            control,
            shared,
            next_request_id: AtomicU64::new(1),
            peer: addr.to_string(),
            reader: Some(reader),
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Closes the connection: a write blocked on it returns, every request in flight fails
    /// with `reason` (as later ones do). For a broker presumed dead, which may never answer
    /// nor reset the connection (a partition): waiting for TCP to give up takes many minutes.
    pub fn close(&self, reason: &str) {
        {
            let mut p = self.shared.pending.lock().expect("pending lock");
            p.closed.get_or_insert_with(|| reason.to_string());
        }
        // Wakes the reader (its read returns 0) and any blocked writer (EPIPE).
        let _ = self.control.shutdown(Shutdown::Both);
    }

    /// Sends a request and returns a handle to wait for its response.
    pub fn send(&self, request: &Request, body: Bytes) -> Result<Pending, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send_with(
            request,
            body,
            Waiter::Channel(request.opcode().as_u16(), tx),
        )?;
        Ok(Pending { rx })
    }

    /// Sends a request; `callback` runs on the connection's reader thread with the outcome
    /// (a connection loss also completes it, with an error). Keep it short.
    pub fn send_callback(
        &self,
        request: &Request,
        body: Bytes,
        callback: impl FnOnce(Result<(Response, Bytes), ClientError>) + Send + 'static,
    ) -> Result<(), ClientError> {
        let waiter = Waiter::Callback(request.opcode().as_u16(), Box::new(callback));
        self.send_with(request, body, waiter)
    }

    /// Sends a request the broker will not answer.
    pub fn send_oneway(&self, request: &Request, body: Bytes) -> Result<(), ClientError> {
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = request.to_frame(id, body);
        frame.flags = FrameFlags::ONEWAY;
        self.write_frame(&frame)
    }

    /// Sends a request and waits for its response.
    pub fn call(
        &self,
        request: &Request,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(Response, Bytes), ClientError> {
        self.send(request, body)?.wait(timeout)
    }

    fn send_with(&self, request: &Request, body: Bytes, waiter: Waiter) -> Result<(), ClientError> {
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let refused = {
            let mut p = self.shared.pending.lock().expect("pending lock");
            match p.closed.clone() {
                Some(reason) => Some((reason, waiter)),
                None => {
                    p.waiters.insert(id, waiter);
                    None
                }
            }
        };
        if let Some((reason, waiter)) = refused {
            // Already closed: the waiter completes too (as a failed write does), so a caller
            // that only watches its callback is not left waiting for an answer that cannot
            // come (a producer's batch then waited out its whole request timeout).
            waiter.complete(Err(ClientError::ConnectionClosed(reason.clone())));
            return Err(ClientError::ConnectionClosed(reason));
        }
        let frame = request.to_frame(id, body);
        if let Err(e) = self.write_frame(&frame) {
            let w = self
                .shared
                .pending
                .lock()
                .expect("pending lock")
                .waiters
                .remove(&id);
            // The reader may already have failed it; either way it completes exactly once.
            if let Some(w) = w {
                w.complete(Err(ClientError::ConnectionClosed(e.to_string())));
            }
            return Err(e);
        }
        Ok(())
    }

    fn write_frame(&self, frame: &Frame) -> Result<(), ClientError> {
        let mut buf = BytesMut::with_capacity(frame.encoded_len());
        frame.encode(&mut buf);
        let written = self.writer.lock().expect("writer lock").write_all(&buf);
        written.map_err(|e| {
            let reason = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "write to {}: the broker took no bytes for {:?}",
                    self.peer, WRITE_TIMEOUT
                ),
                _ => format!("write to {}: {e}", self.peer),
            };
            // Part of the frame may be on the wire: nothing more can be sent after it.
            self.close(&reason);
            ClientError::ConnectionClosed(reason)
        })
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .waiters
            .len()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.control.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            // The last reference can be dropped from a response callback, on the reader
            // thread itself: it must not wait for itself.
            if r.thread().id() != std::thread::current().id() {
                let _ = r.join();
            }
        }
    }
}

/// A connection's first frame buffer: small answers share it until it is used up.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Room a socket read asks for at least. Small, so that reads go on filling the buffer's
/// rest rather than each taking a fresh one while answers read before still hold the old one
/// (a kept message keeps its whole buffer).
const MIN_READ_ROOM: usize = 4 << 10;

/// One `recv(2)` straight into `buf`'s spare room, made as large as the frame being received
/// (its preamble announces it): a fetch's answer of 1 MiB lands in place, with no copy out of
/// a read chunk and no regrowth of `buf` on the way.
fn recv_into(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let want = Frame::announced_len(buf)
        .unwrap_or(0)
        .max(buf.len() + MIN_READ_ROOM);
    buf.reserve(want - buf.len());
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv(2) writes at most `spare.len()` bytes at the start of the spare room, and
    // only the bytes it reports written are then counted as part of `buf`.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            0,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: see above; `n <= spare.len()`.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

fn read_loop(stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let reason = 'outer: loop {
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(frame)) => {
                    let waiter = shared
                        .pending
                        .lock()
                        .expect("pending lock")
                        .waiters
                        .remove(&frame.request_id);
                    // A response nobody waits for (a timed-out request) is dropped.
                    if let Some(w) = waiter {
                        w.complete(Ok(frame));
                    }
                }
                Ok(None) => break,
                Err(e) => break 'outer format!("broker sent a bad frame: {e}"),
            }
        }
        match recv_into(&stream, &mut buf) {
            Ok(0) => break "the broker closed the connection".to_string(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break format!("read: {e}"),
        }
    };
    // Close our side at once rather than when the last user drops the connection: a socket
    // left half-closed keeps the dead broker's end of it (and so its port) alive, and the
    // restarted broker cannot bind it.
    let _ = stream.shutdown(Shutdown::Both);
    let (reason, waiters): (String, Vec<Waiter>) = {
        let mut p = shared.pending.lock().expect("pending lock");
        // A close by the user (`Connection::close`) names the cause, not its effect.
        let reason = p.closed.get_or_insert(reason).clone();
        (reason, p.waiters.drain().map(|(_, w)| w).collect())
    };
    for w in waiters {
        w.complete(Err(ClientError::ConnectionClosed(reason.clone())));
    }
}
