//! Shard 0's writes to the topic table: persist the new version, then push it to every shard.
//!
//! A client's change (through `broker::topic_log`, after its record is in the log), a record
//! read back from the topic log, and a slave copying its master's topic list
//! (`replication::follower`) all come here, so there is one writer and one order of steps.

use std::sync::Arc;

use crate::shard::context::ShardContext;
use crate::shard::mesh::{MeshError, MeshRequest};
use crate::shard::topics::{TopicChange, TopicError, TopicTable};

#[derive(Debug, thiserror::Error)]
pub enum TopicWriteError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("topic writes are closed: {0}")]
    Closed(String),
}

/// Runs on shard 0 only: makes a client's `change`, checked against the table (a create of a
/// topic that exists with that many queues is a no-op; see `TopicTable::with_change`), saves
/// the table, pushes it to every shard, and only then returns.
pub async fn apply_change(ctx: &ShardContext, change: &TopicChange) -> Result<(), TopicWriteError> {
    let changed = write_table(ctx, |t| t.with_change(change)).await?;
    if changed {
        log_change(change);
    }
    Ok(())
}

/// Runs on shard 0 only: merges a `change` that was made elsewhere (read from the topic log,
/// or a master's topic list): never refused, a no-op when the table already has it.
pub async fn merge_change(ctx: &ShardContext, change: &TopicChange) -> Result<(), TopicWriteError> {
    let changed = write_table(ctx, |t| Ok(t.merged(change))).await?;
    if changed {
        log_change(change);
    }
    Ok(())
}

fn log_change(change: &TopicChange) {
    match change {
        TopicChange::Create { name, queues } => {
            log::info!("created topic {name:?} with {queues} queue(s)")
        }
        TopicChange::Grow { name, queues } => {
            log::info!("topic {name:?} now has {queues} queue(s)")
        }
        TopicChange::Delete { name } => log::info!("deleted topic {name:?}"),
    }
}

/// The one writer's steps: the next table from the current one, then (if it differs) save
/// it, apply it here and push it to every other shard. Returns whether it changed.
async fn write_table(
    ctx: &ShardContext,
    next: impl FnOnce(&TopicTable) -> Result<TopicTable, TopicError>,
) -> Result<bool, TopicWriteError> {
    debug_assert_eq!(ctx.shard, 0, "shard 0 is the topic table's only writer");
    let _one_writer = ctx
        .topic_writes
        .acquire_permit(1)
        .await
        .map_err(|e| TopicWriteError::Closed(e.to_string()))?;
    let current = ctx.topics();
    let next = Arc::new(next(&current)?);
    if *next == *current {
        return Ok(false);
    }
    // tmp + fsync + rename + dir fsync: on the blocking pool, not under this shard's acks.
    let (table, dir) = (next.clone(), ctx.config.server.data_dir.clone());
    glommio::executor()
        .spawn_blocking(move || table.save(&dir))
        .await?;
    ctx.set_topics(next.clone());
    for shard in 1..ctx.shards {
        ctx.mesh
            .call(shard, MeshRequest::ApplyTopics(next.clone()))
            .await?;
    }
    Ok(true)
}
