//! The accept loop of one shard's listener.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpListener;
use glommio::sync::Semaphore;

use crate::server::{bounds, connection};
use crate::shard::ShardContext;

/// Serves connections until shutdown is requested. Connections then drain on their own.
pub async fn serve(ctx: Rc<ShardContext>, listener: TcpListener) {
    let stats = match listener.local_addr() {
        Ok(addr) => bounds::register(addr),
        Err(_) => Default::default(),
    };
    // Closed at shutdown, which wakes every connection at once. Only this loop watches the
    // shutdown flag: a timer per connection polling it (20 ms) cost an idle connection 50
    // wake-ups a second, and 2,000 idle connections took a quarter of a producer's throughput.
    let stop = Rc::new(Semaphore::new(0));
    // One listener per shard: its connections share the shard's in-flight byte budget.
    let shard_budget = Rc::new(bounds::ShardBudget::new(
        bounds::SHARD_INFLIGHT_BYTES_MAX,
        stats.clone(),
    ));
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            ctx.shutdown_requested().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                glommio::spawn_local(connection::serve(
                    ctx.clone(),
                    stream,
                    stop.clone(),
                    stats.clone(),
                    shard_budget.clone(),
                ))
                .detach();
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning; the listener stays up.
                log::warn!("shard {}: accept failed: {e}", ctx.shard);
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    stop.close();
}
