//! Fetch: read a queue from an offset, waiting (long polling) when nothing is visible yet.

use std::time::Duration;

use bytes::Bytes;
use futures_lite::future;

use crate::broker::{groups, topics, Result, Services};
use crate::protocol::limits::MAX_FETCH_BYTES;
use crate::protocol::{FetchHeader, FetchRequest, Response};
use crate::storage::QueueOffset;

/// Longest a fetch may wait for data; a client asking for more is capped, not refused.
pub const MAX_LONG_POLL_MS: u32 = 30_000;

pub async fn fetch(s: &Services, f: FetchRequest) -> Result<(Response, Bytes)> {
    topics::check_queue(s, &f.topic, f.queue)?;
    topics::check_served_here(s, &f.topic, f.queue)?;
    if let Some(who) = &f.group {
        groups::check_member(s, who, &f.topic, f.queue).await?;
    }
    let ctx = &s.shard;
    if s.replication.acks_without_replica() {
        // A SYNC_MASTER acking alone (its group's in-sync set names no slave): what it made
        // durable is what it acks, so consumers see it without waiting for a slave (also
        // what it acked before a restart, capped at the saved confirmed position until now).
        s.replication
            .reveal_up_to(ctx.store().watermarks().durable.0);
    }
    let stats = ctx.store().queue_stats(&f.topic, f.queue);
    let wait_ms = f.max_wait_ms.min(MAX_LONG_POLL_MS);
    if f.offset >= stats.visible_end_offset.0 && wait_ms > 0 {
        let wait = async {
            let _ = glommio::timer::timeout(Duration::from_millis(u64::from(wait_ms)), async {
                ctx.store()
                    .wait_visible_beyond(&f.topic, f.queue, QueueOffset(f.offset))
                    .await;
                Ok(())
            })
            .await;
        };
        future::or(wait, ctx.shutdown_requested()).await;
    }
    let stats = ctx.store().queue_stats(&f.topic, f.queue);
    if f.offset == stats.visible_end_offset.0 {
        return Ok((
            Response::Fetched(FetchHeader {
                queue: f.queue,
                next_offset: f.offset,
                min_offset: stats.min_offset.0,
                end_offset: stats.visible_end_offset.0,
            }),
            Bytes::new(),
        ));
    }
    let batch = ctx
        .store()
        // Capped, not refused: the connection reserves room for at most this much.
        .fetch(
            &f.topic,
            f.queue,
            QueueOffset(f.offset),
            f.max_bytes.min(MAX_FETCH_BYTES),
        )
        .await?;
    Ok((
        Response::Fetched(FetchHeader {
            queue: f.queue,
            next_offset: batch.next_offset.0,
            min_offset: batch.min_offset.0,
            end_offset: batch.end_offset.0,
        }),
        batch.records,
    ))
}
