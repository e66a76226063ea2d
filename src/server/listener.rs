//! The accept loop of one shard's listener.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::net::TcpListener;
use glommio::sync::Semaphore;

use crate::broker::Services;
use crate::server::{bounds, connection};

/// Serves connections until shutdown is requested. Connections then drain on their own.
pub async fn serve(services: Rc<Services>, listener: TcpListener) {
    let ctx = &services.shard;
    let stats = match listener.local_addr() {
        Ok(addr) => bounds::register(addr),
        Err(_) => Default::default(),
    };
    // Closed at shutdown, which wakes every connection at once. Only this loop watches the
    // shutdown flag: a timer per connection polling it (20 ms) cost an idle connection 50
    // wake-ups a second, and 2,000 idle connections took a quarter of a producer's throughput.
    let stop = Rc::new(Semaphore::new(0));
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
                    services.clone(),
                    stream,
                    stop.clone(),
                    stats.clone(),
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
