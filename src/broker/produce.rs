//! Produce: check the target and the batch, append it once, answer as the ack policy says.

use std::time::Duration;

use bytes::Bytes;

use crate::broker::{ack, groups, retry, topics, transactions, Result, ServiceError, Services};
use crate::format::batch::validate_batch;
use crate::protocol::limits::MAX_BATCH_MESSAGES;
use crate::protocol::{Delay, ErrorCode, ProduceAck, ProduceRequest, Response};
use crate::storage::{AppendRequest, ProducerSeq};

pub async fn produce(s: &Services, p: ProduceRequest, body: Bytes) -> Result<Response> {
    // Before the check: a report of a newer master fences this one first.
    s.replication.on_client_epoch(p.known_epoch);
    s.check_writable("produce")?;
    topics::check_not_reserved(&p.topic)?;
    let queues = topics::queue_count(s, &p.topic)?;
    let queue = match p.queue {
        Some(q) => {
            topics::check_queue(s, &p.topic, q)?;
            q
        }
        None => s.shard.pick_local_queue(&p.topic, queues),
    };
    topics::check_served_here(s, &p.topic, queue)?;
    let count = validate_batch(&body, MAX_BATCH_MESSAGES)
        .map_err(|e| ServiceError::new(ErrorCode::InvalidBatch, e.to_string()))?;
    if count != p.message_count {
        return Err(ServiceError::new(
            ErrorCode::InvalidBatch,
            format!(
                "the header says {} message(s) but the body holds {count}",
                p.message_count
            ),
        ));
    }
    if let Some(txn) = p.transaction {
        topics::check_one_group(s, &p.topic, "transactions")?;
        if p.delay.is_some() {
            return Err(ServiceError::new(
                ErrorCode::InvalidArgument,
                "a half message cannot be delayed",
            ));
        }
        return transactions::produce_half(s, txn, &p.topic, queue, p.producer_id, &body, count)
            .await;
    }
    // A deliver-at time already passed is no delay at all.
    let delay = p
        .delay
        .filter(|d| !matches!(d, Delay::At(at) if *at <= groups::now_unix_ms()));
    if let Some(delay) = delay {
        let (appended, deliver_at_ms, durability) =
            retry::produce_delayed(s, &p.topic, queue, delay, p.producer_id, &body).await?;
        return Ok(Response::Produced(ProduceAck {
            queue,
            base_offset: appended.base_offset.0,
            count: appended.count,
            duplicate: false,
            durability,
            epoch: s.replication.epoch(),
            deliver_at_ms,
        }));
    }
    check_flush_lag(s)?;
    let producer = (p.producer_id != 0).then_some(ProducerSeq {
        producer_id: p.producer_id,
        epoch: p.producer_epoch,
        base_sequence: p.base_sequence,
    });
    let store = s.shard.store();
    let append = store.append(AppendRequest {
        topic: &p.topic,
        queue_id: queue,
        message_count: count,
        producer,
        body: &body,
    });
    let wait_ms = s.shard.config.server.max_queue_wait_ms;
    let appended = if wait_ms == 0 {
        append.await?
    } else {
        // Cancel-safe: an append assigns its offsets after its last await, so a timed-out
        // one stored nothing.
        match glommio::timer::timeout(Duration::from_millis(wait_ms), async { Ok(append.await) })
            .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(ServiceError::new(
                    ErrorCode::SystemBusy,
                    format!(
                        "the log did not take the batch within max_queue_wait_ms {wait_ms} \
                         (writes queued behind the disk); retry later"
                    ),
                ))
            }
        }
    };
    let durability = ack::acknowledge(s, queue, &appended).await?;
    Ok(Response::Produced(ProduceAck {
        queue,
        base_offset: appended.base_offset.0,
        count: appended.count,
        duplicate: appended.duplicate,
        durability,
        epoch: s.replication.epoch(),
        deliver_at_ms: 0,
    }))
}

/// SYSTEM_BUSY while the log's appended bytes lead its durable ones by more than
/// `max_flush_lag_bytes`: the disk is behind, and under ASYNC_FLUSH that lead is what a crash
/// would take back.
fn check_flush_lag(s: &Services) -> Result<()> {
    let bound = s.shard.config.server.max_flush_lag_bytes;
    if bound == 0 {
        return Ok(());
    }
    let w = s.shard.store().watermarks();
    let lag = w.appended.0.saturating_sub(w.durable.0);
    if lag > bound {
        return Err(ServiceError::new(
            ErrorCode::SystemBusy,
            format!(
                "the flush is {lag} bytes behind the log, over max_flush_lag_bytes {bound}; \
                 retry later"
            ),
        ));
    }
    Ok(())
}
