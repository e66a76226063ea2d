//! The producer: SYNC, ASYNC (pipelined, batched by linger time and bytes) and ONEWAY sends.
//!
//! - Routing: the producer asks for the topic's route once and sends each batch straight to
//!   the shard that owns its queue (one connection per shard address), so no produce pays a
//!   cross-core hop inside the broker.
//! - Idempotence (on by default): the producer has a random 64-bit id, and each queue a
//!   sequence; a batch carries its base sequence, and a retry re-sends the same sequence, so
//!   the broker acks a batch it already stored with its original offsets instead of storing
//!   it twice.
//! - Retries: retriable errors (busy, flush timeout, lost connection, client timeout) are
//!   retried with exponential backoff and jitter, up to `retries` times; others surface at
//!   once.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::client::cluster::Cluster;
use crate::client::connection::DEFAULT_REQUEST_TIMEOUT;
use crate::client::ClientError;
use crate::message::{BatchBuilder, Message};
use crate::protocol::{
    Durability, ErrorCode, ProduceAck, ProduceRequest, Request, Response, RouteTable,
};

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Any shard's address; routes come from there.
    pub broker: String,
    /// Send a producer id and sequences so retries are de-duplicated. Default true.
    pub idempotent: bool,
    /// Attempts after the first for retriable errors. Default 5.
    pub retries: u32,
    /// First backoff; doubles per attempt up to `retry_backoff_max`, with ±50 % jitter.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long one attempt waits for its ack. Default 15 s (above the broker's flush timeout).
    pub request_timeout: Duration,
    /// ASYNC: a batch waits at most this long for more messages. Default 2 ms.
    pub linger: Duration,
    /// ASYNC: a batch is sent as soon as it holds this many bytes. Default 64 KiB.
    pub batch_bytes: usize,
    /// ASYNC: batches in flight before `send_async` blocks. Default 1024.
    pub max_in_flight_batches: usize,
}

impl ProducerConfig {
    pub fn new(broker: impl Into<String>) -> ProducerConfig {
        ProducerConfig {
            broker: broker.into(),
            idempotent: true,
            retries: 5,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(2),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            linger: Duration::from_millis(2),
            batch_bytes: 64 << 10,
            max_in_flight_batches: 1024,
        }
    }
}

/// How a message's queue is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueSelector<'a> {
    RoundRobin,
    /// Same key, same queue (ordering per key).
    KeyHash(&'a [u8]),
    Queue(u32),
}

/// Where a message (or batch) was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendResult {
    pub queue: u32,
    /// Offset of the first message; a batch holds `offset..offset + count`.
    pub offset: u64,
    pub count: u32,
    /// The broker had stored this batch before (a retry); offsets are the original ones.
    pub duplicate: bool,
    /// Where the bytes were when the broker acked (`memory`, `disk`, `replica-received`,
    /// `replica-durable`).
    pub durability: Durability,
    /// The epoch of the master that acked.
    pub epoch: u64,
}

type MessageCallback = Box<dyn FnOnce(Result<SendResult, ClientError>) + Send>;

struct OpenBatch {
    buf: BytesMut,
    count: u32,
    callbacks: Vec<MessageCallback>,
    opened: Instant,
}

struct Inner {
    config: ProducerConfig,
    producer_id: u64,
    cluster: Cluster,
    sequences: Mutex<HashMap<(String, u32), u32>>,
    round_robin: AtomicU32,
    batches: Mutex<HashMap<(String, u32), OpenBatch>>,
    in_flight: (Mutex<usize>, Condvar),
    retry_tx: Mutex<Option<mpsc::Sender<RetryJob>>>,
    /// Set when the producer is dropped; the linger thread ends.
    stopping: AtomicBool,
    /// Held from reserving a batch's sequence numbers until its first attempt is written, so
    /// two threads (a sender and the linger thread) cannot put sequences of one queue on the
    /// wire out of order: a broker that sees a new producer's later batch first would take its
    /// sequence as the start.
    send_order: Mutex<()>,
}

/// A batch whose attempt failed retriably, waiting for its backoff.
struct RetryJob {
    due: Instant,
    attempt: u32,
    send: PreparedSend,
    on_done: Box<dyn FnOnce(Result<ProduceAck, ClientError>) + Send>,
}

#[derive(Clone)]
struct PreparedSend {
    topic: String,
    queue: u32,
    count: u32,
    base_sequence: u32,
    body: Bytes,
}

/// A producer; share it across threads by reference or `Arc`.
pub struct Producer {
    inner: Arc<Inner>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Producer {
    pub fn connect(broker: &str) -> Result<Producer, ClientError> {
        Self::with_config(ProducerConfig::new(broker))
    }

    pub fn with_config(config: ProducerConfig) -> Result<Producer, ClientError> {
        let producer_id = random_u64() | 1; // 0 means "not idempotent" on the wire
        let (retry_tx, retry_rx) = mpsc::channel();
        let cluster = Cluster::connect(&config.broker, config.request_timeout)?;
        let inner = Arc::new(Inner {
            config,
            cluster,
            producer_id,
            sequences: Mutex::new(HashMap::new()),
            round_robin: AtomicU32::new(0),
            batches: Mutex::new(HashMap::new()),
            in_flight: (Mutex::new(0), Condvar::new()),
            retry_tx: Mutex::new(Some(retry_tx)),
            stopping: AtomicBool::new(false),
            send_order: Mutex::new(()),
        });
        let linger = {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("ringmq-linger".into())
                .spawn(move || linger_loop(weak))
                .expect("spawn linger thread")
        };
        let retry = {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("ringmq-retry".into())
                .spawn(move || retry_loop(weak, retry_rx))
                .expect("spawn retry thread")
        };
        Ok(Producer {
            inner,
            threads: vec![linger, retry],
        })
    }

    pub fn producer_id(&self) -> u64 {
        self.inner.producer_id
    }

    /// SYNC: sends one message and waits for its ack (with retries).
    pub fn send(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
    ) -> Result<SendResult, ClientError> {
        self.send_batch(topic, selector, std::slice::from_ref(message))
    }

    /// SYNC: sends messages as one batch (stored as one record, contiguous offsets).
    pub fn send_batch(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        messages: &[Message],
    ) -> Result<SendResult, ClientError> {
        let inner = &self.inner;
        // Reserve the sequence and put the first attempt on the wire in one step, so batches
        // of one queue reach the broker in sequence order (see `send_order`).
        let (send, first) = {
            let _order = inner.send_order.lock().expect("send order lock");
            let send = inner.prepare(topic, selector, messages)?;
            let first = inner
                .cluster
                .connection_for(&send.topic, send.queue)
                .and_then(|c| Ok((c.send(&inner.request(&send), send.body.clone())?, c)));
            (send, first)
        };
        let mut outcome = first.and_then(|(pending, conn)| {
            inner.after_attempt(conn.peer(), pending.wait(inner.config.request_timeout))
        });
        let mut attempt = 0;
        loop {
            match outcome {
                Ok(ack) => return Ok(to_result(ack)),
                Err(e) if inner.should_retry(&e, attempt) => {
                    std::thread::sleep(inner.backoff(attempt));
                    attempt += 1;
                    outcome = inner.attempt_sync(&send);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// ONEWAY: sends without waiting for (or getting) an ack. No retries: there is nothing to
    /// learn a failure from.
    pub fn send_oneway(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
    ) -> Result<(), ClientError> {
        let send = self
            .inner
            .prepare(topic, selector, std::slice::from_ref(message))?;
        let conn = self.inner.cluster.connection_for(&send.topic, send.queue)?;
        conn.send_oneway(&self.inner.request(&send), send.body.clone())
    }

    /// ASYNC: queues the message into its queue's open batch and returns at once; `callback`
    /// runs (on a client thread) with the message's own offset once the batch is acked or has
    /// failed for good. Blocks only when `max_in_flight_batches` are in flight.
    pub fn send_async(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
        callback: impl FnOnce(Result<SendResult, ClientError>) + Send + 'static,
    ) -> Result<(), ClientError> {
        let route = self.inner.route(topic)?;
        let queue = self.inner.select(&route, selector)?;
        let key = (topic.to_string(), queue);
        let full = {
            let mut batches = self.inner.batches.lock().expect("batches lock");
            let batch = batches.entry(key.clone()).or_insert_with(|| OpenBatch {
                buf: BytesMut::with_capacity(self.inner.config.batch_bytes + 1024),
                count: 0,
                callbacks: Vec::new(),
                opened: Instant::now(),
            });
            let mut builder = BatchBuilder::new(&mut batch.buf);
            builder
                .push(message)
                .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
            batch.count += 1;
            batch.callbacks.push(Box::new(callback));
            batch.buf.len() >= self.inner.config.batch_bytes
        };
        if full {
            Inner::flush_key(&self.inner, &key);
        }
        Ok(())
    }

    /// Sends every open batch now and waits until nothing is in flight.
    pub fn flush(&self) {
        Inner::flush_open_batches(&self.inner, Duration::ZERO);
        let (lock, cv) = &self.inner.in_flight;
        let mut n = lock.lock().expect("in-flight lock");
        while *n > 0 {
            n = cv.wait(n).expect("in-flight lock");
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.flush();
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.retry_tx.lock().expect("retry lock").take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn to_result(ack: ProduceAck) -> SendResult {
    SendResult {
        queue: ack.queue,
        offset: ack.base_offset,
        count: ack.count,
        duplicate: ack.duplicate,
        durability: ack.durability,
        epoch: ack.epoch,
    }
}

impl Inner {
    fn route(&self, topic: &str) -> Result<Arc<RouteTable>, ClientError> {
        self.cluster.route(topic)
    }

    fn select(&self, route: &RouteTable, selector: QueueSelector<'_>) -> Result<u32, ClientError> {
        let n = route.queues.len() as u32;
        if n == 0 {
            return Err(ClientError::Unexpected(format!(
                "topic {} has no queues",
                route.topic
            )));
        }
        Ok(match selector {
            QueueSelector::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
            QueueSelector::KeyHash(key) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut h);
                (h.finish() % u64::from(n)) as u32
            }
            QueueSelector::Queue(q) if q < n => q,
            QueueSelector::Queue(q) => {
                return Err(ClientError::InvalidArgument(format!(
                    "topic {} has queues 0..{n}; there is no queue {q}",
                    route.topic
                )))
            }
        })
    }

    /// Encodes the batch and reserves its sequence numbers.
    fn prepare(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        messages: &[Message],
    ) -> Result<PreparedSend, ClientError> {
        if messages.is_empty() {
            return Err(ClientError::InvalidArgument("an empty batch".into()));
        }
        let route = self.route(topic)?;
        let queue = self.select(&route, selector)?;
        let mut buf = BytesMut::new();
        let mut builder = BatchBuilder::new(&mut buf);
        for m in messages {
            builder
                .push(m)
                .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        }
        let count = builder.count();
        Ok(self.prepared(topic, queue, count, buf.freeze()))
    }

    fn prepared(&self, topic: &str, queue: u32, count: u32, body: Bytes) -> PreparedSend {
        let base_sequence = if self.config.idempotent {
            let mut seqs = self.sequences.lock().expect("seq lock");
            let next = seqs.entry((topic.to_string(), queue)).or_insert(0);
            let base = *next;
            *next = next.wrapping_add(count);
            base
        } else {
            0
        };
        PreparedSend {
            topic: topic.to_string(),
            queue,
            count,
            base_sequence,
            body,
        }
    }

    fn request(&self, send: &PreparedSend) -> Request {
        Request::Produce(ProduceRequest {
            topic: send.topic.clone(),
            queue: Some(send.queue),
            producer_id: if self.config.idempotent {
                self.producer_id
            } else {
                0
            },
            producer_epoch: 0,
            base_sequence: send.base_sequence,
            message_count: send.count,
            timeout_ms: self
                .config
                .request_timeout
                .as_millis()
                .min(u32::MAX as u128) as u32,
        })
    }

    fn attempt_sync(&self, send: &PreparedSend) -> Result<ProduceAck, ClientError> {
        let conn = self.cluster.connection_for(&send.topic, send.queue)?;
        let outcome = conn.call(
            &self.request(send),
            send.body.clone(),
            self.config.request_timeout,
        );
        self.after_attempt(conn.peer(), outcome)
    }

    fn after_attempt(
        &self,
        peer: &str,
        outcome: Result<(Response, Bytes), ClientError>,
    ) -> Result<ProduceAck, ClientError> {
        match outcome {
            Ok((Response::Produced(ack), _)) => Ok(ack),
            Ok((other, _)) => Err(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                if matches!(
                    e,
                    ClientError::ConnectionClosed(_) | ClientError::Connect { .. }
                ) {
                    self.cluster.forget(peer);
                }
                Err(e)
            }
        }
    }

    fn should_retry(&self, e: &ClientError, attempt: u32) -> bool {
        if attempt >= self.config.retries {
            return false;
        }
        // With pipelined idempotent sends, a retried batch can overtake an earlier one that is
        // still being retried; the broker then reports a sequence gap, which resolves once the
        // earlier batch lands.
        let gap = self.config.idempotent && e.code() == Some(ErrorCode::OutOfOrderSequence);
        e.is_retriable() || gap
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .config
            .retry_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.retry_backoff_max);
        // ±50 % jitter, so producers that failed together do not retry together.
        let jitter = (random_u64() % 1000) as f64 / 1000.0 + 0.5;
        base.mul_f64(jitter)
    }

    /// Sends a batch asynchronously; retries go through the retry thread.
    fn send_async_attempt(
        self: &Arc<Self>,
        send: PreparedSend,
        attempt: u32,
        on_done: Box<dyn FnOnce(Result<ProduceAck, ClientError>) + Send>,
    ) {
        let conn = match self.cluster.connection_for(&send.topic, send.queue) {
            Ok(c) => c,
            Err(e) => return self.retry_or_finish(send, attempt, e, on_done),
        };
        let me = self.clone();
        let peer = conn.peer().to_string();
        let retry_copy = send.clone();
        let sent =
            conn.send_callback(
                &self.request(&send),
                send.body.clone(),
                move |outcome| match me.after_attempt(&peer, outcome) {
                    Ok(ack) => on_done(Ok(ack)),
                    Err(e) => me.retry_or_finish(retry_copy, attempt, e, on_done),
                },
            );
        // On a failed write the callback has already run with the error.
        let _ = sent;
    }

    fn retry_or_finish(
        &self,
        send: PreparedSend,
        attempt: u32,
        e: ClientError,
        on_done: Box<dyn FnOnce(Result<ProduceAck, ClientError>) + Send>,
    ) {
        if self.should_retry(&e, attempt) {
            let job = RetryJob {
                due: Instant::now() + self.backoff(attempt),
                attempt: attempt + 1,
                send,
                on_done,
            };
            let tx = self.retry_tx.lock().expect("retry lock").clone();
            // No retry thread (the producer is being dropped): fail now.
            let job = match tx {
                Some(tx) => match tx.send(job) {
                    Ok(()) => return,
                    Err(mpsc::SendError(job)) => job,
                },
                None => job,
            };
            (job.on_done)(Err(e));
            return;
        }
        on_done(Err(e));
    }

    /// Reserves the batch's sequences and writes its first attempt. The caller holds
    /// `send_order` from taking the batch out of `batches` until here, so batches of a queue
    /// leave in the order they were filled, with increasing sequences.
    fn dispatch_batch(inner: &Arc<Inner>, key: (String, u32), batch: OpenBatch) {
        {
            let (lock, cv) = &inner.in_flight;
            let mut n = lock.lock().expect("in-flight lock");
            while *n >= inner.config.max_in_flight_batches {
                n = cv.wait(n).expect("in-flight lock");
            }
            *n += 1;
        }
        let send = inner.prepared(&key.0, key.1, batch.count, batch.buf.freeze());
        let callbacks = batch.callbacks;
        let me = inner.clone();
        inner.send_async_attempt(
            send,
            0,
            Box::new(move |outcome| {
                for (i, cb) in callbacks.into_iter().enumerate() {
                    cb(match &outcome {
                        Ok(ack) => Ok(SendResult {
                            queue: ack.queue,
                            offset: ack.base_offset + i as u64,
                            count: 1,
                            duplicate: ack.duplicate,
                            durability: ack.durability,
                            epoch: ack.epoch,
                        }),
                        Err(e) => Err(clone_error(e)),
                    });
                }
                let (lock, cv) = &me.in_flight;
                *lock.lock().expect("in-flight lock") -= 1;
                cv.notify_all();
            }),
        );
    }

    /// Sends the open batch of `key`, if any (another thread may have sent it already).
    fn flush_key(inner: &Arc<Inner>, key: &(String, u32)) {
        let _order = inner.send_order.lock().expect("send order lock");
        let batch = inner.batches.lock().expect("batches lock").remove(key);
        if let Some(batch) = batch {
            Inner::dispatch_batch(inner, key.clone(), batch);
        }
    }

    fn flush_open_batches(inner: &Arc<Inner>, older_than: Duration) {
        let _order = inner.send_order.lock().expect("send order lock");
        let due: Vec<((String, u32), OpenBatch)> = {
            let mut batches = inner.batches.lock().expect("batches lock");
            let keys: Vec<(String, u32)> = batches
                .iter()
                .filter(|(_, b)| b.opened.elapsed() >= older_than)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| batches.remove(&k).map(|b| (k, b)))
                .collect()
        };
        for (key, batch) in due {
            Inner::dispatch_batch(inner, key, batch);
        }
    }
}

/// The same error for every message of a failed batch.
fn clone_error(e: &ClientError) -> ClientError {
    match e {
        ClientError::Remote(r) => ClientError::Remote(r.clone()),
        ClientError::Timeout(d) => ClientError::Timeout(*d),
        ClientError::ConnectionClosed(s) => ClientError::ConnectionClosed(s.clone()),
        other => ClientError::Unexpected(other.to_string()),
    }
}

fn linger_loop(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopping.load(Ordering::Acquire) {
            return;
        }
        let linger = inner.config.linger;
        Inner::flush_open_batches(&inner, linger);
        drop(inner);
        std::thread::sleep(linger.max(Duration::from_micros(200)) / 2);
    }
}

fn retry_loop(inner: std::sync::Weak<Inner>, rx: mpsc::Receiver<RetryJob>) {
    while let Ok(job) = rx.recv() {
        let now = Instant::now();
        if job.due > now {
            std::thread::sleep(job.due - now);
        }
        match inner.upgrade() {
            Some(inner) => inner.send_async_attempt(job.send, job.attempt, job.on_done),
            None => (job.on_done)(Err(ClientError::ConnectionClosed(
                "producer dropped".into(),
            ))),
        }
    }
}

/// A random u64 without a dependency: std's SipHash keys are random per process.
pub(crate) fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
