//! Promotion: a slave's shard becomes a master.
//!
//! The follower is stopped first (so nothing more is appended from the old master), then a new
//! epoch starting at the log end is made durable, then writes are taken. A master stays as it
//! is. The old master may come back as a master: the peer watch makes it learn that it was
//! superseded (and us, if it was not).

use std::rc::Rc;

use crate::replication::state::Replication;
use crate::replication::Role;

/// Promotes this shard and returns its epoch (the current one if it already was master).
pub async fn promote(repl: &Rc<Replication>) -> Result<u64, String> {
    if repl.role() == Role::Master {
        return Ok(repl.epoch());
    }
    repl.stop_following();
    let follower = repl.follower.borrow_mut().take();
    if let Some(f) = follower {
        f.await;
    }
    let end = repl.ctx.store().watermarks().appended.0;
    let epoch = repl
        .become_master(end)
        .await
        .map_err(|e| format!("cannot record the new epoch: {e}"))?;
    glommio::spawn_local(crate::replication::peer_watch::watch_peer(repl.clone())).detach();
    Ok(epoch)
}
