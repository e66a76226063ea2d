//! The producer: SYNC, ASYNC (pipelined, batched by linger time and bytes) and ONEWAY sends.
//!
//! - Routing: the producer asks for the topic's route once and sends each batch straight to
//!   the shard that owns its queue (one connection per shard address), so no produce pays a
//!   cross-core hop inside the broker.
//! - Idempotence (on by default): the producer has a random 64-bit id, and each queue an epoch
//!   and a sequence; a batch carries its base sequence, and a retry re-sends the same sequence,
//!   so the broker acks a batch it already stored with its original offsets instead of storing
//!   it twice.
//! - Lanes: every batch of a queue (SYNC or ASYNC) goes through that queue's lane, a window of
//!   at most [`PRODUCER_WINDOW_BATCHES`] batches from the earliest unacknowledged one, written
//!   in sequence order. The broker remembers the same number of batches per producer and queue,
//!   so a re-sent batch that was stored is always recognised.
//! - Retries: when an attempt fails retriably (lost connection, timeout, busy, flush timeout,
//!   disk full, a sequence gap), the lane starts a new round after a backoff with jitter: it re-sends
//!   every unacknowledged batch, in sequence order, from the earliest. Re-sending only the
//!   failed batch is not enough: after a broker restart the later batches would arrive first
//!   and be refused as a gap. `retries` rounds without an ack in between, or an error that is
//!   not retriable, fail every batch of the window; the lane then takes a new epoch and starts
//!   its sequence over, so later batches are not refused for the hole. Every batch of a failed
//!   window reports the code of the error that failed it, and a sequence error that is only a
//!   consequence of an earlier refusal (DISK_FULL, say) reports that refusal.
//! - Deadline: a batch with no answer `request_timeout` after it was written counts as a lost
//!   connection (the connection is dropped and the lane starts a new round).
//! - Fail-over: with a bootstrap list ("master,slave"), NOT_MASTER, SHUTTING_DOWN and a closed
//!   or refused connection fail the cluster over to the next broker (see
//!   [`crate::client::cluster`]) and count as retriable: the lane re-sends its window there with
//!   the same producer id, epoch and sequences, so a batch the old master had replicated before
//!   it died is de-duplicated by the new one (the slave rebuilt the producer table from the
//!   log it was sent). Such rounds go on past `retries` until `failover_timeout` has passed
//!   since the lane's first failure. With one address, NOT_MASTER stays final.
//! - ONEWAY sends carry no producer id: nothing retries them, so there is nothing to de-duplicate,
//!   and a lost one must not leave a hole in a lane's sequence.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::client::cluster::Cluster;
use crate::client::connection::{Pending, DEFAULT_REQUEST_TIMEOUT};
use crate::client::spool::{Assignment, Spool, SpoolConfig, SpoolReceipt, SpoolSelector};
use crate::client::ClientError;
use crate::format::batch::{BatchBuilder, Message};
use crate::protocol::limits::PRODUCER_WINDOW_BATCHES;
use crate::protocol::{
    Delay, Durability, ErrorCode, ProduceAck, ProduceRequest, RemoteError, Request, Response,
    RouteTable,
};

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Any shard's address; routes come from there. Or a comma-separated list of brokers
    /// ("master,slave"): the producer connects to the first that answers and fails over to
    /// the next when one is lost or is no longer the master (see `failover_timeout`).
    pub broker: String,
    /// Send a producer id and sequences so retries are de-duplicated. Default true.
    pub idempotent: bool,
    /// Rounds of re-sending a queue's unacknowledged batches after retriable errors, counted
    /// since the queue's last ack. Default 10 (with the default backoffs about 11 s, enough to
    /// ride through a broker restart).
    pub retries: u32,
    /// First backoff; doubles per attempt up to `retry_backoff_max`, with ±50 % jitter.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long one attempt waits for its ack before its connection is considered lost.
    /// Default 15 s (above the broker's flush timeout).
    pub request_timeout: Duration,
    /// ASYNC: a batch waits at most this long for more messages. Default 2 ms.
    pub linger: Duration,
    /// ASYNC: a batch is sent as soon as it holds this many bytes. Default 64 KiB.
    pub batch_bytes: usize,
    /// ASYNC: batches in flight (all queues) before `send_async` blocks. Default 128 (8 MiB of
    /// full 64 KiB batches). A producer that outruns the broker waits about this many batches'
    /// worth of acks behind its sends: with 1024, pipelined SYNC_FLUSH sends of 256 B were
    /// acked 83–92 ms (p50) and 240–281 ms (p99) after they were sent, against 40 / 66–72 ms
    /// with 128, for 2–4 % less throughput (`ringmq-bench run --workload w3c
    /// --max-in-flight-batches N`, alternating). Per queue there are never more than
    /// [`PRODUCER_WINDOW_BATCHES`] (the broker's de-dup window).
    pub max_in_flight_batches: usize,
    /// With a broker list: how long a queue keeps re-sending after fail-over errors
    /// (NOT_MASTER, SHUTTING_DOWN, a closed or refused connection), counted from its first
    /// failure since its last ack. Those rounds back off as usual (`retry_backoff` doubling to
    /// `retry_backoff_max`) but are not limited to `retries` while this lasts: the default
    /// `retries` and backoffs may be spent in about 5.6 s (jitter), shorter than a slave takes
    /// to be promoted. Default 15 s. Ignored with one address.
    pub failover_timeout: Duration,
    /// A local spool for the batches of [`Producer::send_or_spool`] that cannot be acked
    /// within the retry budget. Default none. With one, the producer starts while no broker
    /// answers, and takes its producer id from the spool (see [`crate::client::spool`]).
    pub spool: Option<SpoolConfig>,
}

impl ProducerConfig {
    pub fn new(broker: impl Into<String>) -> ProducerConfig {
        ProducerConfig {
            broker: broker.into(),
            idempotent: true,
            retries: 10,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(2),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            linger: Duration::from_millis(2),
            batch_bytes: 64 << 10,
            max_in_flight_batches: 128,
            failover_timeout: Duration::from_secs(15),
            spool: None,
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

/// What became of a [`Producer::send_or_spool`]: acked by the broker, or (only once its
/// bytes are fsync'd in the spool) spooled for a later drain. Never a fake ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Acked(SendResult),
    Spooled(SpoolReceipt),
}

/// What one [`Producer::drain_spool`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Entries the broker acked in this drain (a re-send it had stored counts too).
    pub acked_entries: u64,
    pub acked_messages: u64,
    /// Of those, entries the broker had stored before (recognised by its de-dup).
    pub duplicates: u64,
    /// Entries still in the spool.
    pub pending_entries: u64,
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
    /// A delayed send ([`Producer::send_delayed`]): when the broker delivers it (Unix ms);
    /// `offset` is then its place in the broker's schedule. 0: stored in its queue.
    pub deliver_at_ms: u64,
}

type MessageCallback = Box<dyn FnOnce(Result<SendResult, ClientError>) + Send>;
/// The epoch and base sequence a batch was given in its lane.
#[derive(Debug, Clone, Copy)]
struct Assigned {
    epoch: u16,
    base_sequence: u32,
}

type BatchCallback = Box<dyn FnOnce(Result<ProduceAck, ClientError>, Assigned) + Send>;

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
    round_robin: AtomicU32,
    batches: Mutex<HashMap<(String, u32), OpenBatch>>,
    lanes: Mutex<HashMap<(String, u32), Arc<Lane>>>,
    /// Batches handed to lanes and not yet finished (acked or failed for good), all queues.
    in_flight: (Mutex<usize>, Condvar),
    /// Wakes the keeper thread when a lane schedules a round.
    keeper_tx: Mutex<Option<mpsc::Sender<()>>>,
    /// Set when the producer is dropped; the linger and keeper threads end.
    stopping: AtomicBool,
    /// Held from taking a batch out of `batches` (or encoding a SYNC batch) until it is in its
    /// lane, so the batches of a queue enter the lane, and get their sequences, in the order
    /// their messages were given.
    fill_order: Mutex<()>,
    next_slot_id: AtomicU64,
    /// The newest master epoch seen in an ack (per broker group for a cluster topic), sent
    /// with every produce: a master older than it learns from us that it may have been
    /// superseded.
    known_epoch: KnownEpochs,
    /// The spool, if configured; then `producer_id` is the spool's and every lane starts at
    /// `base_epoch`, the epoch this run took from it.
    spool: Option<Arc<Spool>>,
    base_epoch: u16,
    /// One drain at a time (the background one or [`Producer::drain_spool`]).
    drain_lock: Mutex<()>,
    /// What every drain of this producer did so far (the background thread's and
    /// [`Producer::drain_spool`]'s): a drain that found the spool empty because the other
    /// had just emptied it reports nothing, these totals still do.
    drained: Mutex<DrainReport>,
    /// Wakes the drain thread when something was spooled.
    drain_tx: Mutex<Option<mpsc::Sender<()>>>,
}

/// The batches of one queue in flight, in sequence order.
struct Lane {
    topic: String,
    queue: u32,
    /// Held while writing this lane's batches, so they reach the socket in sequence order.
    /// Never taken on a connection's reader thread (which completes attempts): a writer blocked
    /// on a full socket must not stop the responses that would drain it.
    wire: Mutex<()>,
    state: Mutex<LaneState>,
    /// Signalled (with `state`) when the window has room.
    room: Condvar,
}

struct LaneState {
    epoch: u16,
    next_sequence: u32,
    /// From the earliest unacknowledged batch on; acked batches behind it stay until it is
    /// acked, so the window spans at most [`PRODUCER_WINDOW_BATCHES`] sequences' batches.
    window: VecDeque<Slot>,
    /// Bumped whenever the lane starts over; an error from an attempt of an older round is
    /// stale (the batch is being re-sent anyway). An ack is good from any round.
    round: u64,
    /// No writes before this instant: the backoff before a new round.
    resume_at: Option<Instant>,
    /// Failed rounds since the last ack.
    failures: u32,
    /// When the first of them failed: the start of `failover_timeout`.
    failing_since: Option<Instant>,
    /// The last error since the last ack that was not a sequence error (from any round):
    /// what a failure of the window reports when its last error is only a consequence of it.
    cause: Option<ClientError>,
}

struct Slot {
    id: u64,
    epoch: u16,
    base_sequence: u32,
    count: u32,
    body: Bytes,
    /// The round this batch was last written in, and when.
    written: Option<(u64, Instant)>,
    done: bool,
    on_done: Option<BatchCallback>,
}

impl Slot {
    fn assigned(&self) -> Assigned {
        Assigned {
            epoch: self.epoch,
            base_sequence: self.base_sequence,
        }
    }
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
        let (keeper_tx, keeper_rx) = mpsc::channel();
        let (drain_tx, drain_rx) = mpsc::channel();
        let (producer_id, base_epoch, spool, cluster) = match &config.spool {
            Some(sc) => {
                if !config.idempotent {
                    return Err(ClientError::InvalidArgument(
                        "a spool needs an idempotent producer: its re-sends are \
                         de-duplicated by producer id and sequence"
                            .into(),
                    ));
                }
                let spool = Arc::new(Spool::open(sc)?);
                let (pid, epoch) = spool.begin_run()?;
                let cluster = Cluster::lazy(&config.broker, config.request_timeout);
                (pid, epoch, Some(spool), cluster)
            }
            // 0 means "not idempotent" on the wire.
            None => (
                random_u64() | 1,
                0,
                None,
                Cluster::connect(&config.broker, config.request_timeout)?,
            ),
        };
        let inner = Arc::new(Inner {
            config,
            cluster,
            producer_id,
            round_robin: AtomicU32::new(0),
            batches: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            in_flight: (Mutex::new(0), Condvar::new()),
            keeper_tx: Mutex::new(Some(keeper_tx)),
            stopping: AtomicBool::new(false),
            fill_order: Mutex::new(()),
            next_slot_id: AtomicU64::new(1),
            known_epoch: KnownEpochs::default(),
            spool,
            base_epoch,
            drain_lock: Mutex::new(()),
            drained: Mutex::new(DrainReport::default()),
            drain_tx: Mutex::new(Some(drain_tx)),
        });
        let linger = {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("ringmq-linger".into())
                .spawn(move || linger_loop(weak))
                .expect("spawn linger thread")
        };
        let keeper = {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("ringmq-retry".into())
                .spawn(move || keeper_loop(weak, keeper_rx))
                .expect("spawn retry thread")
        };
        let mut threads = vec![linger, keeper];
        if inner.spool.is_some() {
            let weak = Arc::downgrade(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name("ringmq-spool".into())
                    .spawn(move || drain_loop(weak, drain_rx))
                    .expect("spawn spool thread"),
            );
        }
        Ok(Producer { inner, threads })
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
        self.no_spool()?;
        let inner = &self.inner;
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let _order = inner.fill_order.lock().expect("fill order lock");
            let (queue, count, body) = inner.encode(topic, selector, messages)?;
            Inner::enqueue(
                inner,
                topic,
                queue,
                count,
                body,
                Box::new(move |outcome, _| {
                    let _ = tx.send(outcome);
                }),
            );
        }
        match rx.recv() {
            Ok(outcome) => outcome.map(to_result),
            Err(_) => Err(ClientError::ConnectionClosed("producer dropped".into())),
        }
    }

    /// ONEWAY: sends without waiting for (or getting) an ack. No retries: there is nothing to
    /// learn a failure from, and so no producer id either (see the module doc).
    pub fn send_oneway(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
    ) -> Result<(), ClientError> {
        let (queue, count, body) =
            self.inner
                .encode(topic, selector, std::slice::from_ref(message))?;
        let conn = self.inner.cluster.connection_for(topic, queue)?;
        let request = self.inner.request(topic, queue, 0, 0, 0, count);
        conn.send_oneway(&request, body)
    }

    /// SYNC, delayed: the message becomes visible in its queue after `delay` (a delay level,
    /// or a time at most 3 days ahead). One attempt and no de-duplication (a delayed send is
    /// not idempotent): on an error the caller decides whether to send again.
    pub fn send_delayed(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
        delay: Delay,
    ) -> Result<SendResult, ClientError> {
        let (queue, count, body) =
            self.inner
                .encode(topic, selector, std::slice::from_ref(message))?;
        let conn = self.inner.cluster.connection_for(topic, queue)?;
        let mut request = self.inner.request(topic, queue, 0, 0, 0, count);
        if let Request::Produce(p) = &mut request {
            p.delay = Some(delay);
        }
        let outcome = conn.call(&request, body, self.inner.config.request_timeout);
        if matches!(outcome, Err(ClientError::ConnectionClosed(_))) {
            self.inner.cluster.forget(conn.peer());
        }
        match outcome?.0 {
            Response::Produced(ack) => Ok(to_result(ack)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// ASYNC: queues the message into its queue's open batch and returns at once; `callback`
    /// runs (on a client thread) with the message's own offset once the batch is acked or has
    /// failed for good. Blocks only when `max_in_flight_batches` are in flight, or the queue's
    /// window is full.
    pub fn send_async(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
        callback: impl FnOnce(Result<SendResult, ClientError>) + Send + 'static,
    ) -> Result<(), ClientError> {
        self.no_spool()?;
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

    /// With a spool: a SYNC send that falls back to the spool. Returns
    /// [`SendOutcome::Acked`] when the broker acked within the retry budget, and
    /// [`SendOutcome::Spooled`] once the batch is fsync'd in the spool when it could not be
    /// (no broker, no route yet, DISK_FULL, SYSTEM_BUSY ... after the retries). While anything
    /// is spooled, every send goes to the spool (after it, in order), and the drain (in the
    /// background, or [`Producer::drain_spool`]) re-sends it all in order.
    pub fn send_or_spool(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        message: &Message,
    ) -> Result<SendOutcome, ClientError> {
        self.send_batch_or_spool(topic, selector, std::slice::from_ref(message))
    }

    /// [`Producer::send_or_spool`] for a batch (stored as one record, spooled as one entry).
    pub fn send_batch_or_spool(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        messages: &[Message],
    ) -> Result<SendOutcome, ClientError> {
        let inner = &self.inner;
        let Some(spool) = inner.spool.clone() else {
            return Err(ClientError::InvalidArgument(
                "send_or_spool needs a producer with a spool (ProducerConfig::spool)".into(),
            ));
        };
        if messages.is_empty() {
            return Err(ClientError::InvalidArgument("an empty batch".into()));
        }
        let mut buf = BytesMut::new();
        let mut builder = BatchBuilder::new(&mut buf);
        for m in messages {
            builder
                .push(m)
                .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        }
        let count = builder.count();
        let body = buf.freeze();
        let spool_selector = match selector {
            QueueSelector::RoundRobin => SpoolSelector::RoundRobin,
            QueueSelector::KeyHash(k) => SpoolSelector::Key(Bytes::copy_from_slice(k)),
            QueueSelector::Queue(q) => SpoolSelector::Queue(q),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let _order = inner.fill_order.lock().expect("fill order lock");
            let queue = if spool.pending_count() > 0 {
                None
            } else {
                match inner.route(topic).and_then(|r| inner.select(&r, selector)) {
                    Ok(q) => Some(q),
                    // No broker or no route yet: the drain chooses the queue later.
                    Err(e) if inner.is_retriable(&e) => None,
                    Err(e) => return Err(e),
                }
            };
            let Some(queue) = queue else {
                let receipt = spool.append(topic, &spool_selector, count, &body, None, 0)?;
                inner.wake_drain();
                return Ok(SendOutcome::Spooled(receipt));
            };
            // Reserved now, so that falling back to the spool cannot fail for room after the
            // batch took a sequence (a hole would stop every later batch of the queue).
            let reserved = Spool::entry_bytes(topic, &spool_selector, body.len());
            spool.reserve(reserved)?;
            let me = inner.clone();
            let topic2 = topic.to_string();
            let body2 = body.clone();
            Inner::enqueue(
                inner,
                topic,
                queue,
                count,
                body,
                Box::new(move |outcome, assigned| {
                    let result = match outcome {
                        Ok(ack) => {
                            spool.release(reserved);
                            Ok(SendOutcome::Acked(to_result(ack)))
                        }
                        // As the lane judged it (a fail-over error with a list too): the lane
                        // kept this batch's sequence, so it must be spooled, not dropped.
                        Err(e) if me.is_retriable(&e) => {
                            log::debug!("spooling a batch of queue {queue}: {e}");
                            let assignment = Assignment {
                                producer_id: me.producer_id,
                                epoch: assigned.epoch,
                                queue,
                                base_sequence: assigned.base_sequence,
                            };
                            let r = spool.append(
                                &topic2,
                                &spool_selector,
                                count,
                                &body2,
                                Some(assignment),
                                reserved,
                            );
                            me.wake_drain();
                            r.map(SendOutcome::Spooled)
                        }
                        Err(e) => {
                            spool.release(reserved);
                            Err(e)
                        }
                    };
                    let _ = tx.send(result);
                }),
            );
        }
        match rx.recv() {
            Ok(outcome) => outcome,
            Err(_) => Err(ClientError::ConnectionClosed("producer dropped".into())),
        }
    }

    /// Re-sends the spool, in order, until it is empty or a send fails (the error is
    /// returned; what was acked until then is recorded). Each entry goes with the producer
    /// id, epoch, queue and sequence it was given (an entry spooled before a route was
    /// known gets them first, fsync'd), so the broker's de-dup makes the re-send of a batch
    /// it already stored harmless. A background thread calls this with backoff while the
    /// spool is not empty; calling it directly (at start, say) is optional.
    pub fn drain_spool(&self) -> Result<DrainReport, ClientError> {
        Inner::drain(&self.inner)
    }

    /// What all drains of this producer did so far, the background one's included
    /// (`pending_entries` as the last drain left it).
    pub fn spool_drained(&self) -> DrainReport {
        *self.inner.drained.lock().expect("drained lock")
    }

    /// Entries in the spool not yet acked (0 without a spool).
    pub fn spool_pending(&self) -> usize {
        self.inner.spool.as_ref().map_or(0, |s| s.pending_count())
    }

    /// Plain sends would take sequences the spool cannot account for: with a spool, a batch
    /// that fails for good would leave a hole in its queue's sequence that stops every
    /// spooled batch behind it.
    fn no_spool(&self) -> Result<(), ClientError> {
        if self.inner.spool.is_some() {
            return Err(ClientError::InvalidArgument(
                "this producer has a spool: send with send_or_spool / send_batch_or_spool".into(),
            ));
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
        self.inner.keeper_tx.lock().expect("keeper lock").take();
        self.inner.drain_tx.lock().expect("drain lock").take();
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
        deliver_at_ms: ack.deliver_at_ms,
    }
}

impl Inner {
    /// The route of `topic`. With a broker list, a fail-over error (no broker of the list
    /// answered, say, while one is being promoted) is asked again with backoff for up to
    /// `failover_timeout`, so a send is not refused in the middle of a failover.
    fn route(&self, topic: &str) -> Result<Arc<RouteTable>, ClientError> {
        let mut failing_since = None;
        let mut attempt = 0;
        loop {
            match self.cluster.route(topic) {
                Err(e) if self.cluster.can_fail_over() && e.is_failover() => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.failover_timeout {
                        return Err(e);
                    }
                    log::debug!("route of {topic}: {e}; asking again");
                    std::thread::sleep(self.backoff(attempt));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn select(&self, route: &RouteTable, selector: QueueSelector<'_>) -> Result<u32, ClientError> {
        select_queue(route, selector, &self.round_robin)
    }

    /// Chooses the queue and encodes the batch: (queue, message count, body).
    fn encode(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        messages: &[Message],
    ) -> Result<(u32, u32, Bytes), ClientError> {
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
        Ok((queue, count, buf.freeze()))
    }

    fn request(
        &self,
        topic: &str,
        queue: u32,
        producer_id: u64,
        epoch: u16,
        base_sequence: u32,
        count: u32,
    ) -> Request {
        Request::Produce(ProduceRequest {
            topic: topic.to_string(),
            queue: Some(queue),
            producer_id,
            producer_epoch: epoch,
            base_sequence,
            message_count: count,
            timeout_ms: self
                .config
                .request_timeout
                .as_millis()
                .min(u32::MAX as u128) as u32,
            known_epoch: self.known_epoch.get(&self.cluster, topic, queue),
            delay: None,
            transaction: None,
        })
    }

    /// The ack of one attempt sent to `peer` at fail-over generation `seen`; a lost
    /// connection is forgotten, and a fail-over error fails the cluster over (with a list).
    fn after_attempt(
        &self,
        peer: &str,
        seen: u64,
        outcome: Result<(Response, Bytes), ClientError>,
    ) -> Result<ProduceAck, ClientError> {
        match outcome {
            Ok((Response::Produced(ack), _)) => Ok(ack),
            Ok((other, _)) => Err(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                self.cluster.note_failure(peer, seen, &e);
                Err(e)
            }
        }
    }

    /// Whether sending again may succeed: the usual retriable errors, and with a broker list
    /// the fail-over ones (NOT_MASTER included: the next broker may be the master).
    fn is_retriable(&self, e: &ClientError) -> bool {
        e.is_retriable() || (self.cluster.can_fail_over() && e.is_failover())
    }

    /// After a failed attempt of the lane's current round: schedules the next round (after a
    /// backoff) and returns true while the retry budget lasts: `retries` rounds since the last
    /// ack, or for fail-over errors also until `failover_timeout` since the first failure.
    fn retry_round(&self, st: &mut LaneState, e: &ClientError) -> bool {
        if !self.is_retriable(e) {
            return false;
        }
        let now = Instant::now();
        let since = *st.failing_since.get_or_insert(now);
        let failing_over = self.cluster.can_fail_over() && e.is_failover();
        let within = st.failures < self.config.retries
            || (failing_over && now.duration_since(since) < self.config.failover_timeout);
        if !within {
            return false;
        }
        let wait = self.backoff(st.failures);
        st.failures = st.failures.saturating_add(1);
        st.round += 1;
        st.resume_at = Some(now + wait);
        true
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

    fn lane(&self, topic: &str, queue: u32) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        lanes
            .entry((topic.to_string(), queue))
            .or_insert_with(|| {
                Arc::new(Lane {
                    topic: topic.to_string(),
                    queue,
                    wire: Mutex::new(()),
                    state: Mutex::new(LaneState {
                        epoch: self.base_epoch,
                        next_sequence: 0,
                        window: VecDeque::new(),
                        round: 0,
                        resume_at: None,
                        failures: 0,
                        failing_since: None,
                        cause: None,
                    }),
                    room: Condvar::new(),
                })
            })
            .clone()
    }

    /// Puts a batch into its queue's lane (reserving its sequence) and writes what the lane
    /// may write. Blocks while `max_in_flight_batches` are in flight or the lane's window is
    /// full. `on_done` runs exactly once, on a client thread.
    fn enqueue(
        inner: &Arc<Inner>,
        topic: &str,
        queue: u32,
        count: u32,
        body: Bytes,
        on_done: BatchCallback,
    ) {
        {
            let (lock, cv) = &inner.in_flight;
            let mut n = lock.lock().expect("in-flight lock");
            while *n >= inner.config.max_in_flight_batches {
                n = cv.wait(n).expect("in-flight lock");
            }
            *n += 1;
        }
        let me = inner.clone();
        let on_done: BatchCallback = Box::new(move |outcome, assigned| {
            on_done(outcome, assigned);
            let (lock, cv) = &me.in_flight;
            *lock.lock().expect("in-flight lock") -= 1;
            cv.notify_all();
        });
        let lane = inner.lane(topic, queue);
        {
            let mut st = lane.state.lock().expect("lane lock");
            while st.window.len() >= PRODUCER_WINDOW_BATCHES {
                st = lane.room.wait(st).expect("lane lock");
            }
            let base_sequence = if inner.config.idempotent {
                let s = st.next_sequence;
                st.next_sequence = s.wrapping_add(count);
                s
            } else {
                0
            };
            let epoch = st.epoch;
            st.window.push_back(Slot {
                id: inner.next_slot_id.fetch_add(1, Ordering::Relaxed),
                epoch,
                base_sequence,
                count,
                body,
                written: None,
                done: false,
                on_done: Some(on_done),
            });
        }
        Inner::pump(inner, &lane);
    }

    /// Writes every batch of the lane not yet written in its current round, in window order,
    /// unless the lane is backing off.
    fn pump(inner: &Arc<Inner>, lane: &Arc<Lane>) {
        let _wire = lane.wire.lock().expect("lane wire lock");
        loop {
            let (round, id, request, body) = {
                let mut st = lane.state.lock().expect("lane lock");
                if st.resume_at.is_some() {
                    return;
                }
                let round = st.round;
                let Some(slot) = st
                    .window
                    .iter_mut()
                    .find(|s| !s.done && s.written.map_or(true, |(r, _)| r != round))
                else {
                    return;
                };
                slot.written = Some((round, Instant::now()));
                let producer_id = if inner.config.idempotent {
                    inner.producer_id
                } else {
                    0
                };
                let request = inner.request(
                    &lane.topic,
                    lane.queue,
                    producer_id,
                    slot.epoch,
                    slot.base_sequence,
                    slot.count,
                );
                (round, slot.id, request, slot.body.clone())
            };
            let seen = inner.cluster.generation();
            let conn = match inner.cluster.connection_for(&lane.topic, lane.queue) {
                Ok(c) => c,
                Err(e) => {
                    if let ClientError::Connect { addr, .. } = &e {
                        inner.cluster.note_failure(addr, seen, &e);
                    }
                    inner.on_outcome(lane, id, round, Err(e));
                    continue;
                }
            };
            let me = inner.clone();
            let lane2 = lane.clone();
            let peer = conn.peer().to_string();
            // A failed write has already completed the callback with the error.
            let _ = conn.send_callback(&request, body, move |outcome| {
                let outcome = me.after_attempt(&peer, seen, outcome);
                me.on_outcome(&lane2, id, round, outcome);
            });
        }
    }

    /// The outcome of one attempt of batch `id`, written in `round`.
    fn on_outcome(
        &self,
        lane: &Lane,
        id: u64,
        round: u64,
        outcome: Result<ProduceAck, ClientError>,
    ) {
        if let Ok(ack) = &outcome {
            self.known_epoch
                .note(&self.cluster, &lane.topic, lane.queue, ack.epoch);
        }
        let mut finished: Vec<(BatchCallback, Result<ProduceAck, ClientError>, Assigned)> =
            Vec::new();
        let mut scheduled = false;
        {
            let mut st = lane.state.lock().expect("lane lock");
            let Some(i) = st.window.iter().position(|s| s.id == id && !s.done) else {
                return; // already acked, or failed with its window
            };
            // Kept from stale rounds too: a batch behind a refused one hears SEQUENCE_GAP (or,
            // after a window restart, OUT_OF_ORDER_SEQUENCE) while the refusal that caused
            // it (DISK_FULL, say) may arrive later; the report must name the refusal.
            if let Err(e) = &outcome {
                if !is_sequence_error(e) {
                    st.cause = Some(clone_error(e));
                }
            }
            match outcome {
                Ok(ack) => {
                    let slot = &mut st.window[i];
                    slot.done = true;
                    let cb = slot
                        .on_done
                        .take()
                        .expect("an unfinished batch has a callback");
                    let assigned = slot.assigned();
                    finished.push((cb, Ok(ack), assigned));
                    st.failures = 0;
                    st.failing_since = None;
                    st.cause = None;
                }
                // The lane started over since this attempt: the batch is re-sent anyway.
                Err(_) if round != st.round => return,
                Err(e) if self.retry_round(&mut st, &e) => scheduled = true,
                // With a spool, a window that ran out of retries goes to the spool whole, in
                // sequence order (the callbacks run in window order, on this thread), each
                // batch with the epoch and sequence it was sent with: the drain re-sends them
                // as they are, so one the broker stored (its ack lost) is de-duplicated. The
                // lane keeps its epoch and sequence, so what follows stays contiguous.
                Err(e) if self.is_retriable(&e) && self.spool.is_some() => {
                    for slot in st.window.iter_mut().filter(|s| !s.done) {
                        slot.done = true;
                        let cb = slot
                            .on_done
                            .take()
                            .expect("an unfinished batch has a callback");
                        let assigned = slot.assigned();
                        finished.push((cb, Err(clone_retriable(&e)), assigned));
                    }
                    st.round += 1;
                    st.failures = 0;
                    st.failing_since = None;
                    st.resume_at = None;
                }
                Err(e) => {
                    // Every batch of the window fails: the ones after this one cannot be
                    // stored under this epoch (the broker takes a queue's batches in order
                    // only). A new epoch restarts the sequence, so later batches are not
                    // refused for the hole.
                    let failed = st.window[i].base_sequence;
                    let e = match st.cause.take() {
                        Some(cause) if is_sequence_error(&e) => with_consequence(cause, &e),
                        _ => e,
                    };
                    for slot in st.window.iter_mut().filter(|s| !s.done) {
                        slot.done = true;
                        let cb = slot
                            .on_done
                            .take()
                            .expect("an unfinished batch has a callback");
                        let err = if slot.id == id {
                            clone_error(&e)
                        } else {
                            let why = format!(
                                "not acknowledged: batch at sequence {failed} of queue {} \
                                 failed before it",
                                lane.queue
                            );
                            match &e {
                                // The same code, so a caller sees the cause (DISK_FULL ...)
                                // for every batch of the window.
                                ClientError::Remote(r) => ClientError::Remote(RemoteError {
                                    code: r.code,
                                    message: format!("{why}: {}", r.message),
                                }),
                                _ => ClientError::Unexpected(format!("{why}: {e}")),
                            }
                        };
                        let assigned = slot.assigned();
                        finished.push((cb, Err(err), assigned));
                    }
                    st.epoch = st.epoch.wrapping_add(1);
                    if let Some(spool) = &self.spool {
                        // A later run must take a newer epoch than this one.
                        if let Err(e) = spool.note_epoch(st.epoch) {
                            log::error!("{e}");
                        }
                    }
                    st.next_sequence = 0;
                    st.round += 1;
                    st.failures = 0;
                    st.failing_since = None;
                    st.resume_at = None;
                }
            }
            let before = st.window.len();
            while st.window.front().is_some_and(|s| s.done) {
                st.window.pop_front();
            }
            if st.window.len() < before {
                lane.room.notify_all();
            }
        }
        if scheduled {
            if let Some(tx) = self.keeper_tx.lock().expect("keeper lock").as_ref() {
                let _ = tx.send(());
            }
        }
        for (cb, outcome, assigned) in finished {
            cb(outcome, assigned);
        }
    }

    /// The keeper's look at one lane: start a due round, or time out an unanswered batch.
    /// Returns when it next needs a look, if it has something scheduled.
    fn keep(inner: &Arc<Inner>, lane: &Arc<Lane>, now: Instant) -> Option<Instant> {
        enum Due {
            Nothing,
            Resume,
            TimedOut(u64, u64),
        }
        let due = {
            let mut st = lane.state.lock().expect("lane lock");
            match st.resume_at {
                Some(t) if t <= now => {
                    st.resume_at = None;
                    Due::Resume
                }
                Some(t) => return Some(t),
                None => {
                    let round = st.round;
                    let timeout = inner.config.request_timeout;
                    match st.window.iter().find(|s| !s.done) {
                        Some(Slot {
                            id,
                            written: Some((r, at)),
                            ..
                        }) if *r == round && now.duration_since(*at) >= timeout => {
                            Due::TimedOut(*id, round)
                        }
                        _ => Due::Nothing,
                    }
                }
            }
        };
        match due {
            Due::Nothing => None,
            Due::Resume => {
                Inner::pump(inner, lane);
                None
            }
            Due::TimedOut(id, round) => {
                // The connection is presumed dead: drop it (its other requests fail, and
                // their lanes start over too) and start this lane over.
                if let Ok(addr) = inner.cluster.owner_address(&lane.topic, lane.queue) {
                    inner.cluster.forget(&addr);
                }
                let timeout = inner.config.request_timeout;
                inner.on_outcome(lane, id, round, Err(ClientError::Timeout(timeout)));
                Some(now)
            }
        }
    }

    /// Sends the open batch of `key`, if any (another thread may have sent it already).
    fn flush_key(inner: &Arc<Inner>, key: &(String, u32)) {
        let _order = inner.fill_order.lock().expect("fill order lock");
        let batch = inner.batches.lock().expect("batches lock").remove(key);
        if let Some(batch) = batch {
            Inner::dispatch_batch(inner, key, batch);
        }
    }

    fn flush_open_batches(inner: &Arc<Inner>, older_than: Duration) {
        let _order = inner.fill_order.lock().expect("fill order lock");
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
            Inner::dispatch_batch(inner, &key, batch);
        }
    }

    /// Hands a full or lingered ASYNC batch to its lane; the caller holds `fill_order`.
    fn dispatch_batch(inner: &Arc<Inner>, key: &(String, u32), batch: OpenBatch) {
        let callbacks = batch.callbacks;
        Inner::enqueue(
            inner,
            &key.0,
            key.1,
            batch.count,
            batch.buf.freeze(),
            Box::new(move |outcome, _| {
                for (i, cb) in callbacks.into_iter().enumerate() {
                    cb(match &outcome {
                        Ok(ack) => Ok(SendResult {
                            queue: ack.queue,
                            offset: ack.base_offset + i as u64,
                            count: 1,
                            duplicate: ack.duplicate,
                            durability: ack.durability,
                            epoch: ack.epoch,
                            deliver_at_ms: ack.deliver_at_ms,
                        }),
                        Err(e) => Err(clone_error(e)),
                    });
                }
            }),
        );
    }
}

/// (topic, queue).
type QueueKey = (String, u32);

/// Spooled entries a drain gives a queue and sequence in one fsync'd batch of markers.
const DRAIN_ASSIGN_ENTRIES: usize = 256;
/// Spooled batches of one queue a drain has in flight. Below the broker's de-dup window
/// ([`PRODUCER_WINDOW_BATCHES`]), so every batch a crashed drain may re-send unrecorded is
/// still recognised.
const DRAIN_WINDOW_BATCHES: usize = 64;
const _: () = assert!(DRAIN_WINDOW_BATCHES <= PRODUCER_WINDOW_BATCHES);

impl Inner {
    fn wake_drain(&self) {
        if let Some(tx) = self.drain_tx.lock().expect("drain lock").as_ref() {
            let _ = tx.send(());
        }
    }

    fn drain(inner: &Arc<Inner>) -> Result<DrainReport, ClientError> {
        let Some(spool) = inner.spool.clone() else {
            return Ok(DrainReport::default());
        };
        let _one = inner.drain_lock.lock().expect("drain lock");
        let mut report = DrainReport::default();
        let result = loop {
            let pending = spool.pending();
            if pending.is_empty() {
                break Ok(());
            }
            // Entries that have their sequence go first: one not yet assigned takes the next
            // sequence of its queue, which must come after theirs.
            let mut groups: Vec<(QueueKey, Vec<(u64, Assignment)>)> = Vec::new();
            for p in &pending {
                let Some(a) = p.assignment else { continue };
                let key = (p.topic.clone(), a.queue);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push((p.id, a)),
                    None => groups.push((key, vec![(p.id, a)])),
                }
            }
            if groups.is_empty() {
                if let Err(e) = inner.assign(&spool, &pending) {
                    break Err(e);
                }
                continue;
            }
            let mut failed = None;
            for ((topic, queue), mut entries) in groups {
                // In sequence order within each (producer, epoch), epochs in spool order: a
                // window that failed together was spooled in window order, but a batch that
                // failed later may have been spooled after one the drain assigned.
                let mut ranks: Vec<(u64, u16)> = Vec::new();
                for (_, a) in &entries {
                    if !ranks.contains(&(a.producer_id, a.epoch)) {
                        ranks.push((a.producer_id, a.epoch));
                    }
                }
                entries.sort_by_key(|(_, a)| {
                    let rank = ranks
                        .iter()
                        .position(|r| *r == (a.producer_id, a.epoch))
                        .expect("ranked");
                    (rank, a.base_sequence)
                });
                if let Err(e) = inner.drain_queue(&spool, &topic, queue, &entries, &mut report) {
                    failed.get_or_insert(e);
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
        };
        report.pending_entries = spool.pending_count() as u64;
        {
            let mut total = inner.drained.lock().expect("drained lock");
            total.acked_entries += report.acked_entries;
            total.acked_messages += report.acked_messages;
            total.duplicates += report.duplicates;
            total.pending_entries = report.pending_entries;
        }
        result.map(|()| report)
    }

    /// Gives the next unassigned entries (spool order) their queue and sequence, recorded
    /// (fsync'd) before any of them is sent.
    fn assign(
        &self,
        spool: &Spool,
        pending: &[crate::client::spool::PendingEntry],
    ) -> Result<(), ClientError> {
        let mut out = Vec::new();
        for p in pending.iter().take(DRAIN_ASSIGN_ENTRIES) {
            let selector = match &p.selector {
                SpoolSelector::RoundRobin => QueueSelector::RoundRobin,
                SpoolSelector::Key(k) => QueueSelector::KeyHash(k),
                SpoolSelector::Queue(q) => QueueSelector::Queue(*q),
            };
            let queue = match self.route(&p.topic).and_then(|r| self.select(&r, selector)) {
                Ok(q) => q,
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            };
            let lane = self.lane(&p.topic, queue);
            let mut st = lane.state.lock().expect("lane lock");
            out.push((
                p.id,
                Assignment {
                    producer_id: self.producer_id,
                    epoch: st.epoch,
                    queue,
                    base_sequence: st.next_sequence,
                },
            ));
            st.next_sequence = st.next_sequence.wrapping_add(p.count);
        }
        spool.record_assign(&out)
    }

    /// Sends one queue's assigned entries in order: the first alone (a broker that has no
    /// state for this producer and epoch accepts any sequence, so a later batch must not
    /// overtake it), then up to [`DRAIN_WINDOW_BATCHES`] at a time. Stops at the first error.
    fn drain_queue(
        &self,
        spool: &Spool,
        topic: &str,
        queue: u32,
        entries: &[(u64, Assignment)],
        report: &mut DrainReport,
    ) -> Result<(), ClientError> {
        let seen = self.cluster.generation();
        let conn = self.cluster.connection_for(topic, queue)?;
        let peer = conn.peer().to_string();
        let mut i = 0;
        let mut window = 1;
        while i < entries.len() {
            let end = (i + window).min(entries.len());
            let mut sent: Vec<(u64, u32, Pending)> = Vec::new();
            let mut failed = None;
            for (id, a) in &entries[i..end] {
                let e = spool.read(*id)?;
                let request = self.request(
                    topic,
                    a.queue,
                    a.producer_id,
                    a.epoch,
                    a.base_sequence,
                    e.count,
                );
                match conn.send(&request, e.body) {
                    Ok(p) => sent.push((*id, e.count, p)),
                    Err(err) => {
                        failed = Some(err);
                        break;
                    }
                }
            }
            let mut acked = Vec::new();
            for (id, count, p) in sent {
                let outcome = p.wait(self.config.request_timeout);
                if matches!(outcome, Err(ClientError::Timeout(_))) {
                    self.cluster.forget(&peer);
                }
                match self.after_attempt(&peer, seen, outcome) {
                    Ok(ack) => {
                        self.known_epoch
                            .note(&self.cluster, topic, queue, ack.epoch);
                        acked.push(id);
                        report.acked_entries += 1;
                        report.acked_messages += u64::from(count);
                        report.duplicates += u64::from(ack.duplicate);
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            crash_drill(report.acked_entries);
            spool.record_acked(&acked)?;
            if let Some(e) = failed {
                return Err(e);
            }
            i = end;
            window = DRAIN_WINDOW_BATCHES;
        }
        Ok(())
    }
}

/// `RINGMQ_SPOOL_FAILPOINT=drain-abort-after-acks=N`: the process aborts once a drain has
/// heard N acks, before it records them, so a test can crash exactly between the broker's
/// store and the spool's `Acked` marker. Never set in production.
fn crash_drill(acked: u64) {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        std::env::var("RINGMQ_SPOOL_FAILPOINT")
            .ok()
            .and_then(|v| v.strip_prefix("drain-abort-after-acks=")?.parse().ok())
    });
    if at.is_some_and(|n| acked >= n) {
        log::error!("failpoint drain-abort-after-acks: aborting after {acked} ack(s)");
        std::process::abort();
    }
}

/// Drains the spool while it is not empty, with backoff after a failed drain; woken when
/// something is spooled.
fn drain_loop(inner: Weak<Inner>, wake: mpsc::Receiver<()>) {
    /// A look at an idle spool this often, in case a wake-up was missed.
    const IDLE: Duration = Duration::from_secs(1);
    let mut failures = 0u32;
    let mut next_try = Instant::now();
    loop {
        let wait = {
            let Some(inner) = inner.upgrade() else { return };
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            let spool = inner
                .spool
                .as_ref()
                .expect("the drain thread runs with a spool");
            let now = Instant::now();
            if spool.pending_count() == 0 {
                failures = 0;
                IDLE
            } else if now < next_try {
                next_try - now
            } else {
                match Inner::drain(&inner) {
                    Ok(r) => {
                        failures = 0;
                        if r.acked_entries > 0 {
                            log::info!(
                                "spool drained: {} entr(ies) acked ({} already stored)",
                                r.acked_entries,
                                r.duplicates
                            );
                        }
                        Duration::ZERO
                    }
                    Err(e) => {
                        let wait = inner.backoff(failures);
                        failures = failures.saturating_add(1);
                        log::debug!("spool drain failed ({e}); next try in {wait:?}");
                        next_try = Instant::now() + wait;
                        wait
                    }
                }
            }
        };
        if wait.is_zero() {
            continue;
        }
        match wake.recv_timeout(wait) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// A sequence error is a consequence: an earlier batch of the queue was not stored.
fn is_sequence_error(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::SequenceGap) | Some(ErrorCode::OutOfOrderSequence)
    )
}

/// `cause`, noting the sequence error it led to.
fn with_consequence(cause: ClientError, consequence: &ClientError) -> ClientError {
    match cause {
        ClientError::Remote(r) => ClientError::Remote(RemoteError {
            code: r.code,
            message: format!("{} (a later batch then got: {consequence})", r.message),
        }),
        other => other,
    }
}

/// The same error for every batch of a window going to the spool, still retriable.
fn clone_retriable(e: &ClientError) -> ClientError {
    match e {
        ClientError::Connect { .. } => ClientError::ConnectionClosed(e.to_string()),
        other => clone_error(other),
    }
}

/// The same error for every message of a failed batch.
fn clone_error(e: &ClientError) -> ClientError {
    match e {
        ClientError::Remote(r) => ClientError::Remote(r.clone()),
        ClientError::Timeout(d) => ClientError::Timeout(*d),
        ClientError::ConnectionClosed(s) => ClientError::ConnectionClosed(s.clone()),
        // Its text as is: wrapping an Unexpected's text again said "unexpected response:" twice.
        ClientError::Unexpected(s) => ClientError::Unexpected(s.clone()),
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

/// Starts due rounds and times out unanswered batches, for every lane.
fn keeper_loop(inner: Weak<Inner>, wake: mpsc::Receiver<()>) {
    /// Longest sleep between looks: the granularity of the request deadline.
    const TICK: Duration = Duration::from_millis(100);
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            let lanes: Vec<Arc<Lane>> = inner
                .lanes
                .lock()
                .expect("lanes lock")
                .values()
                .cloned()
                .collect();
            let now = Instant::now();
            let mut next = now + TICK;
            for lane in &lanes {
                if let Some(t) = Inner::keep(&inner, lane, now) {
                    next = next.min(t);
                }
            }
            next
        };
        match wake.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// A random u64 without a dependency: std's SipHash keys are random per process.
/// The queue `selector` picks in `route` (`round_robin` counts the round-robin picks).
pub(crate) fn select_queue(
    route: &RouteTable,
    selector: QueueSelector<'_>,
    round_robin: &AtomicU32,
) -> Result<u32, ClientError> {
    let n = route.queues.len() as u32;
    if n == 0 {
        return Err(ClientError::Unexpected(format!(
            "topic {} has no queues",
            route.topic
        )));
    }
    Ok(match selector {
        QueueSelector::RoundRobin => round_robin.fetch_add(1, Ordering::Relaxed) % n,
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

/// The newest master epoch a producer saw acked. Epochs of different broker groups are not
/// comparable (each group's terms come from the one etcd revision counter, so another group's
/// newer election says nothing about this one's master): for a cluster topic they are kept
/// per group, and a queue whose group is not known now reports none (0, which fences no one).
#[derive(Default)]
struct KnownEpochs {
    /// Every ack while no cluster route was seen: one master (or a master and its slave).
    alone: AtomicU64,
    by_group: Mutex<HashMap<String, u64>>,
}

impl KnownEpochs {
    fn note(&self, cluster: &Cluster, topic: &str, queue: u32, epoch: u64) {
        if !cluster.spans_groups() {
            self.alone.fetch_max(epoch, Ordering::Relaxed);
        } else if let Some(group) = cluster.group_of(topic, queue) {
            let mut by_group = self.by_group.lock().expect("epochs lock");
            let known = by_group.entry(group).or_default();
            *known = (*known).max(epoch);
        }
    }

    fn get(&self, cluster: &Cluster, topic: &str, queue: u32) -> u64 {
        if !cluster.spans_groups() {
            return self.alone.load(Ordering::Relaxed);
        }
        cluster.group_of(topic, queue).map_or(0, |g| {
            let by_group = self.by_group.lock().expect("epochs lock");
            by_group.get(&g).copied().unwrap_or(0)
        })
    }
}
