//! The group consumer: joins a consumer group, reads the queues the group's coordinator
//! assigns it (its topics' queues and the group's retry topic), and reports each message's
//! result: [`GroupConsumer::ack`], or [`GroupConsumer::nack`] to have it come back after a
//! delay (and to the dead-letter queue after the group's `max_reconsume_times`).
//!
//! Committed offsets: per queue, the lowest offset still in flight (delivered, neither acked
//! nor nacked), or the fetch position when nothing is. [`GroupConsumer::commit`] sends them;
//! a background thread commits every `auto_commit_interval` and heartbeats every third of the
//! session timeout, and [`GroupConsumer::close`] commits and leaves. After a crash the group
//! reads again from the last commit: messages in flight at the crash come back (at least once,
//! the duplicates only from the uncommitted window).
//!
//! A nacked message is done here once the broker acked the send-back; the broker also marks
//! it given back, and a member that takes the queue over before the commit moved past it is
//! told to skip it there, so it comes back only through the retry topic.
//!
//! A message not acked within the group's `consume_timeout` is nacked by the consumer itself
//! at the next poll. On a rebalance (another member joined, left or timed out) the coordinator
//! hands out a new generation: queues that moved away are dropped here at the next heartbeat,
//! and the broker refuses this member's fetches and commits of the old generation, so it can
//! never move a queue's offset once it lost the queue.
//!
//! Fail-over: with a broker list ("master,slave"), coordinator requests (join, heartbeat,
//! commit, send-back) go to the next broker when one is lost or is not the master, and a
//! fetch that failed that way fails the cluster over and is started again at the next poll
//! (see [`crate::client::cluster`]). The new master does not know this member: its heartbeat
//! joins anew, and the queues it is given back start from the group's committed offsets
//! (replicated with the log) or go on from where this member was.
//!
//! Blocking and thread-safe: every method takes `&self`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::consumer::{fetch_request, parse_fetched, ConsumedMessage, Fetched};
use crate::client::{ClientError, Consumer, Durability};
use crate::protocol::{
    CommitOffsetsRequest, CommittedOffset, ErrorCode, GroupJoined, JoinGroupRequest, Membership,
    Request, Response, SendBackRequest, SentBack,
};

/// Property names the broker sets on a retried message (see `broker::groups::records`).
const PROP_ORIGIN_TOPIC: &[u8] = b"%ORIGIN_TOPIC";
const PROP_ORIGIN_QUEUE: &[u8] = b"%ORIGIN_QUEUE";
const PROP_ORIGIN_OFFSET: &[u8] = b"%ORIGIN_OFFSET";
const PROP_RECONSUME: &[u8] = b"%RECONSUME";

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group: String,
    pub topics: Vec<String>,
    /// The member is presumed dead this long after its last heartbeat.
    pub session_timeout: Duration,
    pub auto_commit_interval: Duration,
    /// How long one fetch waits at the broker for a queue to get data.
    pub fetch_wait: Duration,
    pub fetch_max_bytes: u32,
}

impl GroupConfig {
    pub fn new(group: &str, topics: &[&str]) -> GroupConfig {
        GroupConfig {
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            session_timeout: Duration::from_secs(10),
            auto_commit_interval: Duration::from_secs(1),
            fetch_wait: Duration::from_millis(500),
            fetch_max_bytes: 1 << 20,
        }
    }
}

/// A message delivered to a group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessage {
    /// Where the message was first produced (also for a retry, which is read from the
    /// group's retry topic).
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub payload: Bytes,
    /// Times this message failed before this delivery.
    pub reconsume_times: u32,
    pub born_timestamp_ms: u64,
    pub store_timestamp_ms: u64,
    pub properties: Vec<(Bytes, Bytes)>,
    /// Where this delivery was read from: (topic, queue, offset); what ack and nack name.
    pub source: (String, u32, u64),
}

impl GroupMessage {
    fn from_consumed(topic: &str, m: ConsumedMessage) -> GroupMessage {
        let prop = |name: &[u8]| {
            m.properties
                .iter()
                .find(|(k, _)| k.as_ref() == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        };
        let num = |name: &[u8]| prop(name).and_then(|v| v.parse::<u64>().ok());
        let (origin_topic, origin_queue, origin_offset) = match prop(PROP_ORIGIN_TOPIC) {
            Some(t) => (
                t,
                num(PROP_ORIGIN_QUEUE).unwrap_or(0) as u32,
                num(PROP_ORIGIN_OFFSET).unwrap_or(0),
            ),
            None => (topic.to_string(), m.queue, m.offset),
        };
        GroupMessage {
            topic: origin_topic,
            queue: origin_queue,
            offset: origin_offset,
            reconsume_times: num(PROP_RECONSUME).unwrap_or(0) as u32,
            key: m.key,
            payload: m.payload,
            born_timestamp_ms: m.born_timestamp_ms,
            store_timestamp_ms: m.store_timestamp_ms,
            properties: m.properties,
            source: (topic.to_string(), m.queue, m.offset),
        }
    }
}

/// One assigned queue.
#[derive(Debug, Default)]
struct QueueState {
    /// The next offset to fetch.
    next_fetch: u64,
    /// Delivered and not yet acked or nacked: offset -> when delivered.
    in_flight: BTreeMap<u64, Instant>,
    /// What the group has committed (or this member last committed).
    committed: Option<u64>,
    /// Fetched and not yet handed out by `poll`.
    buffered: VecDeque<GroupMessage>,
    /// A fetch for this queue is at the broker.
    fetching: bool,
    /// The last fetch found nothing beyond `next_fetch`.
    at_end: bool,
    /// Whether `next_fetch` is known (a queue never committed starts at its oldest offset,
    /// learned with a first fetch).
    positioned: bool,
    /// Offsets an earlier holder gave back (they come back as retries): not delivered here.
    skip: std::collections::BTreeSet<u64>,
}

struct State {
    member: String,
    generation: u64,
    consume_timeout: Duration,
    queues: BTreeMap<(String, u32), QueueState>,
    last_commit: Instant,
}

struct FetchDone {
    key: (String, u32),
    offset: u64,
    generation: u64,
    /// Where it went, at which fail-over generation (see [`crate::client::cluster`]).
    peer: Option<String>,
    seen: u64,
    outcome: Result<Fetched, ClientError>,
}

struct Inner {
    consumer: Consumer,
    config: GroupConfig,
    state: Mutex<State>,
    results_tx: Mutex<mpsc::Sender<FetchDone>>,
    results_rx: Mutex<mpsc::Receiver<FetchDone>>,
    stop: AtomicBool,
    stop_signal: (Mutex<bool>, Condvar),
}

pub struct GroupConsumer {
    inner: Arc<Inner>,
    background: Option<JoinHandle<()>>,
}

impl GroupConsumer {
    /// Joins `config.group` through `broker` (any shard's address) and starts the heartbeat.
    pub fn join(broker: &str, config: GroupConfig) -> Result<GroupConsumer, ClientError> {
        let mut consumer = Consumer::connect(broker)?;
        consumer.max_bytes = config.fetch_max_bytes;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            consumer,
            config,
            state: Mutex::new(State {
                member: String::new(),
                generation: 0,
                consume_timeout: Duration::from_secs(900),
                queues: BTreeMap::new(),
                last_commit: Instant::now(),
            }),
            results_tx: Mutex::new(tx),
            results_rx: Mutex::new(rx),
            stop: AtomicBool::new(false),
            stop_signal: (Mutex::new(false), Condvar::new()),
        });
        inner.heartbeat()?;
        let bg = inner.clone();
        let background = std::thread::Builder::new()
            .name("ringmq-group".into())
            .spawn(move || bg.background())
            .map_err(|e| ClientError::Unexpected(format!("cannot start a thread: {e}")))?;
        Ok(GroupConsumer {
            inner,
            background: Some(background),
        })
    }

    /// This member's id and generation.
    pub fn membership(&self) -> Membership {
        self.inner.membership()
    }

    /// The queues this member holds now.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        let st = self.inner.state.lock().expect("group state");
        st.queues.keys().cloned().collect()
    }

    /// Messages from the assigned queues, waiting up to `max_wait` for the first.
    pub fn poll(&self, max_wait: Duration) -> Result<Vec<GroupMessage>, ClientError> {
        self.inner.poll(max_wait)
    }

    /// Marks the delivery done: the committed offset may move past it.
    pub fn ack(&self, m: &GroupMessage) {
        let mut st = self.inner.state.lock().expect("group state");
        if let Some(q) = st.queues.get_mut(&(m.source.0.clone(), m.source.1)) {
            q.in_flight.remove(&m.source.2);
        }
    }

    /// Marks every delivered message of (topic, queue) below `offset` done (as read: `topic`
    /// is the source, the retry topic for a retry) and commits: "processed up to here".
    pub fn commit_up_to(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<Option<Durability>, ClientError> {
        {
            let mut st = self.inner.state.lock().expect("group state");
            if let Some(q) = st.queues.get_mut(&(topic.to_string(), queue)) {
                q.in_flight.retain(|o, _| *o >= offset);
            }
        }
        self.inner.commit()
    }

    /// Gives the message back: it comes back after `delay_level` (1..=18; 0: the default,
    /// 3 + its reconsume count), or goes to the dead-letter queue. Then it is done here.
    pub fn nack(
        &self,
        m: &GroupMessage,
        delay_level: u32,
        error: &str,
    ) -> Result<SentBack, ClientError> {
        let sent = self.inner.send_back(&m.source, delay_level, error)?;
        self.ack(m);
        Ok(sent)
    }

    /// Commits what is done on every assigned queue; `None` when there was nothing new.
    pub fn commit(&self) -> Result<Option<Durability>, ClientError> {
        self.inner.commit()
    }

    /// Whether every assigned queue was read to its end and everything delivered is done.
    pub fn at_end(&self) -> bool {
        let st = self.inner.state.lock().expect("group state");
        st.queues
            .values()
            .all(|q| q.at_end && q.buffered.is_empty() && q.in_flight.is_empty())
    }

    /// Commits, leaves the group and stops the background thread.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.stop_background();
        let mut committed = self.inner.commit();
        if committed
            .as_ref()
            .is_err_and(|e| e.code() == Some(ErrorCode::StaleGeneration))
        {
            // Another member joined or left since this one's last heartbeat (e.g. members
            // closing one after another). `commit` has just heartbeated into the new
            // generation, keeping what this member still holds: commit that again, or the
            // close fails and the offsets done since the last auto-commit are read again.
            committed = self.inner.commit();
        }
        let who = self.inner.membership();
        let left = self.inner.consumer.cluster().call_bootstrap(
            &Request::LeaveGroup {
                group: who.group,
                member: who.member,
            },
            Duration::ZERO,
        );
        committed?;
        left.map(|_| ())
    }

    fn stop_background(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        let (lock, cv) = &self.inner.stop_signal;
        *lock.lock().expect("stop lock") = true;
        cv.notify_all();
        if let Some(h) = self.background.take() {
            let _ = h.join();
        }
    }
}

impl Drop for GroupConsumer {
    /// Without `close`: the heartbeat stops and the group notices after the session timeout.
    fn drop(&mut self) {
        self.stop_background();
    }
}

impl Inner {
    fn membership(&self) -> Membership {
        self.who(&self.state.lock().expect("group state"))
    }

    /// This member as the broker knows it, from state already locked.
    fn who(&self, st: &State) -> Membership {
        Membership {
            group: self.config.group.clone(),
            member: st.member.clone(),
            generation: st.generation,
        }
    }

    fn call(&self, request: &Request) -> Result<Response, ClientError> {
        Ok(self
            .consumer
            .cluster()
            .call_bootstrap(request, Duration::ZERO)?
            .0)
    }

    /// Joins (or heartbeats) and applies the answer. An expired member joins anew.
    fn heartbeat(&self) -> Result<(), ClientError> {
        let member = self.state.lock().expect("group state").member.clone();
        let request = |member: String| {
            Request::JoinGroup(JoinGroupRequest {
                group: self.config.group.clone(),
                member,
                topics: self.config.topics.clone(),
                session_timeout_ms: self.config.session_timeout.as_millis() as u32,
            })
        };
        let response = match self.call(&request(member.clone())) {
            Err(e) if !member.is_empty() && e.code() == Some(ErrorCode::UnknownMember) => {
                self.call(&request(String::new()))?
            }
            other => other?,
        };
        let Response::GroupJoined(joined) = response else {
            return Err(ClientError::Unexpected(format!("{response:?}")));
        };
        self.apply(joined);
        Ok(())
    }

    fn apply(&self, joined: GroupJoined) {
        let mut st = self.state.lock().expect("group state");
        st.member = joined.member;
        st.consume_timeout = Duration::from_millis(u64::from(joined.consume_timeout_ms.max(1)));
        if joined.generation == st.generation {
            return;
        }
        st.generation = joined.generation;
        let mut queues = BTreeMap::new();
        for a in joined.assignment {
            let key = (a.topic, a.queue);
            // A queue kept across the rebalance keeps its position and what is in flight.
            let q = st.queues.remove(&key).unwrap_or_else(|| QueueState {
                next_fetch: a.committed.unwrap_or(0),
                committed: a.committed,
                positioned: a.committed.is_some(),
                skip: a.sent_back.into_iter().collect(),
                ..QueueState::default()
            });
            queues.insert(key, q);
        }
        st.queues = queues;
    }

    fn background(&self) {
        let beat = (self.config.session_timeout / 3).max(Duration::from_millis(100));
        let mut next_beat = Instant::now() + beat;
        let mut next_commit = Instant::now() + self.config.auto_commit_interval;
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next_beat {
                if let Err(e) = self.heartbeat() {
                    log::debug!("group {}: heartbeat: {e}", self.config.group);
                }
                next_beat = now + beat;
            }
            if now >= next_commit {
                if let Err(e) = self.commit() {
                    log::debug!("group {}: auto-commit: {e}", self.config.group);
                }
                next_commit = now + self.config.auto_commit_interval;
            }
            let wake = next_beat.min(next_commit);
            let (lock, cv) = &self.stop_signal;
            let stopped = lock.lock().expect("stop lock");
            if !*stopped {
                let _ = cv.wait_timeout(stopped, wake.saturating_duration_since(Instant::now()));
            }
        }
    }

    fn commit(&self) -> Result<Option<Durability>, ClientError> {
        let (who, offsets) = {
            let st = self.state.lock().expect("group state");
            let offsets: Vec<CommittedOffset> = st
                .queues
                .iter()
                .filter(|(_, q)| q.positioned)
                .filter_map(|((topic, queue), q)| {
                    // Fetched but not yet handed out counts as not done: the background
                    // commit can run between a fetch's answer and the poll that takes it.
                    let at = q
                        .in_flight
                        .keys()
                        .next()
                        .copied()
                        .or_else(|| q.buffered.front().map(|m| m.source.2))
                        .unwrap_or(q.next_fetch);
                    (q.committed != Some(at)).then(|| CommittedOffset {
                        topic: topic.clone(),
                        queue: *queue,
                        offset: at,
                    })
                })
                .collect();
            (self.who(&st), offsets)
        };
        if offsets.is_empty() {
            return Ok(None);
        }
        let request = Request::CommitOffsets(CommitOffsetsRequest {
            who: who.clone(),
            offsets: offsets.clone(),
        });
        match self.call(&request) {
            Ok(Response::OffsetsCommitted { durability, .. }) => {
                let mut st = self.state.lock().expect("group state");
                st.last_commit = Instant::now();
                if st.generation == who.generation {
                    for o in offsets {
                        if let Some(q) = st.queues.get_mut(&(o.topic, o.queue)) {
                            q.committed = Some(o.offset);
                        }
                    }
                }
                Ok(Some(durability))
            }
            Ok(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                if matches!(
                    e.code(),
                    Some(ErrorCode::StaleGeneration | ErrorCode::UnknownMember)
                ) {
                    // The queues moved: learn the new assignment now.
                    let _ = self.heartbeat();
                }
                Err(e)
            }
        }
    }

    fn send_back(
        &self,
        source: &(String, u32, u64),
        delay_level: u32,
        error: &str,
    ) -> Result<SentBack, ClientError> {
        let request = Request::SendBack(SendBackRequest {
            who: self.membership(),
            topic: source.0.clone(),
            queue: source.1,
            offset: source.2,
            delay_level,
            error: error.to_string(),
        });
        match self.call(&request)? {
            Response::SentBack(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Nacks deliveries older than the consume timeout (the member took too long).
    fn nack_timed_out(&self) {
        let timed_out: Vec<(String, u32, u64)> = {
            let st = self.state.lock().expect("group state");
            let now = Instant::now();
            st.queues
                .iter()
                .flat_map(|((t, q), qs)| {
                    qs.in_flight
                        .iter()
                        .filter(|(_, at)| now.saturating_duration_since(**at) > st.consume_timeout)
                        .map(move |(o, _)| (t.clone(), *q, *o))
                })
                .collect()
        };
        for source in timed_out {
            if self.send_back(&source, 0, "consume timeout").is_ok() {
                let mut st = self.state.lock().expect("group state");
                if let Some(q) = st.queues.get_mut(&(source.0.clone(), source.1)) {
                    q.in_flight.remove(&source.2);
                }
            }
        }
    }

    /// Starts a fetch for every assigned queue that has none at the broker and nothing
    /// buffered.
    fn start_fetches(&self) {
        self.position_new_queues();
        let (who, wanted) = {
            let mut st = self.state.lock().expect("group state");
            let who = self.who(&st);
            let mut wanted = Vec::new();
            for (key, q) in st.queues.iter_mut() {
                if q.positioned && !q.fetching && q.buffered.is_empty() {
                    q.fetching = true;
                    wanted.push((key.clone(), q.next_fetch));
                }
            }
            (who, wanted)
        };
        for (key, offset) in wanted {
            let tx = self.results_tx.lock().expect("results").clone();
            let request = fetch_request(
                &key.0,
                key.1,
                offset,
                self.config.fetch_max_bytes,
                self.config.fetch_wait,
                Some(who.clone()),
            );
            let generation = who.generation;
            let seen = self.consumer.cluster().generation();
            let mut peer = None;
            let sent = self
                .consumer
                .cluster()
                .connection_for(&key.0, key.1)
                .and_then(|conn| {
                    let k = key.clone();
                    let to = conn.peer().to_string();
                    peer = Some(to.clone());
                    conn.send_callback(&request, Bytes::new(), move |outcome| {
                        let outcome = outcome.and_then(|r| parse_fetched(r, k.1, offset));
                        let _ = tx.send(FetchDone {
                            key: k,
                            offset,
                            generation,
                            peer: Some(to),
                            seen,
                            outcome,
                        });
                    })
                    .inspect_err(|_| self.consumer.cluster().forget(conn.peer()))
                });
            if let Err(e) = sent {
                if let ClientError::Connect { addr, .. } = &e {
                    peer.get_or_insert_with(|| addr.clone());
                }
                // Completes like an answered fetch, so the queue is retried.
                let _ = self.results_tx.lock().expect("results").send(FetchDone {
                    key,
                    offset,
                    generation,
                    peer,
                    seen,
                    outcome: Err(e),
                });
            }
        }
    }

    /// Queues the group never committed start at their oldest stored offset (as do queues
    /// whose next offset retention removed).
    fn position_new_queues(&self) {
        let topics: std::collections::BTreeSet<String> = {
            let st = self.state.lock().expect("group state");
            st.queues
                .iter()
                .filter(|(_, q)| !q.positioned)
                .map(|((t, _), _)| t.clone())
                .collect()
        };
        for topic in topics {
            let request = Request::QueueStats {
                topic: topic.clone(),
            };
            let stats = match self.call(&request) {
                Ok(Response::QueueStats(stats)) => stats,
                _ => continue, // tried again at the next poll
            };
            let mut st = self.state.lock().expect("group state");
            for s in stats {
                if let Some(q) = st.queues.get_mut(&(topic.clone(), s.queue)) {
                    if !q.positioned && !q.fetching {
                        q.next_fetch = match q.committed {
                            None => s.min_offset,
                            Some(_) => q.next_fetch.max(s.min_offset),
                        };
                        q.positioned = true;
                    }
                }
            }
        }
    }

    /// Applies one finished fetch.
    fn finish_fetch(&self, done: FetchDone) -> Result<(), ClientError> {
        let mut st = self.state.lock().expect("group state");
        let generation = st.generation;
        let Some(q) = st.queues.get_mut(&done.key) else {
            return Ok(()); // the queue moved to another member meanwhile
        };
        q.fetching = false;
        if done.offset != q.next_fetch || done.generation != generation && done.outcome.is_err() {
            return Ok(());
        }
        match done.outcome {
            Ok(f) => {
                q.next_fetch = f.next_offset;
                q.at_end = f.next_offset >= f.end_offset;
                let topic = done.key.0.clone();
                let skip = &mut q.skip;
                q.buffered.extend(
                    f.messages
                        .into_iter()
                        .filter(|m| !skip.remove(&m.offset))
                        .map(|m| GroupMessage::from_consumed(&topic, m)),
                );
                Ok(())
            }
            Err(e) => {
                if let Some(peer) = &done.peer {
                    // Failed over (with a list): the next poll starts this fetch again there.
                    if self.consumer.cluster().note_failure(peer, done.seen, &e) {
                        return Err(e);
                    }
                }
                match e.code() {
                    Some(ErrorCode::OffsetOutOfRange) => {
                        // Retention removed what was to be read next: go on from the oldest.
                        q.positioned = false;
                        Ok(())
                    }
                    Some(ErrorCode::StaleGeneration | ErrorCode::UnknownMember) => {
                        drop(st);
                        self.heartbeat()
                    }
                    _ => Err(e),
                }
            }
        }
    }

    fn poll(&self, max_wait: Duration) -> Result<Vec<GroupMessage>, ClientError> {
        self.nack_timed_out();
        let deadline = Instant::now() + max_wait;
        loop {
            self.start_fetches();
            if let Some(out) = self.take_buffered() {
                return Ok(out);
            }
            let rx = self.results_rx.lock().expect("results");
            let wait = deadline.saturating_duration_since(Instant::now());
            let first = match rx.recv_timeout(wait) {
                Ok(done) => done,
                Err(_) => return Ok(Vec::new()),
            };
            let mut results = vec![first];
            results.extend(rx.try_iter());
            drop(rx);
            let mut error = None;
            for done in results {
                if let Err(e) = self.finish_fetch(done) {
                    error = Some(e);
                }
            }
            if let Some(out) = self.take_buffered() {
                return Ok(out);
            }
            if let Some(e) = error {
                let cluster = self.consumer.cluster();
                let failover = cluster.can_fail_over() && e.is_failover();
                if !(e.is_retriable() || failover) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
    }

    /// Everything buffered, marked in flight.
    fn take_buffered(&self) -> Option<Vec<GroupMessage>> {
        let mut st = self.state.lock().expect("group state");
        let now = Instant::now();
        let mut out = Vec::new();
        for q in st.queues.values_mut() {
            for m in q.buffered.drain(..) {
                q.in_flight.insert(m.source.2, now);
                out.push(m);
            }
        }
        (!out.is_empty()).then_some(out)
    }
}
