//! The topic log: every change to the topic table (create, grow, delete) is first a record in
//! shard 0's `%SYS%TOPICS`, so it reaches a slave in log order with everything else that shard
//! stores, and a restart finds it again even if the table file missed it.
//!
//! On a master, [`change`] checks the change against the table, appends its record, waits for
//! the record's durability on this broker (a topic change is rare; it never rests on memory
//! alone), and only then writes the table (`shard::topic_writes`). It does not wait for the
//! slave: a failover in the moment between the ack and the slave receiving the record (a
//! loopback slave: well under a millisecond) leaves the new master without the change (a
//! created topic missing, a deleted one still there); the operator repeats it there. Every shard 0, of
//! a master or a slave, runs [`follow`]: it merges each visible record of the log into the
//! table ([`TopicTable::merged`](crate::shard::topics::TopicTable::merged): order-free and
//! idempotent, so a replay after a restart, or a record the master already applied, changes
//! nothing). A slave's once-a-second copy of its master's topic list (`replication::follower`)
//! stays as the catch-all for topics whose records retention dropped before the slave saw them.
//!
//! Record payload (one message per record, text): `create <queues> <name>`, `grow <queues>
//! <name>`, `delete <name>`. Topic names have no spaces.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use crate::broker::groups::records::{single_batch, stored_messages};
use crate::broker::{Result, ServiceError, Services};
use crate::format::batch::Message;
use crate::protocol::ErrorCode;
use crate::shard::topic_writes;
use crate::shard::topics::TopicChange;
use crate::storage::{AppendRequest, QueueOffset};

/// Shard 0's queue of topic changes.
pub const TOPICS_LOG: &str = "%SYS%TOPICS";

/// Shard 0's state of the topic log.
pub struct TopicLog {
    /// One change at a time: check, append, apply.
    writing: glommio::sync::Semaphore,
    /// The next offset of `%SYS%TOPICS` to merge; `None` before the first catch-up.
    applied: Cell<Option<u64>>,
}

impl Default for TopicLog {
    fn default() -> Self {
        TopicLog {
            writing: glommio::sync::Semaphore::new(1),
            applied: Cell::new(None),
        }
    }
}

pub fn encode(change: &TopicChange) -> Bytes {
    Bytes::from(match change {
        TopicChange::Create { name, queues } => format!("create {queues} {name}"),
        TopicChange::Grow { name, queues } => format!("grow {queues} {name}"),
        TopicChange::Delete { name } => format!("delete {name}"),
    })
}

pub fn decode(payload: &[u8]) -> std::result::Result<TopicChange, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8".to_string())?;
    let parts: Vec<&str> = text.split(' ').collect();
    let queues = |q: &str| {
        q.parse::<u32>()
            .map_err(|_| format!("{q:?} is not a queue count"))
    };
    match parts.as_slice() {
        ["create", q, name] => Ok(TopicChange::Create {
            name: name.to_string(),
            queues: queues(q)?,
        }),
        ["grow", q, name] => Ok(TopicChange::Grow {
            name: name.to_string(),
            queues: queues(q)?,
        }),
        ["delete", name] => Ok(TopicChange::Delete {
            name: name.to_string(),
        }),
        _ => Err(format!("{text:?} is not a topic change")),
    }
}

/// On shard 0 of a master: makes `change` (checked against the table: a refused one leaves no
/// record; one that changes nothing, like a repeated create, neither).
pub async fn change(s: &Services, change: TopicChange) -> Result<()> {
    debug_assert_eq!(s.shard.shard, 0, "shard 0 writes the topic table");
    // A slave's (or a fenced master's) own record would fork its log from its master's.
    s.check_writable("change topics")?;
    let _one = s
        .topic_log
        .writing
        .acquire_permit(1)
        .await
        .map_err(|e| ServiceError::new(ErrorCode::ShuttingDown, e.to_string()))?;
    let current = s.shard.topics();
    if current.with_change(&change)? == *current {
        return Ok(());
    }
    let body = single_batch(&Message::new(encode(&change)))
        .map_err(|e| ServiceError::new(ErrorCode::Internal, e))?;
    let store = s.shard.store();
    let appended = store
        .append(AppendRequest {
            topic: TOPICS_LOG,
            queue_id: 0,
            message_count: 1,
            producer: None,
            body: &body,
        })
        .await?;
    // Durable here, whatever the flush mode: the table file below is durable at once and must
    // never hold a change its log lost. Not waited for: the slave, which gets the record with
    // the log stream; a SYNC_MASTER takes topic changes before its slave is up (the usual
    // order of a set-up), so a failover right after a change can miss it (see the module doc).
    store.wait_durable(appended.end).await?;
    topic_writes::apply_change(&s.shard, &change).await?;
    Ok(())
}

/// Shard 0, on masters and slaves alike, until the broker stops: merges what `%SYS%TOPICS`
/// holds into the topic table, then waits for more.
pub async fn follow(s: Rc<Services>) {
    if s.shard.shard != 0 {
        return;
    }
    let mut warned = false;
    while !s.shard.is_shutting_down() {
        match catch_up(&s).await {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                log::warn!("shard 0: following {TOPICS_LOG}: {e} (retrying every second)");
                warned = true;
            }
            Err(_) => {}
        }
        let store = s.shard.store();
        let next = QueueOffset(s.topic_log.applied.get().unwrap_or(0));
        // Bounded: a slave's store can be replaced under this task (a reset).
        let _ = glommio::timer::timeout(Duration::from_secs(1), async {
            store.wait_visible_beyond(TOPICS_LOG, 0, next).await;
            Ok(())
        })
        .await;
        // A stopped log resolves the wait at once.
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

/// Merges every visible record past the last one merged.
async fn catch_up(s: &Services) -> Result<()> {
    let store = s.shard.store();
    loop {
        let stats = store.queue_stats(TOPICS_LOG, 0);
        // Past the end: the log was truncated under us (a replica dropping a diverged tail)
        // or replaced (a reset); merges are idempotent, so read it again from its start.
        let applied = match s.topic_log.applied.get() {
            Some(a) if a <= stats.written_end_offset.0 => a,
            _ => stats.min_offset.0,
        };
        let from = applied.max(stats.min_offset.0);
        if from >= stats.visible_end_offset.0 {
            s.topic_log.applied.set(Some(from));
            return Ok(());
        }
        let batch = store
            .read(TOPICS_LOG, 0, QueueOffset(from), 1 << 20)
            .await?;
        let messages = stored_messages(&batch.records, from).map_err(|e| {
            ServiceError::new(ErrorCode::StorageError, format!("{TOPICS_LOG}: {e}"))
        })?;
        for m in messages {
            match decode(&m.message.payload) {
                Ok(change) => topic_writes::merge_change(&s.shard, &change).await?,
                Err(why) => log::warn!("shard 0: {TOPICS_LOG} offset {} skipped: {why}", m.offset),
            }
        }
        if batch.next_offset.0 <= from {
            return Err(ServiceError::new(
                ErrorCode::Internal,
                format!("{TOPICS_LOG} read at {from} made no progress"),
            ));
        }
        s.topic_log.applied.set(Some(batch.next_offset.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_garbage_is_an_error() {
        for c in [
            TopicChange::Create {
                name: "orders".into(),
                queues: 8,
            },
            TopicChange::Grow {
                name: "%RETRY%g".into(),
                queues: 2,
            },
            TopicChange::Delete {
                name: "orders".into(),
            },
        ] {
            assert_eq!(decode(&encode(&c)).unwrap(), c);
        }
        for bad in [&b"create x orders"[..], b"drop orders", b"", b"\xff"] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
