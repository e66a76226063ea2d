//! A master's watch on its peer: the other broker of the pair (`--peer`, or a promoted
//! slave's old master).
//!
//! Every [`PEER_WATCH_INTERVAL`] the master asks its peer for its shards' replication state.
//! - The peer's shard is a master of a newer epoch: this shard was superseded. It fences
//!   itself at once ([`Replication::fence_superseded`]): pending produce requests fail, new
//!   ones get NOT_MASTER naming the peer, the follower stream ends.
//! - The peer answers otherwise (a slave, or an older master that will fence itself): a
//!   start-up fence ([`crate::shard::context::Fence::PeerUnheard`]) is lifted.
//! - The peer does not answer: nothing changes.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;

use crate::protocol::{ReplicaStats, Request, Response};
use crate::replication::follower::Link;
use crate::replication::state::Replication;
use crate::replication::{ReplicationError, Role};

/// How often a master asks its peer.
pub const PEER_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Watches the peer until shutdown or until this shard is superseded.
pub async fn watch_peer(repl: Rc<Replication>) {
    let Some(peer) = repl.ctx.config.replication.pair_peer().map(str::to_string) else {
        return;
    };
    while !repl.ctx.is_shutting_down() && !repl.is_superseded() {
        if repl.role() == Role::Master {
            match peer_master_epoch(&repl, &peer).await {
                Ok(Some(epoch)) if epoch > repl.epoch() => repl.fence_superseded(epoch, &peer),
                Ok(_) => repl.peer_heard(),
                Err(e) => log::debug!("shard {}: peer {peer}: {e}", repl.ctx.shard),
            }
        }
        future::or(
            glommio::timer::sleep(PEER_WATCH_INTERVAL),
            repl.ctx.shutdown_requested(),
        )
        .await;
    }
}

/// The epoch of the peer's shard if it is a master, `None` if it is not.
async fn peer_master_epoch(
    repl: &Replication,
    peer: &str,
) -> Result<Option<u64>, ReplicationError> {
    let mut link = Link::connect(peer).await?;
    match link.call(Request::BrokerStats).await? {
        (Response::BrokerStats(shards), _) => Ok(shards
            .get(repl.ctx.shard)
            .map(|s| &s.replication)
            .filter(|r| r.role == ReplicaStats::ROLE_MASTER)
            .map(|r| r.epoch)),
        (other, _) => Err(link.protocol(format!("BrokerStats answered with {other:?}"))),
    }
}
