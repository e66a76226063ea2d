//! Admin requests: what this broker is, and promoting it to master.

use crate::broker::{Result, ServiceError, Services};
use crate::protocol::{BrokerInfo, ErrorCode, Response};
use crate::replication::promotion;
use crate::replication::{ReplicationMode, Role};
use crate::shard::mesh::{MeshReply, MeshRequest};

pub fn broker_info(s: &Services) -> Response {
    let config = &s.shard.config;
    let repl = &s.replication;
    let replication = match config.replication.mode {
        ReplicationMode::AsyncMaster => "ASYNC_MASTER".to_string(),
        ReplicationMode::SyncMaster => format!("SYNC_MASTER/{}", config.replication.replica_ack),
    };
    Response::BrokerInfo(BrokerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        shards: s.shard.shards as u32,
        flush_mode: config.storage.flush_mode.to_string(),
        role: repl.role().to_string(),
        config_toml: config.to_toml(),
        epoch: repl.epoch(),
        master_address: match repl.role() {
            Role::Slave => config.replication.master.clone().unwrap_or_default(),
            Role::Master => String::new(),
        },
        replication,
        shard_addresses: s.shard.addresses.to_vec(),
    })
}

/// `ringmq admin promote`: every shard stops following and starts a new epoch; answered with
/// the new epoch once all shards are masters.
pub async fn promote(s: &Services) -> Result<Response> {
    // All shards change role together, so this shard tells whether anything happens.
    let already_master = s.replication.role() == Role::Master;
    let mut epoch = promotion::promote(&s.replication)
        .await
        .map_err(|e| ServiceError::new(ErrorCode::Internal, e))?;
    let ctx = &s.shard;
    for shard in (0..ctx.shards).filter(|o| *o != ctx.shard) {
        match ctx.mesh.call(shard, MeshRequest::Promote).await? {
            MeshReply::Promoted(Ok(e)) => epoch = epoch.max(e),
            MeshReply::Promoted(Err(e)) => {
                return Err(ServiceError::new(
                    ErrorCode::Internal,
                    format!("shard {shard}: {e}"),
                ))
            }
            other => {
                return Err(ServiceError::new(
                    ErrorCode::Internal,
                    format!("shard {shard} answered Promote with {other:?}"),
                ))
            }
        }
    }
    if already_master {
        log::info!("promote: already master (epoch {epoch}); nothing changed");
    } else {
        log::warn!("promoted to master: epoch {epoch}");
    }
    Ok(Response::Promoted { epoch })
}
