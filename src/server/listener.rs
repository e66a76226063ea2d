//! The accept loop of one shard's listener.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpListener;

use crate::server::connection;
use crate::shard::ShardContext;

/// Serves connections until shutdown is requested. Connections then drain on their own.
pub async fn serve(ctx: Rc<ShardContext>, listener: TcpListener) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            ctx.shutdown_requested().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                glommio::spawn_local(connection::serve(ctx.clone(), stream)).detach();
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning; the listener stays up.
                log::warn!("shard {}: accept failed: {e}", ctx.shard);
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
