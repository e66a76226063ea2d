//! The ack policy: when a stored batch may be acknowledged, and what the ack says.
//!
//! One call, [`acknowledge`], decides it for every mode: the local flush rule (SYNC_FLUSH waits
//! for the fdatasync that covers the batch, up to `flush_timeout_ms`) and the replica rule
//! (SYNC_MASTER waits for the slave's `replica_ack`, up to `replica_timeout_ms`) are awaited
//! together, so the record travels to the slave while our own write and sync are under way.
//! Then: a master fenced meanwhile acks nothing (the record may be truncated when it rejoins
//! as a slave); a missed deadline is its own status (FLUSH_DISK_TIMEOUT,
//! FLUSH_SLAVE_TIMEOUT, SLAVE_NOT_AVAILABLE), never a silent downgrade; and an ack carries the
//! strongest durability the watermarks show, which is at least what the modes promise.
//! In a broker group on etcd, a SYNC_MASTER whose published in-sync set holds no slave acks
//! without one (RocketMQ 5's SyncStateSet rule): such an ack says `disk`, and no slave that
//! lacks it may be elected. A SYNC_MASTER whose lease lapsed (etcd unreachable) acks only
//! what its slave confirms, and answers NOT_MASTER when the slave does not (see
//! `replication/lease.rs`).

use std::time::Duration;

use crate::broker::{Result, ServiceError, Services};
use crate::protocol::{Durability, ErrorCode};
use crate::replication::lease::LeaseState;
use crate::replication::tracker::ReplicaWaitError;
use crate::replication::{ReplicaAck, ReplicationMode};
use crate::storage::{Appended, FlushMode};

/// Waits until `appended` (stored in `queue`) may be acknowledged under the configured modes
/// and returns the durability it reached, or the status that says why it may not.
pub async fn acknowledge(s: &Services, queue: u32, appended: &Appended) -> Result<Durability> {
    let config = &s.shard.config;
    let store = s.shard.store();
    let tracker = s.replication.tracker();
    let local = async {
        if config.storage.flush_mode != FlushMode::SyncFlush {
            return Ok(());
        }
        let deadline = Duration::from_millis(config.storage.flush_timeout_ms);
        match glommio::timer::timeout(deadline, async {
            Ok(store.wait_durable(appended.end).await)
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServiceError::from(e)),
            // Its bytes are held back by a full disk: say so (still retriable; the bytes are
            // kept and written once space is freed, and a retry is acked as a duplicate).
            Err(_) => Err(match store.disk_full() {
                Some(why) => ServiceError::new(
                    ErrorCode::DiskFull,
                    format!(
                        "stored in memory at queue {queue} offset {} but not durable within {} \
                         ms: disk full: {why}",
                        appended.base_offset, config.storage.flush_timeout_ms
                    ),
                ),
                None => ServiceError::new(
                    ErrorCode::FlushDiskTimeout,
                    format!(
                        "stored at queue {queue} offset {} but not durable within {} ms",
                        appended.base_offset, config.storage.flush_timeout_ms
                    ),
                ),
            }),
        }
    };
    let replica = async {
        // A group on etcd whose in-sync set holds no slave acks on the master alone.
        if config.replication.mode != ReplicationMode::SyncMaster
            || s.replication.acks_without_replica()
        {
            return Ok(());
        }
        let deadline = Duration::from_millis(config.replication.replica_timeout_ms);
        tracker
            .wait_replicated(appended.end, config.replication.replica_ack, deadline)
            .await
            .map_err(|e| {
                let why = match e {
                    ReplicaWaitError::NotAvailable => "no slave is connected".to_string(),
                    ReplicaWaitError::Timeout => format!(
                        "the slave did not acknowledge ({}) within {} ms",
                        config.replication.replica_ack, config.replication.replica_timeout_ms
                    ),
                    ReplicaWaitError::Fenced => "this master was fenced".to_string(),
                };
                ServiceError::new(
                    e.code(),
                    format!(
                        "stored on the master at queue {queue} offset {} but {why}; an \
                         idempotent producer may retry",
                        appended.base_offset
                    ),
                )
            })
    };
    let (local, replica) = futures::join!(local, replica);
    if let Some(why) = s.replication.fence_message() {
        return Err(ServiceError::new(
            ErrorCode::NotMaster,
            format!(
                "stored at queue {queue} offset {} but not acknowledged: {why}",
                appended.base_offset
            ),
        ));
    }
    local?;
    if replica.is_err() && s.replication.lease_state() == Some(LeaseState::Lapsed) {
        // Our lease lapsed and the slave stopped confirming: it may have been elected (it
        // stops confirming first). NOT_MASTER sends a client with a broker list onwards.
        return Err(ServiceError::new(
            ErrorCode::NotMaster,
            format!(
                "stored at queue {queue} offset {} but not acknowledged: this master's cluster \
                 lease was not renewed in time (etcd unreachable or without a quorum) and its \
                 slave did not confirm the batch; the slave may be the master now",
                appended.base_offset
            ),
        ));
    }
    replica?;
    if config.replication.mode == ReplicationMode::SyncMaster
        && s.replication.acks_without_replica()
    {
        s.replication.reveal_up_to(appended.end.0);
    }
    Ok(durability_reached(s, appended))
}

/// The strongest durability the watermarks show for the batch, read after the waits.
pub fn durability_reached(s: &Services, appended: &Appended) -> Durability {
    let end = appended.end;
    let tracker = s.replication.tracker();
    if tracker.acked(ReplicaAck::Durable) >= end.0 {
        Durability::ReplicaDurable
    } else if tracker.acked(ReplicaAck::Received) >= end.0 {
        Durability::ReplicaReceived
    } else if s.shard.store().watermarks().durable >= end {
        Durability::Disk
    } else {
        Durability::Memory
    }
}
