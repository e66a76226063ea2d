//! Transactional messages: RocketMQ's half message, two-phase end and check-back.
//!
//! A half message is a Produce naming a producer group and a transaction id. It is stored on
//! the shard that owns its real queue, in that shard's internal queue `%SYS%TXN` (no topic:
//! no consumer can fetch it, on the master or on a slave), acked like any produce (same flush
//! and replication rules). The producer then sends EndTransaction (commit or rollback) to the
//! same shard. Everything is a record in `%SYS%TXN`, so the state survives restarts and
//! failovers; nothing is deleted in place:
//!
//! ```text
//! half:     the producer's messages + %TXN_ID, %TXN_GROUP, %TXN_TOPIC, %TXN_QUEUE, %TXN_COUNT,
//!           %TXN_QUEUES (the topic's queue count, see [`ensure_topic`])
//! commit:   %TXN_OP=commit   %TXN_HALF=<offset> %TXN_COPY_FROM=<real queue end before the copy>
//! rollback: %TXN_OP=rollback %TXN_HALF=<offset>
//! checked:  %TXN_OP=checked  %TXN_HALF=<offset>,<offset>,...   (a check-back was issued)
//! discard:  %TXN_OP=discard  %TXN_HALF=<offset>   (rolled back after the most checks)
//! every record: %TXN_FLOOR=<oldest offset a load needs>
//! ```
//!
//! **Commit exactly once.** A commit appends its commit record and then the copy of the
//! messages into the real queue (with `%TXN_COPY_OF`), both while holding this shard's one
//! writer permit for transactions, so no other record of `%SYS%TXN` lands between them: any
//! later record of `%SYS%TXN` proves the copy was appended (the log is a prefix after a
//! crash). Only when the *last* record is a commit can its copy be missing (a crash between
//! the two, a slave promoted with the commit record but not the copy, or a failed append);
//! then, before acting on the view, the copy is looked for in the real queue from
//! `%TXN_COPY_FROM` on and appended if it is not there ([`ensure_copy`]).
//!
//! **Check-back.** A half with no end [`transaction_timeout_ms`] after it was stored is due:
//! the shard's checker ([`run_checker`], masters only) appends a `checked` record and offers
//! the check to the members of its producer group that wait on this shard with
//! CheckTransactions (a long poll: the waiting request is the member's own connection, and is
//! what makes it live). The member's checker answers with EndTransaction (`from_check`); an
//! UNKNOWN answer, or none, leaves the half to the next round,
//! [`transaction_check_interval_ms`] later. After [`transaction_check_max`] checks the half is
//! rolled back (`discard`), copied to `%TXN_DISCARDED%<group>` for a person to inspect,
//! counted and logged.
//!
//! **Idempotence.** A half re-sent with a transaction id the shard knows is answered with the
//! first one's offset (`duplicate`); an end of an ended transaction is answered with the first
//! end's state (`duplicate`). Ends are remembered for the last
//! [`MAX_REMEMBERED_ENDS`](table::MAX_REMEMBERED_ENDS) transactions.
//!
//! [`transaction_timeout_ms`]: crate::config::ServerConfig::transaction_timeout_ms
//! [`transaction_check_interval_ms`]: crate::config::ServerConfig::transaction_check_interval_ms
//! [`transaction_check_max`]: crate::config::ServerConfig::transaction_check_max

pub mod table;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::broker::groups::records::{single_batch, stored_messages, StoredMessage};
use crate::broker::groups::{self, now_unix_ms};
use crate::broker::{ack, topics, Result, ServiceError, Services};
use crate::format::batch::{BatchBuilder, BatchIter, Message};
use crate::protocol::{
    validate_group_name, CheckTransactionsRequest, EndTransactionRequest, ErrorCode,
    OpenTransaction, ProduceAck, Response, Transaction, TransactionCheck, TransactionEnded,
    TransactionList, TransactionOutcome, TransactionState,
};
use crate::replication::Role;
use crate::storage::{AppendRequest, Appended, QueueOffset};

use table::{
    as_checked, committed_copy, floor_of, is_copy_of, HalfInfo, Lookup, Op, TxnTable, TXN_LOG,
};

/// Longest transaction id and member id.
pub const MAX_ID_BYTES: usize = 128;
/// Longest a CheckTransactions waits.
pub const MAX_CHECK_WAIT_MS: u32 = 30_000;
/// Halves whose copies `copied_here` remembers (8 bytes each).
const COPIED_HERE_MAX: usize = 65_536;
/// Checks handed out per CheckTransactions answer.
const CHECKS_PER_POLL: usize = 32;
/// Halves checked (or discarded) per round of the checker.
const CHECKS_PER_ROUND: usize = 256;
/// How often a waiting CheckTransactions looks for checks.
const POLL_STEP: Duration = Duration::from_millis(10);

/// The topic a producer group's discarded half messages are copied to.
pub fn discarded_topic(group: &str) -> String {
    format!("%TXN_DISCARDED%{group}")
}

/// One shard's transactions: the view of `%SYS%TXN` and the check-backs on offer.
#[derive(Default)]
pub struct Transactions {
    table: RefCell<TxnTable>,
    /// The next offset of `%SYS%TXN` to apply; `None` until the first catch-up loads.
    applied: Cell<Option<u64>>,
    /// Where the load started: ends of halves below it are forgotten.
    loaded_from: Cell<u64>,
    /// Halves appended and not yet applied (not visible yet), by transaction id.
    in_flight: RefCell<HashMap<String, Appended>>,
    /// The half whose commit copy this process appended or found (see [`ensure_copy`]).
    confirmed_copy: Cell<Option<u64>>,
    /// Ends this process appended that the view has not applied yet (their records are not
    /// visible until durable): half -> the end. The view is built from visible records only,
    /// so without this a second end (a retry, a member's check-back answer) arriving before
    /// the first end's record is visible found the half open and committed it again.
    ended_unapplied: RefCell<BTreeMap<u64, UnappliedEnd>>,
    /// Halves whose commit copy this process appended (the last [`COPIED_HERE_MAX`]):
    /// `ensure_copy` need not search the real queue for them (the search waits until
    /// that queue is all visible, under the writer permit: one flush interval per end under
    /// ASYNC_FLUSH once a second commit came before the first was applied).
    copied_here: RefCell<std::collections::BTreeSet<u64>>,
    /// Checks issued and not yet handed to a member, per producer group: half -> checks so
    /// far including this one (oldest half first; a new round's offer replaces the last).
    offered: RefCell<HashMap<String, BTreeMap<u64, u32>>>,
    discarded: Cell<u64>,
    /// The epoch in which the checker made sure every open half's topic exists (see
    /// [`ensure_topic`]): once per process and promotion.
    topics_checked_in: Cell<Option<u64>>,
    /// One writer of `%SYS%TXN` at a time (and a commit's copy with its record).
    writing: Semaphore,
    catching_up: Semaphore,
}

/// An end appended and not applied yet (see `TxnState::ended_unapplied`).
#[derive(Clone)]
struct UnappliedEnd {
    id: String,
    state: TransactionState,
    /// The copy's offset in the real queue (a commit), else 0.
    offset: u64,
    /// The end record's offset in `%SYS%TXN`: applied once the view has read past it.
    record: u64,
}

/// glommio's semaphore with one permit and a `Default`.
struct Semaphore(glommio::sync::Semaphore);

impl Default for Semaphore {
    fn default() -> Self {
        Semaphore(glommio::sync::Semaphore::new(1))
    }
}

impl Semaphore {
    async fn one(&self) -> Result<glommio::sync::Permit<'_>> {
        self.0
            .acquire_permit(1)
            .await
            .map_err(|e| ServiceError::new(ErrorCode::ShuttingDown, e.to_string()))
    }
}

/// Whether the crash drill `name` is armed: `RINGMQ_FAILPOINT=<name>` in the broker's
/// environment (read once). Used by the tests to crash at the one point a log replay must
/// repair; never set in production.
fn failpoint(name: &str) -> bool {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("RINGMQ_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

fn internal(what: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(ErrorCode::Internal, what.to_string())
}

fn invalid(what: impl Into<String>) -> ServiceError {
    ServiceError::new(ErrorCode::InvalidArgument, what)
}

fn check_names(group: &str, id: &str, what: &str) -> Result<()> {
    validate_group_name(group)
        .map_err(|why| invalid(format!("invalid producer group {group:?}: {why}")))?;
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "a {what} must be 1..={MAX_ID_BYTES} bytes, not {}",
            id.len()
        )));
    }
    Ok(())
}

fn settings(s: &Services) -> (u64, u64, u32) {
    let c = &s.shard.config.server;
    (
        c.transaction_timeout_ms,
        c.transaction_check_interval_ms,
        c.transaction_check_max,
    )
}

/// Where the first load starts: the floor the log's last record names (every record carries
/// one), or the oldest record.
async fn load_start(s: &Services) -> Result<u64> {
    let store = s.shard.store();
    let stats = store.queue_stats(TXN_LOG, 0);
    let (min, end) = (stats.min_offset.0, stats.visible_end_offset.0);
    if end == 0 || end <= min {
        return Ok(min);
    }
    let read = store.read(TXN_LOG, 0, QueueOffset(end - 1), 1).await?;
    let last = stored_messages(&read.records, end - 1).map_err(internal)?;
    Ok(last
        .iter()
        .find(|m| m.offset == end - 1)
        .and_then(|m| floor_of(&m.message))
        .map_or(min, |f| f.clamp(min, end)))
}

/// Applies what `%SYS%TXN` holds beyond what the view has seen (visible records only).
pub async fn catch_up(s: &Services) -> Result<()> {
    let t = &s.transactions;
    let _one = t.catching_up.one().await?;
    let store = s.shard.store();
    let (timeout_ms, interval_ms, _) = settings(s);
    loop {
        let stats = store.queue_stats(TXN_LOG, 0);
        let applied = match t.applied.get() {
            Some(a) if a > stats.written_end_offset.0 => {
                // The log was truncated under the view (a replica dropping a diverged tail).
                log::warn!(
                    "shard {}: {TXN_LOG} ends at {} but {a} were applied: reloading transactions",
                    s.shard.shard,
                    stats.written_end_offset.0
                );
                *t.table.borrow_mut() = TxnTable::default();
                t.applied.set(None);
                t.confirmed_copy.set(None);
                t.ended_unapplied.borrow_mut().clear();
                t.copied_here.borrow_mut().clear();
                continue;
            }
            Some(a) => a,
            None => {
                let start = load_start(s).await?;
                t.loaded_from.set(start);
                t.applied.set(Some(start));
                start
            }
        };
        let from = applied.max(stats.min_offset.0);
        if from >= stats.visible_end_offset.0 {
            t.applied.set(Some(from));
            return Ok(());
        }
        let read = store.read(TXN_LOG, 0, QueueOffset(from), 1 << 20).await?;
        let messages = stored_messages(&read.records, from).map_err(internal)?;
        {
            let mut table = t.table.borrow_mut();
            let mut in_flight = t.in_flight.borrow_mut();
            for m in &messages {
                if let Err(why) = apply(&mut table, m, timeout_ms, interval_ms) {
                    log::warn!(
                        "shard {}: {TXN_LOG} offset {}: {why}; skipped",
                        s.shard.shard,
                        m.offset
                    );
                }
                if let Some(id) =
                    crate::broker::groups::records::property(&m.message, table::PROP_TXN_ID)
                {
                    in_flight.remove(id);
                }
            }
        }
        if read.next_offset.0 <= from {
            return Err(internal(format!(
                "{TXN_LOG} read at {from} made no progress"
            )));
        }
        t.applied.set(Some(read.next_offset.0));
        t.ended_unapplied
            .borrow_mut()
            .retain(|_, e| e.record >= read.next_offset.0);
    }
}

fn apply(
    table: &mut TxnTable,
    m: &StoredMessage,
    timeout_ms: u64,
    interval_ms: u64,
) -> std::result::Result<(), String> {
    match Op::from_message(&m.message)? {
        Some(op) => table.apply_op(&op, m.store_timestamp_ms, interval_ms),
        None => table.apply_half(
            m.offset,
            HalfInfo::from_message(&m.message)?,
            m.store_timestamp_ms,
            timeout_ms,
        ),
    }
    Ok(())
}

/// The floor the next record carries: the oldest open (or in-flight) half or remembered end,
/// else the record.
fn next_floor(s: &Services) -> u64 {
    let t = &s.transactions;
    let next = s.shard.store().queue_stats(TXN_LOG, 0).written_end_offset.0;
    let in_flight = t.in_flight.borrow().values().map(|a| a.base_offset.0).min();
    let table = t.table.borrow();
    [
        table.oldest_open(),
        table.oldest_remembered_end(),
        in_flight,
        Some(next),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(next)
}

/// Appends one op record (caller holds the writer permit).
async fn append_op(s: &Services, op: &Op) -> Result<Appended> {
    let mut m = Message::new(Bytes::new());
    for (k, v) in op.properties() {
        m = m.with_property(k, v);
    }
    m = m.with_property(table::PROP_TXN_FLOOR, next_floor(s).to_string());
    let body = single_batch(&m).map_err(internal)?;
    Ok(s.shard
        .store()
        .append(AppendRequest {
            topic: TXN_LOG,
            queue_id: 0,
            message_count: 1,
            producer: None,
            body: &body,
        })
        .await?)
}

/// An ack for something stored earlier (a duplicate): everything appended so far (an earlier
/// end may still be in the log's buffer, not written yet).
fn everything_so_far(s: &Services) -> Appended {
    let end = s.shard.store().watermarks().appended;
    Appended {
        base_offset: QueueOffset(0),
        count: 0,
        position: end,
        end,
        duplicate: true,
    }
}

/// A half message (a Produce with a transaction), on the owner of its real queue.
pub async fn produce_half(
    s: &Services,
    txn: Transaction,
    topic: &str,
    queue: u32,
    producer_id: u64,
    batch: &[u8],
    count: u32,
) -> Result<Response> {
    check_names(&txn.producer_group, &txn.id, "transaction id")?;
    if producer_id != 0 {
        return Err(invalid(
            "a half message is de-duplicated by its transaction id: send it with producer id 0",
        ));
    }
    let t = &s.transactions;
    let (appended, duplicate) = {
        let _one = t.writing.one().await?;
        catch_up(s).await?;
        let known = t.table.borrow().by_id(&txn.id);
        let in_flight = t.in_flight.borrow().get(&txn.id).copied();
        if let Some(offset) = known {
            let mut a = everything_so_far(s);
            a.base_offset = QueueOffset(offset);
            (a, true)
        } else if let Some(a) = in_flight {
            (a, true)
        } else {
            if t.table.borrow().open_count() + t.in_flight.borrow().len() >= table::MAX_OPEN {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "this shard holds {} open transactions, the most it may",
                        table::MAX_OPEN
                    ),
                ));
            }
            let info = HalfInfo {
                id: txn.id.clone(),
                group: txn.producer_group.clone(),
                topic: topic.to_string(),
                queue,
                count,
                queues: topics::queue_count(s, topic)?,
            };
            let props = info.properties(next_floor(s));
            let mut body = BytesMut::new();
            let mut out = BatchBuilder::new(&mut body);
            for m in BatchIter::new(batch) {
                let m = m.map_err(|e| ServiceError::new(ErrorCode::InvalidBatch, e.to_string()))?;
                out.push(&groups::records::with_broker_properties(
                    &m.to_message(),
                    &props,
                ))
                .map_err(|e| ServiceError::new(ErrorCode::MessageTooLarge, e.to_string()))?;
            }
            let appended = s
                .shard
                .store()
                .append(AppendRequest {
                    topic: TXN_LOG,
                    queue_id: 0,
                    message_count: count,
                    producer: None,
                    body: &body,
                })
                .await?;
            t.in_flight.borrow_mut().insert(txn.id.clone(), appended);
            (appended, false)
        }
    };
    let durability = ack::acknowledge(s, queue, &appended).await?;
    Ok(Response::Produced(ProduceAck {
        queue,
        base_offset: appended.base_offset.0,
        count,
        duplicate,
        durability,
        epoch: s.replication.epoch(),
        deliver_at_ms: 0,
    }))
}

/// The messages of the half at `half` (`count` of them).
async fn read_half(s: &Services, half: u64, count: u32) -> Result<Vec<Message>> {
    let read = s
        .shard
        .store()
        .read(TXN_LOG, 0, QueueOffset(half), 1 << 20)
        .await?;
    let messages: Vec<Message> = stored_messages(&read.records, half)
        .map_err(internal)?
        .into_iter()
        .filter(|m| m.offset < half + u64::from(count))
        .map(|m| m.message)
        .collect();
    if messages.len() != count as usize {
        return Err(internal(format!(
            "{TXN_LOG} offset {half}: {} of the half's {count} message(s) read",
            messages.len()
        )));
    }
    Ok(messages)
}

fn batch_of(messages: impl IntoIterator<Item = Message>) -> Result<(Bytes, u32)> {
    let mut body = BytesMut::new();
    let mut out = BatchBuilder::new(&mut body);
    for m in messages {
        out.push(&m).map_err(|e| internal(e.to_string()))?;
    }
    let count = out.count();
    Ok((body.freeze(), count))
}

/// Appends a committed half's copy to its real queue (caller holds the writer permit).
async fn append_copy(s: &Services, half: u64, topic: &str, queue: u32) -> Result<Appended> {
    let count = {
        match s.transactions.table.borrow().lookup(half) {
            Lookup::Open(h) => h.info.count,
            _ => 0,
        }
    };
    let count = if count == 0 {
        // Ended already (the usual case): the count is in the half's own properties.
        let first = read_half(s, half, 1).await?;
        HalfInfo::from_message(&first[0]).map_err(internal)?.count
    } else {
        count
    };
    let messages = read_half(s, half, count).await?;
    let (body, count) = batch_of(messages.iter().map(|m| committed_copy(m, half)))?;
    let appended = s
        .shard
        .store()
        .append(AppendRequest {
            topic,
            queue_id: queue,
            message_count: count,
            producer: None,
            body: &body,
        })
        .await?;
    s.transactions.confirmed_copy.set(Some(half));
    s.transactions
        .table
        .borrow_mut()
        .set_committed_offset(half, appended.base_offset.0);
    Ok(appended)
}

/// Creates `topic` with `queues` queues if this broker does not know it: a slave copies its
/// master's topics at most a second late, and a topic whose only records are half messages
/// (in `%SYS%TXN`) gives it no reason to copy sooner, so a slave promoted just after such a
/// topic was created lacks it. Its half messages recorded it; without it they could never end.
async fn ensure_topic(s: &Services, topic: &str, queues: u32) -> Result<()> {
    if queues == 0 || s.shard.topic(topic).is_some() {
        return Ok(());
    }
    log::warn!(
        "shard {}: topic {topic:?} of an open transaction is unknown here (a promoted slave \
         that had not copied it yet): creating it with {queues} queue(s), as its half recorded",
        s.shard.shard
    );
    groups::create_topic_from_any_shard(s, topic.to_string(), queues).await
}

/// Makes sure the last commit's copy is in its real queue (see the module doc); caller holds
/// the writer permit and has caught up.
async fn ensure_copy(s: &Services) -> Result<()> {
    let t = &s.transactions;
    let Some(u) = t.table.borrow().unconfirmed_copy().cloned() else {
        return Ok(());
    };
    if t.copied_here.borrow().contains(&u.half) {
        t.confirmed_copy.set(Some(u.half));
    }
    if t.confirmed_copy.get() == Some(u.half) {
        return Ok(());
    }
    ensure_topic(s, &u.topic, u.queues).await?;
    if topics::check_queue(s, &u.topic, u.queue).is_err() {
        log::warn!(
            "shard {}: committed half {} is for {}/{}, which does not exist: not copied",
            s.shard.shard,
            u.half,
            u.topic,
            u.queue
        );
        t.confirmed_copy.set(Some(u.half));
        return Ok(());
    }
    let store = s.shard.store();
    // A copy written but not visible yet would be missed: wait until the queue is all visible.
    let written = store.queue_stats(&u.topic, u.queue).written_end_offset.0;
    if written > 0 {
        let bound = Duration::from_millis(s.shard.config.storage.flush_timeout_ms);
        glommio::timer::timeout(bound, async {
            store
                .wait_visible_beyond(&u.topic, u.queue, QueueOffset(written - 1))
                .await;
            Ok(())
        })
        .await
        .map_err(|_| {
            ServiceError::new(
                ErrorCode::FlushDiskTimeout,
                format!("{}/{} is not all visible yet; retry", u.topic, u.queue),
            )
        })?;
    }
    let mut at = u.copy_from;
    let found = loop {
        let read = store
            .read(&u.topic, u.queue, QueueOffset(at), 1 << 20)
            .await?;
        let messages = stored_messages(&read.records, at).map_err(internal)?;
        if messages.iter().any(|m| is_copy_of(&m.message, u.half)) {
            break true;
        }
        if read.next_offset.0 <= at || read.next_offset.0 >= read.end_offset.0 {
            break false;
        }
        at = read.next_offset.0;
    };
    if found {
        t.confirmed_copy.set(Some(u.half));
    } else {
        log::warn!(
            "shard {}: committed half {} has no copy in {}/{} (a crash between the commit \
             record and the copy): copying it now",
            s.shard.shard,
            u.half,
            u.topic,
            u.queue
        );
        let appended = append_copy(s, u.half, &u.topic, u.queue).await?;
        ack::acknowledge(s, u.queue, &appended).await?;
    }
    Ok(())
}

/// EndTransaction, on the owner of the half's real queue.
pub async fn end(s: &Services, e: EndTransactionRequest) -> Result<Response> {
    s.check_writable("end transactions")?;
    check_names(
        &e.transaction.producer_group,
        &e.transaction.id,
        "transaction id",
    )?;
    topics::check_queue(s, &e.topic, e.queue)?;
    let t = &s.transactions;
    let store = s.shard.store();
    // A half acked under ASYNC_FLUSH may not be visible (applied) yet: wait for it, bounded.
    let in_flight = t
        .in_flight
        .borrow()
        .get(&e.transaction.id)
        .map(|a| a.base_offset.0);
    let stats = store.queue_stats(TXN_LOG, 0);
    if in_flight == Some(e.half_offset)
        || (e.half_offset >= stats.visible_end_offset.0
            && e.half_offset < stats.written_end_offset.0)
    {
        let bound = Duration::from_millis(s.shard.config.storage.flush_timeout_ms);
        let appended = store.watermarks().appended;
        let _ = glommio::timer::timeout(bound, async {
            // Under ASYNC_FLUSH the half becomes visible at the next background flush (500 ms
            // by default, and every end waited for it): ask for the flush now.
            let _ = store.wait_durable(appended).await;
            store
                .wait_visible_beyond(TXN_LOG, 0, QueueOffset(e.half_offset))
                .await;
            Ok(())
        })
        .await;
    }
    let (state, offset, duplicate, appended) = 'end: {
        let _one = t.writing.one().await?;
        catch_up(s).await?;
        ensure_copy(s).await?;
        let unapplied = t.ended_unapplied.borrow().get(&e.half_offset).cloned();
        if let Some(u) = unapplied.filter(|u| u.id == e.transaction.id) {
            break 'end (u.state, u.offset, true, everything_so_far(s));
        }
        let found = t.table.borrow().lookup(e.half_offset);
        let open = match found {
            Lookup::Ended(id, ended) if id == e.transaction.id => {
                let offset = ended.offset.unwrap_or(0);
                break 'end (ended.state, offset, true, everything_so_far(s));
            }
            Lookup::Open(h) if h.info.id == e.transaction.id => h,
            Lookup::Unknown if e.half_offset < t.loaded_from.get() => {
                return Err(ServiceError::new(
                    ErrorCode::TransactionNotFound,
                    format!(
                        "the half message at {} ended long ago; how is no longer known",
                        e.half_offset
                    ),
                ))
            }
            _ => {
                return Err(ServiceError::new(
                    ErrorCode::TransactionNotFound,
                    format!(
                        "no half message of transaction {:?} at offset {} on shard {}",
                        e.transaction.id, e.half_offset, s.shard.shard
                    ),
                ))
            }
        };
        if open.info.topic != e.topic || open.info.queue != e.queue {
            return Err(ServiceError::new(
                ErrorCode::TransactionNotFound,
                format!(
                    "the half message at {} is for {}/{}, not {}/{}",
                    e.half_offset, open.info.topic, open.info.queue, e.topic, e.queue
                ),
            ));
        }
        match e.outcome {
            TransactionOutcome::Unknown => (TransactionState::Open, 0, false, everything_so_far(s)),
            TransactionOutcome::Rollback => {
                let a = append_op(
                    s,
                    &Op::Rollback {
                        half: e.half_offset,
                    },
                )
                .await?;
                t.ended_unapplied.borrow_mut().insert(
                    e.half_offset,
                    UnappliedEnd {
                        id: e.transaction.id.clone(),
                        state: TransactionState::RolledBack,
                        offset: 0,
                        record: a.base_offset.0,
                    },
                );
                (TransactionState::RolledBack, 0, false, a)
            }
            TransactionOutcome::Commit => {
                let copy_from = store.queue_stats(&e.topic, e.queue).written_end_offset.0;
                let op = append_op(
                    s,
                    &Op::Commit {
                        half: e.half_offset,
                        copy_from,
                    },
                )
                .await?;
                if failpoint("txn-commit-before-copy") {
                    // A crash drill: the commit record is durable, its copy never written.
                    let _ = store.wait_durable(op.end).await;
                    log::error!("failpoint txn-commit-before-copy: aborting");
                    std::process::abort();
                }
                let a = append_copy(s, e.half_offset, &e.topic, e.queue).await?;
                // The copy follows its commit record in the log: a crash that keeps the record
                // and loses the copy restarts with no confirmed copy, and the replay repairs it.
                {
                    // Bounded: a commit of a half older than the last COPIED_HERE_MAX copies
                    // is searched for, as after a restart.
                    let mut copied = t.copied_here.borrow_mut();
                    copied.insert(e.half_offset);
                    while copied.len() > COPIED_HERE_MAX {
                        copied.pop_first();
                    }
                }
                t.ended_unapplied.borrow_mut().insert(
                    e.half_offset,
                    UnappliedEnd {
                        id: e.transaction.id.clone(),
                        state: TransactionState::Committed,
                        offset: a.base_offset.0,
                        record: op.base_offset.0,
                    },
                );
                (TransactionState::Committed, a.base_offset.0, false, a)
            }
        }
    };
    let durability = ack::acknowledge(s, e.queue, &appended).await?;
    Ok(Response::TransactionEnded(TransactionEnded {
        state,
        offset,
        duplicate,
        durability,
        epoch: s.replication.epoch(),
    }))
}

/// CheckTransactions: waits (up to `max_wait_ms`) for check-backs of the member's group on
/// this shard, and hands out those on offer.
pub async fn check_poll(s: &Services, c: CheckTransactionsRequest) -> Result<(Response, Bytes)> {
    check_names(&c.producer_group, &c.member, "member id")?;
    let t = &s.transactions;
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(c.max_wait_ms.min(MAX_CHECK_WAIT_MS)));
    loop {
        let halves: Vec<(u64, u32)> = {
            let mut offered = t.offered.borrow_mut();
            match offered.get_mut(&c.producer_group) {
                Some(q) => std::iter::from_fn(|| q.pop_first())
                    .take(CHECKS_PER_POLL)
                    .collect(),
                None => Vec::new(),
            }
        };
        let mut checks = Vec::new();
        let mut body = BytesMut::new();
        let mut left = Vec::new();
        for (half, count) in halves {
            if body.len() >= crate::protocol::limits::MAX_FETCH_BYTES as usize {
                left.push((half, count)); // bounded like a fetch: offered again next poll
                continue;
            }
            if t.ended_unapplied.borrow().contains_key(&half) {
                continue; // ended since it was offered (not applied yet)
            }
            let Lookup::Open(h) = t.table.borrow().lookup(half) else {
                continue; // ended since it was offered
            };
            let messages = match read_half(s, half, h.info.count).await {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("shard {}: check-back of half {half}: {e}", s.shard.shard);
                    continue;
                }
            };
            let (batch, _) = batch_of(messages.iter().map(as_checked))?;
            checks.push(TransactionCheck {
                topic: h.info.topic.clone(),
                queue: h.info.queue,
                half_offset: half,
                transaction_id: h.info.id.clone(),
                checks: count,
                batch_len: batch.len() as u32,
            });
            body.extend_from_slice(&batch);
        }
        if !left.is_empty() {
            let mut offered = t.offered.borrow_mut();
            offered
                .entry(c.producer_group.clone())
                .or_default()
                .extend(left);
        }
        if !checks.is_empty() || Instant::now() >= deadline || s.shard.is_shutting_down() {
            return Ok((Response::TransactionChecks(checks), body.freeze()));
        }
        glommio::timer::sleep(POLL_STEP).await;
    }
}

/// ListTransactions: this shard's open transactions.
pub async fn list(s: &Services) -> Result<Response> {
    catch_up(s).await?;
    let now = now_unix_ms();
    let table = s.transactions.table.borrow();
    let open = table
        .open_halves()
        .take(crate::protocol::messages::transactions::MAX_LISTED)
        .map(|(offset, h)| OpenTransaction {
            topic: h.info.topic.clone(),
            queue: h.info.queue,
            half_offset: *offset,
            transaction: Transaction {
                producer_group: h.info.group.clone(),
                id: h.info.id.clone(),
            },
            age_ms: now.saturating_sub(h.stored_ms),
            checks: h.checks,
            messages: h.info.count,
        })
        .collect();
    Ok(Response::Transactions(TransactionList {
        open,
        discarded: s.transactions.discarded.get(),
        open_total: table.open_count() as u64,
    }))
}

/// Open transactions and discards, for the metrics.
pub fn counts(s: &Services) -> (usize, u64) {
    (
        s.transactions.table.borrow().open_count(),
        s.transactions.discarded.get(),
    )
}

/// The check-back round of one shard: runs until shutdown (acts only as a master).
pub async fn run_checker(s: Rc<Services>) {
    let (timeout_ms, interval_ms, _) = settings(&s);
    let tick = Duration::from_millis((timeout_ms.min(interval_ms) / 10).clamp(10, 1000));
    let mut last_error: Option<String> = None;
    while !s.shard.is_shutting_down() {
        glommio::timer::sleep(tick).await;
        if s.replication.role() != Role::Master || s.replication.fence_message().is_some() {
            continue;
        }
        match check_round(&s).await {
            Ok(()) => last_error = None,
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(&text) {
                    log::warn!(
                        "shard {}: transaction check-back: {text}; retrying",
                        s.shard.shard
                    );
                    last_error = Some(text);
                }
            }
        }
    }
}

async fn check_round(s: &Services) -> Result<()> {
    let t = &s.transactions;
    let (_, _, check_max) = settings(s);
    let last = {
        let _one = t.writing.one().await?;
        catch_up(s).await?;
        let epoch = s.replication.epoch();
        if t.topics_checked_in.get() != Some(epoch) {
            // Before any end can be routed to this broker: a client finds the shard by topic.
            let missing: HashMap<String, u32> = t
                .table
                .borrow()
                .open_halves()
                .filter(|(_, h)| s.shard.topic(&h.info.topic).is_none())
                .map(|(_, h)| (h.info.topic.clone(), h.info.queues))
                .collect();
            for (topic, queues) in missing {
                ensure_topic(s, &topic, queues).await?;
            }
            t.topics_checked_in.set(Some(epoch));
        }
        ensure_copy(s).await?;
        let mut due = t.table.borrow().due(now_unix_ms(), CHECKS_PER_ROUND);
        due.retain(|(half, _)| !t.ended_unapplied.borrow().contains_key(half));
        if due.is_empty() {
            return Ok(());
        }
        let mut last = None;
        let mut checked = Vec::new();
        for (half, h) in due {
            if h.checks < check_max {
                checked.push((half, h.checks + 1, h.info.group));
                continue;
            }
            // Copied first: if the discard record survives a crash, so does the copy.
            let messages = read_half(s, half, h.info.count).await?;
            let topic = discarded_topic(&h.info.group);
            groups::ensure_internal_topics(s, [topic.clone()]).await?;
            let queue = (0..s.shard.shards as u32)
                .find(|q| s.shard.owner_of(&topic, *q) == s.shard.shard)
                .ok_or_else(|| internal(format!("{topic} has no queue on this shard")))?;
            let with_checks = messages.iter().map(|m| {
                m.clone()
                    .with_property(table::PROP_TXN_CHECKS, h.checks.to_string())
            });
            let (body, count) = batch_of(with_checks)?;
            s.shard
                .store()
                .append(AppendRequest {
                    topic: &topic,
                    queue_id: queue,
                    message_count: count,
                    producer: None,
                    body: &body,
                })
                .await?;
            last = Some(append_op(s, &Op::Discard { half }).await?);
            t.discarded.set(t.discarded.get() + 1);
            log::warn!(
                "shard {}: transaction {:?} of producer group {} (half {half} for {}/{}) \
                 rolled back after {} unanswered check-backs; copied to {topic}",
                s.shard.shard,
                h.info.id,
                h.info.group,
                h.info.topic,
                h.info.queue,
                h.checks
            );
        }
        if !checked.is_empty() {
            let halves = checked.iter().map(|(h, _, _)| *h).collect();
            last = Some(append_op(s, &Op::Checked { halves }).await?);
            let mut offered = t.offered.borrow_mut();
            for (half, count, group) in checked {
                // An offer nobody took is replaced by this round's.
                offered.entry(group).or_default().insert(half, count);
            }
        }
        last
    };
    if let Some(a) = last {
        ack::acknowledge(s, 0, &a).await?;
        // Applied now, so the next round does not see the same halves due again.
        let bound = Duration::from_millis(s.shard.config.storage.flush_timeout_ms);
        let _ = glommio::timer::timeout(bound, async {
            s.shard
                .store()
                .wait_visible_beyond(TXN_LOG, 0, a.base_offset)
                .await;
            Ok(())
        })
        .await;
        catch_up(s).await?;
    }
    Ok(())
}
