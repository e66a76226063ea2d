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
    let mut stop = Rc::new(Semaphore::new(0));
    // A superseded master closes every client connection once (after answering what each has
    // in flight), so producers stop writing to it at once and re-resolve the master; new
    // connections are still accepted and their writes get NOT_MASTER naming the new master.
    let mut closed_for_fence = false;
    // One listener per shard: its connections share the shard's in-flight byte budget.
    let shard_budget = Rc::new(bounds::ShardBudget::new(
        ctx.config.server.shard_inflight_bytes,
        stats.clone(),
    ));
    loop {
        let superseded = async {
            if closed_for_fence {
                future::pending::<()>().await;
            }
            services.replication.superseded().await;
        };
        let event = future::or(
            future::or(async { Event::Accepted(listener.accept().await) }, async {
                ctx.shutdown_requested().await;
                Event::Shutdown
            }),
            async {
                superseded.await;
                Event::Superseded
            },
        )
        .await;
        match event {
            Event::Shutdown => break,
            Event::Superseded => {
                log::warn!(
                    "shard {}: superseded: closing {} client connection(s)",
                    ctx.shard,
                    ctx.open_connections()
                );
                stop.close();
                stop = Rc::new(Semaphore::new(0));
                closed_for_fence = true;
            }
            Event::Accepted(Ok(stream)) => {
                glommio::spawn_local(connection::serve(
                    services.clone(),
                    stream,
                    stop.clone(),
                    stats.clone(),
                    shard_budget.clone(),
                ))
                .detach();
            }
            Event::Accepted(Err(e)) => {
                // EMFILE and friends: back off instead of spinning; the listener stays up.
                log::warn!("shard {}: accept failed: {e}", ctx.shard);
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    stop.close();
}

enum Event {
    Accepted(glommio::Result<glommio::net::TcpStream, ()>),
    Shutdown,
    Superseded,
}
