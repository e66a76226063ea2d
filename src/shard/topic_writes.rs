//! Shard 0's writes to the topic table: persist the new version, then push it to every shard.
//!
//! Both a client's CreateTopic (through `broker::topics`) and a slave copying its master's
//! topics (`replication::follower`) come here, so there is one writer and one order of steps.

use std::sync::Arc;

use crate::shard::context::ShardContext;
use crate::shard::mesh::{MeshError, MeshRequest};
use crate::shard::topics::{TopicError, TopicTable};

#[derive(Debug, thiserror::Error)]
pub enum TopicWriteError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("topic writes are closed: {0}")]
    Closed(String),
}

/// Runs on shard 0 only: adds `name` with `queues` queues (a no-op if it exists with that
/// many), saves the table, pushes it to every shard, and only then returns.
pub async fn create_topic(
    ctx: &ShardContext,
    name: &str,
    queues: u32,
) -> Result<(), TopicWriteError> {
    let changed = write_table(ctx, |t| t.with_topic(name, queues)).await?;
    if changed {
        log::info!("created topic {name:?} with {queues} queue(s)");
    }
    Ok(())
}

/// Runs on shard 0 only: grows `name` to `queues` queues (a no-op at its current count; never
/// shrinks), like [`create_topic`].
pub async fn grow_topic(
    ctx: &ShardContext,
    name: &str,
    queues: u32,
) -> Result<(), TopicWriteError> {
    let changed = write_table(ctx, |t| t.with_more_queues(name, queues)).await?;
    if changed {
        log::info!("topic {name:?} now has {queues} queue(s)");
    }
    Ok(())
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
