//! Retries, delays and dead letters: what happens to a message a group member gives back,
//! and to a producer's delayed message.
//!
//! SendBack runs on the shard that owns the message's queue. The message is copied, with its
//! origin (first topic, queue, offset), its failure count and the member's error text as
//! properties (`groups::records`), either
//! - to `%SYS%SCHEDULE` queue `level - 1` of this shard, due `DELAY_LEVELS_MS[level - 1]`
//!   from now and addressed to this shard's queue of `%RETRY%<group>`, or
//! - once it has failed more than the group's `max_reconsume_times`, to this shard's queue
//!   of `%DLQ%<group>`.
//!
//! Both are appends acked like a produce; then the group's coordinator records that the
//! message was given back (a `SentBack` record), so if the member dies before its commit moves
//! past the message, the next holder of the queue skips it there (the join hands it the
//! given-back offsets): it comes back only through the retry topic. The member treats the
//! message as done once the send-back is acked.
//!
//! A producer's delayed batch ([`produce_delayed`]) takes the same road, addressed to its own
//! queue: with a delay level it waits that level; with a deliver-at time (at most
//! [`MAX_DELIVER_AHEAD_MS`] ahead) it waits the longest level that does not pass the time,
//! and again from there (hops), so it is delivered at its time or less than a second after.
//!
//! The delay scheduler ([`run_scheduler`], one per shard, master only) reads each level's
//! queue in order: every message of a level waits the same delay, so the queue is in due
//! order and only its head needs watching. It copies due messages into their target queue
//! and then appends its cursor (a progress record in `%SYS%GROUPS`), so the schedule survives
//! restarts and failovers: it is all in the log. A crash between a delivery and its progress
//! record delivers those (at most [`DELIVER_BATCH`]) messages again: at least once.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use crate::broker::groups::records::{
    number_property, property, single_batch, stored_messages, with_broker_properties,
    without_schedule_properties, GroupRecord, DELAY_LEVELS_MS, PROP_DELIVER_AT, PROP_ERROR,
    PROP_FINAL_AT, PROP_ORIGIN_OFFSET, PROP_ORIGIN_QUEUE, PROP_ORIGIN_TOPIC, PROP_RECONSUME,
    PROP_TARGET_QUEUE, PROP_TARGET_TOPIC, SCHEDULE_LOG,
};
use crate::broker::groups::{self, dlq_topic, now_unix_ms, retry_topic};
use crate::broker::{ack, topics, Result, ServiceError, Services};
use crate::format::batch::BatchIter;
use crate::protocol::{Delay, Durability, ErrorCode, Response, SendBackRequest, SentBack};
use crate::replication::Role;
use crate::storage::{AppendRequest, Appended, QueueOffset};

/// Furthest ahead a producer's deliver-at time may be.
pub const MAX_DELIVER_AHEAD_MS: u64 = 3 * 24 * 3600 * 1000;

/// The level with the longest delay not over `remaining_ms` (level 1 below a second).
pub fn level_for(remaining_ms: u64) -> u32 {
    DELAY_LEVELS_MS
        .iter()
        .rposition(|d| *d <= remaining_ms)
        .map_or(1, |i| i as u32 + 1)
}

/// A delayed batch, stored in the schedule (on the shard that owns `topic`/`queue`); returns
/// the append, when it is due, and its durability.
pub async fn produce_delayed(
    s: &Services,
    topic: &str,
    queue: u32,
    delay: Delay,
    producer_id: u64,
    batch: &[u8],
) -> Result<(Appended, u64, Durability)> {
    if producer_id != 0 {
        return Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            "a delayed send is not de-duplicated: send it with producer id 0",
        ));
    }
    let now = now_unix_ms();
    let (level, final_at) = match delay {
        Delay::Level(l) if (1..=DELAY_LEVELS_MS.len() as u32).contains(&l) => {
            (l, now + DELAY_LEVELS_MS[l as usize - 1])
        }
        Delay::Level(l) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidArgument,
                format!("delay level {l} is not 1..=18"),
            ))
        }
        Delay::At(at) if at > now + MAX_DELIVER_AHEAD_MS => {
            return Err(ServiceError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "deliver_at_ms {at} is {} ms ahead; at most {MAX_DELIVER_AHEAD_MS} (3 days)",
                    at - now
                ),
            ))
        }
        Delay::At(at) => (level_for(at.saturating_sub(now)), at.max(now)),
    };
    let hop_due = now + DELAY_LEVELS_MS[level as usize - 1];
    let props = [
        (PROP_TARGET_TOPIC, topic.to_string()),
        (PROP_TARGET_QUEUE, queue.to_string()),
        (PROP_DELIVER_AT, hop_due.to_string()),
        (PROP_FINAL_AT, final_at.to_string()),
    ];
    let mut body = bytes::BytesMut::new();
    let mut out = crate::format::batch::BatchBuilder::new(&mut body);
    for m in BatchIter::new(batch) {
        let m = m.map_err(|e| ServiceError::new(ErrorCode::InvalidBatch, e.to_string()))?;
        out.push(&with_broker_properties(&m.to_message(), &props))
            .map_err(|e| ServiceError::new(ErrorCode::MessageTooLarge, e.to_string()))?;
    }
    let count = out.count();
    let appended = s
        .shard
        .store()
        .append(AppendRequest {
            topic: SCHEDULE_LOG,
            queue_id: level - 1,
            message_count: count,
            producer: None,
            body: &body,
        })
        .await?;
    let durability = ack::acknowledge(s, queue, &appended).await?;
    Ok((appended, final_at, durability))
}

/// Longest error text kept with a message.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// Messages the scheduler delivers per level before it records its cursor.
pub const DELIVER_BATCH: usize = 32;
/// How often the scheduler looks at the heads of the levels.
const SCHEDULER_TICK: Duration = Duration::from_millis(50);

/// This shard's queue of a broker topic with one queue per shard.
fn local_queue(s: &Services, topic: &str) -> Result<u32> {
    let queues = topics::queue_count(s, topic)?;
    (0..queues)
        .find(|q| s.shard.owner_of(topic, *q) == s.shard.shard)
        .ok_or_else(|| {
            ServiceError::new(
                ErrorCode::Internal,
                format!("{topic} has no queue on shard {}", s.shard.shard),
            )
        })
}

fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// SendBack (on the owner of the message's queue).
pub async fn send_back(s: &Services, b: SendBackRequest) -> Result<Response> {
    s.check_writable("send messages back")?;
    topics::check_queue(s, &b.topic, b.queue)?;
    if b.delay_level as usize > DELAY_LEVELS_MS.len() {
        return Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!("delay level {} is not 0 (default) or 1..=18", b.delay_level),
        ));
    }
    let settings = groups::check_member(s, &b.who, &b.topic, b.queue).await?;
    let group = &b.who.group;
    let store = s.shard.store();
    let read = store
        .read(&b.topic, b.queue, QueueOffset(b.offset), 1)
        .await?;
    let found = stored_messages(&read.records, b.offset)
        .map_err(|e| ServiceError::new(ErrorCode::Internal, e))?
        .into_iter()
        .find(|m| m.offset == b.offset);
    let Some(stored) = found else {
        return Err(ServiceError::new(
            ErrorCode::OffsetOutOfRange,
            format!(
                "{}/{} has no message at offset {}",
                b.topic, b.queue, b.offset
            ),
        ));
    };
    let m = &stored.message;
    let failed_before = number_property(m, PROP_RECONSUME).unwrap_or(0) as u32;
    let times = failed_before + 1;
    let origin = match property(m, PROP_ORIGIN_TOPIC) {
        Some(topic) => (
            topic.to_string(),
            number_property(m, PROP_ORIGIN_QUEUE)
                .unwrap_or(0)
                .to_string(),
            number_property(m, PROP_ORIGIN_OFFSET)
                .unwrap_or(0)
                .to_string(),
        ),
        None => (b.topic.clone(), b.queue.to_string(), b.offset.to_string()),
    };
    let mut props = vec![
        (PROP_ORIGIN_TOPIC, origin.0),
        (PROP_ORIGIN_QUEUE, origin.1),
        (PROP_ORIGIN_OFFSET, origin.2),
        (PROP_RECONSUME, times.to_string()),
        (PROP_ERROR, cut(&b.error, MAX_ERROR_TEXT_BYTES).to_string()),
    ];
    let (target_log, target_queue, destination) = if times > settings.max_reconsume_times {
        let dlq = dlq_topic(group);
        let q = local_queue(s, &dlq)?;
        (dlq.clone(), q, dlq)
    } else {
        let level = match b.delay_level {
            0 => (3 + failed_before).min(DELAY_LEVELS_MS.len() as u32),
            l => l,
        };
        let retry = retry_topic(group);
        let q = local_queue(s, &retry)?;
        let due = now_unix_ms() + DELAY_LEVELS_MS[level as usize - 1];
        props.push((PROP_TARGET_TOPIC, retry.clone()));
        props.push((PROP_TARGET_QUEUE, q.to_string()));
        props.push((PROP_DELIVER_AT, due.to_string()));
        (SCHEDULE_LOG.to_string(), level - 1, retry)
    };
    let body = single_batch(&with_broker_properties(m, &props))
        .map_err(|e| ServiceError::new(ErrorCode::MessageTooLarge, e))?;
    let appended = store
        .append(AppendRequest {
            topic: &target_log,
            queue_id: target_queue,
            message_count: 1,
            producer: None,
            body: &body,
        })
        .await?;
    let durability = ack::acknowledge(s, target_queue, &appended).await?;
    // After the copy is acked: a crash between the two can deliver the message twice (here
    // and as a retry), never lose it. With the marker, the next holder of the queue skips it.
    groups::record_sent_back(s, &b.who, &b.topic, b.queue, b.offset).await?;
    Ok(Response::SentBack(SentBack {
        topic: destination,
        reconsume_times: times,
        durability,
    }))
}

/// The delay scheduler of one shard: runs until shutdown.
pub async fn run_scheduler(s: Rc<Services>) {
    let mut last_error: Option<String> = None;
    while !s.shard.is_shutting_down() {
        glommio::timer::sleep(SCHEDULER_TICK).await;
        if s.replication.role() != Role::Master || s.replication.fence_message().is_some() {
            continue;
        }
        for level in 1..=DELAY_LEVELS_MS.len() as u32 {
            match deliver_due(&s, level).await {
                Ok(()) => last_error = None,
                Err(e) => {
                    let text = e.to_string();
                    // Logged once per distinct error, not every tick.
                    if last_error.as_deref() != Some(&text) {
                        log::warn!(
                            "shard {}: delay level {level}: {text}; retrying",
                            s.shard.shard
                        );
                        last_error = Some(text);
                    }
                    break;
                }
            }
        }
    }
}

/// Delivers the due messages at the head of `level`'s queue.
async fn deliver_due(s: &Services, level: u32) -> Result<()> {
    let store = s.shard.store();
    let queue = level - 1;
    let stats = store.queue_stats(SCHEDULE_LOG, queue);
    if stats.visible_end_offset.0 == 0 {
        return Ok(());
    }
    groups::catch_up(s).await?;
    let from = groups::table(s)
        .progress(level)
        .unwrap_or(0)
        .max(stats.min_offset.0);
    if from >= stats.visible_end_offset.0 {
        return Ok(());
    }
    let read = store
        .read(SCHEDULE_LOG, queue, QueueOffset(from), 256 * 1024)
        .await?;
    let messages = stored_messages(&read.records, from)
        .map_err(|e| ServiceError::new(ErrorCode::Internal, e))?;
    let now = now_unix_ms();
    let mut next = from;
    for stored in messages.iter().take(DELIVER_BATCH) {
        let m = &stored.message;
        if number_property(m, PROP_DELIVER_AT).unwrap_or(0) > now {
            break;
        }
        let target = property(m, PROP_TARGET_TOPIC)
            .unwrap_or_default()
            .to_string();
        let target_queue = number_property(m, PROP_TARGET_QUEUE).unwrap_or(0) as u32;
        let final_at = number_property(m, PROP_FINAL_AT).unwrap_or(0);
        if final_at > now {
            // Another hop: the longest level that does not pass its time.
            let next_level = level_for(final_at - now);
            let due = now + DELAY_LEVELS_MS[next_level as usize - 1];
            let hop = with_broker_properties(m, &[(PROP_DELIVER_AT, due.to_string())]);
            let body = single_batch(&hop).map_err(|e| ServiceError::new(ErrorCode::Internal, e))?;
            store
                .append(AppendRequest {
                    topic: SCHEDULE_LOG,
                    queue_id: next_level - 1,
                    message_count: 1,
                    producer: None,
                    body: &body,
                })
                .await?;
        } else if topics::check_queue(s, &target, target_queue).is_err() {
            log::warn!(
                "shard {}: scheduled message at level {level} offset {} is for {target}/{target_queue}, \
                 which does not exist: dropped",
                s.shard.shard,
                stored.offset
            );
        } else {
            let body: Bytes = single_batch(&without_schedule_properties(m))
                .map_err(|e| ServiceError::new(ErrorCode::Internal, e))?;
            store
                .append(AppendRequest {
                    topic: &target,
                    queue_id: target_queue,
                    message_count: 1,
                    producer: None,
                    body: &body,
                })
                .await?;
        }
        next = stored.offset + 1;
    }
    if next > from {
        // After the deliveries in the same log: if this record survives a crash, so do they.
        groups::append_records(s, &[GroupRecord::Progress { level, next }]).await?;
    }
    Ok(())
}
