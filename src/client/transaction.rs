//! A transactional producer: half message, local transaction, commit or rollback, and the
//! check-backs of the broker for transactions whose end it never heard.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ringmq::client::transaction::{TransactionConfig, TransactionalProducer};
//! use ringmq::client::QueueSelector;
//! use ringmq::format::batch::Message;
//! use ringmq::protocol::TransactionOutcome;
//!
//! // Asked by the broker when an end was lost: look the transaction up and answer.
//! let checker = Arc::new(|_check: &ringmq::client::transaction::CheckBack| TransactionOutcome::Commit);
//! let producer = TransactionalProducer::start(
//!     TransactionConfig::new("127.0.0.1:10911", "order-service"),
//!     checker,
//! )
//! .unwrap();
//! let result = producer
//!     .send("orders", QueueSelector::RoundRobin, &[Message::new("paid")], |_half| {
//!         // the local transaction, e.g. a database commit
//!         TransactionOutcome::Commit
//!     })
//!     .unwrap();
//! println!("{:?}", result.state);
//! ```
//!
//! The half message and the end are both idempotent at the broker (by transaction id and half
//! offset), so both are retried on retriable errors. One checker thread per broker shard holds
//! a CheckTransactions long poll open: that open request is what makes this producer a live
//! member of its group, and the broker's check-backs come back as its answer.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::client::cluster::Cluster;
use crate::client::connection::DEFAULT_REQUEST_TIMEOUT;
use crate::client::producer::{random_u64, select_queue};
use crate::client::{ClientError, Durability, QueueSelector};
use crate::format::batch::{BatchBuilder, BatchIter, Message};
use crate::protocol::{
    CheckTransactionsRequest, EndTransactionRequest, ProduceRequest, Request, Response,
    Transaction, TransactionCheck, TransactionEnded, TransactionOutcome, TransactionState,
};

#[derive(Debug, Clone)]
pub struct TransactionConfig {
    /// Any shard's address, or a broker list (`a,b`: a master and its slave) to fail over in.
    pub broker: String,
    /// The producer group: the broker checks back with any live member of it.
    pub producer_group: String,
    pub request_timeout: Duration,
    /// Attempts of a half or an end after retriable errors. Default 10.
    pub retries: u32,
    /// First backoff, doubling per attempt up to 2 s.
    pub retry_backoff: Duration,
    /// How long one check-back poll waits at the broker. Default 2 s.
    pub check_wait: Duration,
    /// With a broker list (`a,b`): how long a half or an end keeps failing over (NOT_MASTER,
    /// a dead broker) past `retries`, while the group elects a new master. Halves and ends
    /// are idempotent (by transaction id), so a re-send is harmless. Default 15 s.
    pub failover_timeout: Duration,
}

impl TransactionConfig {
    pub fn new(broker: impl Into<String>, producer_group: impl Into<String>) -> TransactionConfig {
        TransactionConfig {
            broker: broker.into(),
            producer_group: producer_group.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retries: 10,
            retry_backoff: Duration::from_millis(50),
            check_wait: Duration::from_secs(2),
            failover_timeout: Duration::from_secs(15),
        }
    }
}

/// A stored half message: the handle its end names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfSent {
    pub topic: String,
    pub queue: u32,
    /// Its offset in the broker's half-message log (not in the queue).
    pub half_offset: u64,
    pub transaction_id: String,
    pub messages: u32,
    /// Where the half message's bytes were when the broker acked it.
    pub durability: Durability,
    /// The half had been stored before (a retry).
    pub duplicate: bool,
}

/// What a transactional send came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionResult {
    pub half: HalfSent,
    /// What the local transaction answered.
    pub outcome: TransactionOutcome,
    /// What the broker holds now: `Open` when the outcome was unknown (the broker checks
    /// back later).
    pub state: TransactionState,
    /// Committed: the offset of the first message in its queue.
    pub offset: Option<u64>,
    /// Where the end's record was when the broker acked it (`None`: no end was sent).
    pub durability: Option<Durability>,
}

/// A check-back: the broker asks how a transaction ended.
#[derive(Debug, Clone)]
pub struct CheckBack {
    pub topic: String,
    pub queue: u32,
    pub half_offset: u64,
    pub transaction_id: String,
    /// Check-backs of this transaction so far, this one included.
    pub checks: u32,
    /// The half message's messages, as the producer sent them.
    pub messages: Vec<Message>,
}

/// Answers check-backs (on a client thread).
pub type Checker = Arc<dyn Fn(&CheckBack) -> TransactionOutcome + Send + Sync>;

struct Inner {
    config: TransactionConfig,
    cluster: Cluster,
    member: String,
    next_id: AtomicU64,
    round_robin: AtomicU32,
    stopping: AtomicBool,
    /// Check-backs answered (commit or rollback sent and acked), for tools and tests.
    answered: AtomicU64,
}

pub struct TransactionalProducer {
    inner: Arc<Inner>,
    checkers: Vec<JoinHandle<()>>,
}

impl TransactionalProducer {
    /// Connects, and starts answering check-backs with `checker` on every shard.
    pub fn start(
        config: TransactionConfig,
        checker: Checker,
    ) -> Result<TransactionalProducer, ClientError> {
        crate::protocol::validate_group_name(&config.producer_group).map_err(|why| {
            ClientError::InvalidArgument(format!(
                "invalid producer group {:?}: {why}",
                config.producer_group
            ))
        })?;
        let cluster = Cluster::connect(&config.broker, config.request_timeout)?;
        let shards = match cluster
            .call_bootstrap(&Request::BrokerInfo, Duration::ZERO)?
            .0
        {
            Response::BrokerInfo(info) => info.shard_addresses,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let inner = Arc::new(Inner {
            config,
            cluster,
            member: format!("{:016x}", random_u64()),
            next_id: AtomicU64::new(0),
            round_robin: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            answered: AtomicU64::new(0),
        });
        let checkers = shards
            .into_iter()
            .enumerate()
            .map(|(shard, addr)| {
                let inner = inner.clone();
                let checker = checker.clone();
                std::thread::Builder::new()
                    .name(format!("ringmq-txn-check-{shard}"))
                    .spawn(move || check_loop(&inner, shard as u32, &addr, &*checker))
                    .expect("spawn checker thread")
            })
            .collect();
        Ok(TransactionalProducer { inner, checkers })
    }

    /// This producer's member id in its group.
    pub fn member(&self) -> &str {
        &self.inner.member
    }

    /// Check-backs this producer answered with commit or rollback.
    pub fn answered_checks(&self) -> u64 {
        self.inner.answered.load(Ordering::Relaxed)
    }

    /// Sends `messages` as one half message, runs `local` with it, and ends the transaction
    /// as `local` says (an unknown outcome sends no end: the broker checks back).
    pub fn send(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        messages: &[Message],
        local: impl FnOnce(&HalfSent) -> TransactionOutcome,
    ) -> Result<TransactionResult, ClientError> {
        let half = self.send_half(topic, selector, messages)?;
        let outcome = local(&half);
        if outcome == TransactionOutcome::Unknown {
            return Ok(TransactionResult {
                half,
                outcome,
                state: TransactionState::Open,
                offset: None,
                durability: None,
            });
        }
        let ended = self.end(&half, outcome)?;
        Ok(TransactionResult {
            half,
            outcome,
            state: ended.state,
            offset: (ended.state == TransactionState::Committed).then_some(ended.offset),
            durability: Some(ended.durability),
        })
    }

    /// The first phase alone: stores `messages` as a half message (invisible until ended).
    pub fn send_half(
        &self,
        topic: &str,
        selector: QueueSelector<'_>,
        messages: &[Message],
    ) -> Result<HalfSent, ClientError> {
        if messages.is_empty() {
            return Err(ClientError::InvalidArgument("an empty batch".into()));
        }
        let inner = &self.inner;
        let route = inner.cluster.route(topic)?;
        let queue = select_queue(&route, selector, &inner.round_robin)?;
        let mut body = BytesMut::new();
        let mut batch = BatchBuilder::new(&mut body);
        for m in messages {
            batch
                .push(m)
                .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        }
        let count = batch.count();
        let body = body.freeze();
        let id = format!(
            "{}-{}",
            inner.member,
            inner.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let request = Request::Produce(ProduceRequest {
            topic: topic.to_string(),
            queue: Some(queue),
            producer_id: 0,
            producer_epoch: 0,
            base_sequence: 0,
            message_count: count,
            timeout_ms: inner
                .config
                .request_timeout
                .as_millis()
                .min(u32::MAX as u128) as u32,
            known_epoch: 0,
            delay: None,
            transaction: Some(Transaction {
                producer_group: inner.config.producer_group.clone(),
                id: id.clone(),
            }),
        });
        match inner.call_with_retries(topic, queue, &request, body)? {
            Response::Produced(ack) => Ok(HalfSent {
                topic: topic.to_string(),
                queue,
                half_offset: ack.base_offset,
                transaction_id: id,
                messages: ack.count,
                durability: ack.durability,
                duplicate: ack.duplicate,
            }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The second phase: commit or roll back `half` (a retry of an end is harmless).
    pub fn end(
        &self,
        half: &HalfSent,
        outcome: TransactionOutcome,
    ) -> Result<TransactionEnded, ClientError> {
        self.inner.end(
            &half.topic,
            half.queue,
            half.half_offset,
            &half.transaction_id,
            outcome,
            false,
        )
    }

    /// Stops answering check-backs (another member of the group takes them over).
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        for t in self.checkers.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TransactionalProducer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    fn call_with_retries(
        &self,
        topic: &str,
        queue: u32,
        request: &Request,
        body: Bytes,
    ) -> Result<Response, ClientError> {
        let mut backoff = self.config.retry_backoff;
        let mut attempt = 0;
        let started = Instant::now();
        loop {
            let seen = self.cluster.generation();
            let mut peer = None;
            let outcome = self.cluster.owner_address(topic, queue).and_then(|addr| {
                let conn = self.cluster.connection(&addr);
                peer = Some(addr);
                let conn = conn?;
                let r = conn.call(request, body.clone(), self.config.request_timeout);
                if matches!(r, Err(ClientError::ConnectionClosed(_))) {
                    self.cluster.forget(conn.peer());
                }
                r
            });
            let e = match outcome {
                Ok((response, _)) => return Ok(response),
                Err(e) => e,
            };
            // With a list, NOT_MASTER or a dead broker moves to the next one (routes dropped).
            let failing_over = match &peer {
                Some(p) => self.cluster.note_failure(p, seen, &e),
                None => self.cluster.can_fail_over() && e.is_failover(),
            };
            let retry = (e.is_retriable() && attempt < self.config.retries)
                || (failing_over && started.elapsed() < self.config.failover_timeout);
            if !retry {
                return Err(e);
            }
            attempt += 1;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn end(
        &self,
        topic: &str,
        queue: u32,
        half_offset: u64,
        id: &str,
        outcome: TransactionOutcome,
        from_check: bool,
    ) -> Result<TransactionEnded, ClientError> {
        let request = Request::EndTransaction(EndTransactionRequest {
            topic: topic.to_string(),
            queue,
            half_offset,
            transaction: Transaction {
                producer_group: self.config.producer_group.clone(),
                id: id.to_string(),
            },
            outcome,
            from_check,
        });
        match self.call_with_retries(topic, queue, &request, Bytes::new())? {
            Response::TransactionEnded(e) => Ok(e),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// The check-backs in a CheckTransactions answer, with their messages from `body`.
fn parse_checks(checks: Vec<TransactionCheck>, body: &Bytes) -> Result<Vec<CheckBack>, String> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(checks.len());
    for c in checks {
        let end = at + c.batch_len as usize;
        if end > body.len() {
            return Err(format!(
                "check of {} says {} bytes but {} are left",
                c.transaction_id,
                c.batch_len,
                body.len() - at
            ));
        }
        let batch = body.slice(at..end);
        let messages = BatchIter::new(&batch)
            .map(|m| {
                m.map(|m| m.to_message_in(&batch))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        at = end;
        out.push(CheckBack {
            topic: c.topic,
            queue: c.queue,
            half_offset: c.half_offset,
            transaction_id: c.transaction_id,
            checks: c.checks,
            messages,
        });
    }
    Ok(out)
}

/// Shard `shard`'s address at the broker the list points at now.
fn shard_address(inner: &Inner, shard: u32) -> Option<String> {
    match inner
        .cluster
        .call_bootstrap(&Request::BrokerInfo, Duration::ZERO)
    {
        Ok((Response::BrokerInfo(info), _)) => info.shard_addresses.get(shard as usize).cloned(),
        _ => None,
    }
}

/// One shard's check-backs: poll, ask the checker, send its answer; until the producer stops.
fn check_loop(
    inner: &Inner,
    shard: u32,
    addr: &str,
    checker: &(dyn Fn(&CheckBack) -> TransactionOutcome + Send + Sync),
) {
    let request = Request::CheckTransactions(CheckTransactionsRequest {
        producer_group: inner.config.producer_group.clone(),
        member: inner.member.clone(),
        shard,
        max_wait_ms: inner.config.check_wait.as_millis() as u32,
    });
    let mut backoff = inner.config.retry_backoff;
    let mut addr = addr.to_string();
    while !inner.stopping.load(Ordering::Relaxed) {
        let seen = inner.cluster.generation();
        let polled = inner.cluster.connection(&addr).and_then(|conn| {
            let r = conn.call(
                &request,
                Bytes::new(),
                inner.config.check_wait + inner.config.request_timeout,
            );
            if matches!(r, Err(ClientError::ConnectionClosed(_))) {
                inner.cluster.forget(conn.peer());
            }
            r
        });
        let checks = match polled {
            Ok((Response::TransactionChecks(checks), body)) => parse_checks(checks, &body),
            Ok((other, _)) => Err(format!("unexpected answer {other:?}")),
            Err(e) => {
                // With a list, poll this shard of the broker the list fails over to.
                if inner.cluster.note_failure(&addr, seen, &e) {
                    if let Some(a) = shard_address(inner, shard) {
                        addr = a;
                    }
                }
                Err(e.to_string())
            }
        };
        let checks = match checks {
            Ok(c) => {
                backoff = inner.config.retry_backoff;
                c
            }
            Err(_) => {
                // The broker is down or restarting: poll again after a backoff.
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        for check in checks {
            let outcome = checker(&check);
            if outcome == TransactionOutcome::Unknown {
                continue; // asked again next round
            }
            let ended = inner.end(
                &check.topic,
                check.queue,
                check.half_offset,
                &check.transaction_id,
                outcome,
                true,
            );
            match ended {
                Ok(_) => {
                    inner.answered.fetch_add(1, Ordering::Relaxed);
                }
                // The broker asks again at its next check; say why this answer did not land.
                Err(e) => log::warn!(
                    "transaction {:?}: the answer {outcome:?} to a check-back failed: {e}",
                    check.transaction_id
                ),
            }
        }
    }
}
