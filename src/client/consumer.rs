//! The consumer: pull from (queue, offset) with long polling, as calls or as an iterator.
//!
//! Fetches go straight to the shard that owns the queue (from the route table). The broker
//! returns whole stored records; a record may start before the requested offset (a batch is
//! one record), so messages below the requested offset are skipped here.
//!
//! Fail-over: with a broker list ("master,slave"), a fetch that hears NOT_MASTER or
//! SHUTTING_DOWN, or whose connection is lost or refused, fails the cluster over to the next
//! broker (see [`crate::client::cluster`]) and is asked again there, from the same offset,
//! with backoff, for up to [`Consumer::failover_timeout`]. A slave holds the same records at
//! the same offsets as its master, so the reader goes on where it was: no gap, no repeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::cluster::Cluster;
use crate::client::connection::{Pending, DEFAULT_REQUEST_TIMEOUT};
use crate::client::ClientError;
use crate::format::batch::BatchIter;
use crate::format::record::RecordIter;
use crate::protocol::{FetchRequest, Membership, Request, Response, RouteTable};

/// Default cap on one fetch response.
pub const DEFAULT_FETCH_MAX_BYTES: u32 = 1 << 20;
/// Default long-poll wait.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(1000);
/// Default time a fetch keeps failing over (with a broker list) before it reports the error.
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// First wait between fail-over attempts of a fetch; doubles up to [`FAILOVER_BACKOFF_MAX`].
const FAILOVER_BACKOFF: Duration = Duration::from_millis(50);
const FAILOVER_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where to start reading a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Beginning,
    End,
    Offset(u64),
}

impl std::str::FromStr for StartFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "beginning" => Ok(StartFrom::Beginning),
            "end" => Ok(StartFrom::End),
            n => n
                .parse()
                .map(StartFrom::Offset)
                .map_err(|_| format!("{s:?} is not `beginning`, `end` or an offset")),
        }
    }
}

/// One consumed message (owned: payloads are slices of the fetch response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedMessage {
    pub queue: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub tag: Option<Bytes>,
    pub payload: Bytes,
    /// The producer's properties, and the broker's (`%`-prefixed) on a retried message.
    pub properties: Vec<(Bytes, Bytes)>,
    pub born_timestamp_ms: u64,
    pub store_timestamp_ms: u64,
}

/// What one fetch returned.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub messages: Vec<ConsumedMessage>,
    /// Offset to ask for next.
    pub next_offset: u64,
    pub min_offset: u64,
    /// One past the newest visible offset when the broker answered.
    pub end_offset: u64,
}

/// A Fetch request; `group` makes it a group member's (checked against its generation).
pub fn fetch_request(
    topic: &str,
    queue: u32,
    offset: u64,
    max_bytes: u32,
    max_wait: Duration,
    group: Option<Membership>,
) -> Request {
    Request::Fetch(FetchRequest {
        topic: topic.to_string(),
        queue,
        offset,
        max_bytes,
        max_wait_ms: max_wait.as_millis().min(u32::MAX as u128) as u32,
        group,
    })
}

/// The messages at `offset` and after in a Fetch response of `queue`.
pub fn parse_fetched(
    (response, body): (Response, Bytes),
    queue: u32,
    offset: u64,
) -> Result<Fetched, ClientError> {
    let Response::Fetched(header) = response else {
        return Err(ClientError::Unexpected(format!("{response:?}")));
    };
    let mut messages = Vec::new();
    for record in RecordIter::new(&body) {
        let record = record.map_err(|e| {
            ClientError::Unexpected(format!("the broker sent a record that does not parse: {e}"))
        })?;
        // Zero-copy: the batch and every payload are views into the response body.
        let batch = body.slice_ref(record.body);
        for (i, m) in BatchIter::new(&batch).enumerate() {
            let m = m.map_err(|e| ClientError::Unexpected(format!("bad stored batch: {e}")))?;
            let msg_offset = record.header.base_queue_offset + i as u64;
            if msg_offset < offset {
                continue;
            }
            let sub = |s: &[u8]| batch.slice_ref(s);
            messages.push(ConsumedMessage {
                queue,
                offset: msg_offset,
                key: m.key.map(sub),
                tag: m.tag.map(sub),
                payload: sub(m.payload),
                properties: m.properties().map(|(k, v)| (sub(k), sub(v))).collect(),
                born_timestamp_ms: m.born_timestamp_ms,
                store_timestamp_ms: record.header.store_timestamp_ms,
            });
        }
    }
    Ok(Fetched {
        messages,
        next_offset: header.next_offset.max(offset),
        min_offset: header.min_offset,
        end_offset: header.end_offset,
    })
}

pub struct Consumer {
    cluster: Cluster,
    pub max_bytes: u32,
    pub max_wait: Duration,
    /// With a broker list: how long one fetch keeps failing over and asking again before it
    /// returns the error. Default [`DEFAULT_FAILOVER_TIMEOUT`]. Ignored with one address.
    pub failover_timeout: Duration,
    /// [`Consumer::fetch_all`] asks for a queue's next records as soon as an answer says more
    /// are there, before the caller has read this answer: the broker reads the log while the
    /// caller parses (a backlog read goes at the pace of the slower side, not of both one
    /// after the other). Costs up to `max_bytes` more per queue in flight. Default true.
    pub read_ahead: bool,
    /// Fetches sent ahead by `fetch_all`, by (topic, queue, offset).
    ahead: Mutex<HashMap<(String, u32, u64), Pending>>,
}

impl Consumer {
    /// Connects to `broker`: an address, or a comma-separated list of brokers (the first that
    /// answers is used; the others are failed over to).
    pub fn connect(broker: &str) -> Result<Consumer, ClientError> {
        Ok(Consumer {
            cluster: Cluster::connect(broker, DEFAULT_REQUEST_TIMEOUT)?,
            max_bytes: DEFAULT_FETCH_MAX_BYTES,
            max_wait: DEFAULT_MAX_WAIT,
            failover_timeout: DEFAULT_FAILOVER_TIMEOUT,
            read_ahead: true,
            ahead: Mutex::new(HashMap::new()),
        })
    }

    pub fn route(&self, topic: &str) -> Result<Arc<RouteTable>, ClientError> {
        self.cluster.route(topic)
    }

    /// The routes and connections this consumer uses.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// One fetch: waits up to `max_wait` for data at `offset`. With a broker list, fails over
    /// and asks again (see the module doc).
    pub fn fetch(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        max_wait: Duration,
    ) -> Result<Fetched, ClientError> {
        let mut failing_since = None;
        let mut backoff = FAILOVER_BACKOFF;
        loop {
            let seen = self.cluster.generation();
            let (peer, outcome) = self.fetch_once(topic, queue, offset, max_wait);
            let e = match outcome {
                Ok(f) => return Ok(f),
                Err(e) => e,
            };
            let peer = match (&e, peer) {
                (ClientError::Connect { addr, .. }, None) => Some(addr.clone()),
                (_, peer) => peer,
            };
            let Some(peer) = peer else { return Err(e) };
            if !self.cluster.note_failure(&peer, seen, &e) {
                return Err(e);
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.failover_timeout {
                return Err(e);
            }
            log::debug!("fetch of {topic}/{queue} at {offset} from {peer}: {e}; failing over");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(FAILOVER_BACKOFF_MAX);
        }
    }

    /// One fetch of each `(queue, offset)` of `topic`, all in flight at once (pipelined on
    /// each queue's connection), answered in the order asked: a reader of several queues
    /// waits one round trip per round instead of one per queue, and the broker prepares the
    /// next answer while this one is being read. A fetch that fails is asked again on its
    /// own through [`Consumer::fetch`] (fail-over included): a read can always be repeated.
    pub fn fetch_all(
        &self,
        topic: &str,
        fetches: &[(u32, u64)],
        max_wait: Duration,
    ) -> Vec<Result<Fetched, ClientError>> {
        let mut sent_ahead = self.take_ahead(topic, fetches);
        let send = |queue: u32, offset: u64| {
            let conn = self.cluster.connection_for(topic, queue).ok()?;
            let request = fetch_request(topic, queue, offset, self.max_bytes, max_wait, None);
            conn.send(&request, Bytes::new()).ok()
        };
        let sent: Vec<_> = fetches
            .iter()
            .zip(sent_ahead.iter_mut())
            .map(|(&(queue, offset), ahead)| ahead.take().or_else(|| send(queue, offset)))
            .collect();
        fetches
            .iter()
            .zip(sent)
            .map(|(&(queue, offset), pending)| {
                let answer = pending
                    .map(|p| p.wait(DEFAULT_REQUEST_TIMEOUT + max_wait))
                    .and_then(|r| r.ok());
                if let Some((Response::Fetched(h), _)) = &answer {
                    // More is there already: ask for it before parsing this answer.
                    if self.read_ahead && offset < h.next_offset && h.next_offset < h.end_offset {
                        if let Some(p) = send(queue, h.next_offset) {
                            let key = (topic.to_string(), queue, h.next_offset);
                            self.ahead.lock().expect("ahead lock").insert(key, p);
                        }
                    }
                }
                match answer.map(|r| parse_fetched(r, queue, offset)) {
                    Some(Ok(f)) => Ok(f),
                    _ => self.fetch(topic, queue, offset, max_wait),
                }
            })
            .collect()
    }

    /// The fetches sent ahead for `fetches` (one slot each); those of `topic` asked for no
    /// more (the caller moved on elsewhere) are dropped: their answers are discarded.
    fn take_ahead(&self, topic: &str, fetches: &[(u32, u64)]) -> Vec<Option<Pending>> {
        let mut ahead = self.ahead.lock().expect("ahead lock");
        if ahead.is_empty() {
            return fetches.iter().map(|_| None).collect();
        }
        let taken = fetches
            .iter()
            .map(|&(queue, offset)| ahead.remove(&(topic.to_string(), queue, offset)))
            .collect();
        ahead.retain(|(t, _, _), _| t != topic);
        taken
    }

    /// One attempt of [`Consumer::fetch`], with the peer it went to (if it got one).
    fn fetch_once(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        max_wait: Duration,
    ) -> (Option<String>, Result<Fetched, ClientError>) {
        let conn = match self.cluster.connection_for(topic, queue) {
            Ok(c) => c,
            Err(e) => return (None, Err(e)),
        };
        let request = fetch_request(topic, queue, offset, self.max_bytes, max_wait, None);
        let outcome = conn.call(&request, Bytes::new(), DEFAULT_REQUEST_TIMEOUT + max_wait);
        let peer = conn.peer().to_string();
        (
            Some(peer),
            outcome.and_then(|r| parse_fetched(r, queue, offset)),
        )
    }

    /// The first offset `from` stands for.
    pub fn resolve(&self, topic: &str, queue: u32, from: StartFrom) -> Result<u64, ClientError> {
        match from {
            StartFrom::Offset(o) => Ok(o),
            StartFrom::Beginning | StartFrom::End => {
                let probe = self.fetch(topic, queue, 0, Duration::ZERO);
                let (min, end) = match probe {
                    Ok(f) => (f.min_offset, f.end_offset),
                    // Offset 0 may be gone (retention): the error names the range.
                    Err(e) => return Err(e),
                };
                Ok(if from == StartFrom::Beginning {
                    min
                } else {
                    end
                })
            }
        }
    }

    /// Messages of one queue from `from` on; each `next` long-polls until a message arrives.
    pub fn iter(
        &self,
        topic: &str,
        queue: u32,
        from: StartFrom,
    ) -> Result<QueueIter<'_>, ClientError> {
        let offset = self.resolve(topic, queue, from)?;
        Ok(QueueIter {
            consumer: self,
            topic: topic.to_string(),
            queue,
            offset,
            buffered: std::collections::VecDeque::new(),
        })
    }
}

pub struct QueueIter<'a> {
    consumer: &'a Consumer,
    topic: String,
    queue: u32,
    offset: u64,
    buffered: std::collections::VecDeque<ConsumedMessage>,
}

impl QueueIter<'_> {
    /// The offset the next fetch starts from.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Iterator for QueueIter<'_> {
    type Item = Result<ConsumedMessage, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(m) = self.buffered.pop_front() {
                return Some(Ok(m));
            }
            match self
                .consumer
                .fetch(&self.topic, self.queue, self.offset, self.consumer.max_wait)
            {
                Ok(f) => {
                    self.offset = f.next_offset;
                    self.buffered.extend(f.messages);
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
