//! A watch on an etcd key (a group's master key) or prefix (the cluster's routes), kept open
//! by a thread of its own, reopened when lost. The control thread does not block on it: it
//! asks [`Watcher::take_changed`] (read the key again now) and [`Watcher::live`] (without a
//! watch, read on a timer). `ringmq-bench etcd-load` runs the same one per simulated member.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::etcd::{Etcd, WatchNews};

/// A watch on one key or a prefix, kept open by a thread of its own.
pub struct Watcher {
    shared: Arc<WatchShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchShared {
    stop: AtomicBool,
    /// A watch is open (etcd confirmed it).
    live: AtomicBool,
    /// The key changed (or the watch was just opened or lost) since the control thread last
    /// looked.
    changed: AtomicBool,
}

impl Watcher {
    pub fn start(etcd: Arc<Etcd>, key: String) -> std::io::Result<Watcher> {
        Self::spawn(etcd, key, false)
    }

    /// A watch on every key under `prefix` (the same rules; see `cluster::routes`).
    pub fn start_prefix(etcd: Arc<Etcd>, prefix: String) -> std::io::Result<Watcher> {
        Self::spawn(etcd, prefix, true)
    }

    fn spawn(etcd: Arc<Etcd>, key: String, prefix: bool) -> std::io::Result<Watcher> {
        let shared = Arc::new(WatchShared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ringmq-watch".into())
                .spawn(move || watch_loop(&etcd, &key, prefix, &shared))?
        };
        Ok(Watcher {
            shared,
            thread: Some(thread),
        })
    }

    pub fn live(&self) -> bool {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Whether the key changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.shared.changed.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Keeps a watch open on `key` (every key under it with `prefix`) until told to stop; reopens
/// a lost one after a pause.
fn watch_loop(etcd: &Etcd, key: &str, prefix: bool, shared: &WatchShared) {
    let stopped = || shared.stop.load(Ordering::Acquire);
    let lost = |why: &str| {
        if shared.live.swap(false, Ordering::AcqRel) {
            log::info!("cluster: the watch on {key} is gone ({why}); reading it every tick");
        }
        // What happened while it was open and gone is read at the next tick.
        shared.changed.store(true, Ordering::Release);
        for _ in 0..10 {
            if stopped() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    while !stopped() {
        let opened = if prefix {
            etcd.watch_prefix(key)
        } else {
            etcd.watch(key)
        };
        let mut watch = match opened {
            Ok(w) => w,
            Err(e) => {
                lost(&e.to_string());
                continue;
            }
        };
        while !stopped() {
            match watch.next(Duration::from_millis(200)) {
                Ok(Some(WatchNews::Created)) => {
                    // A change between the last read and now is not in the watch: read once.
                    shared.changed.store(true, Ordering::Release);
                    shared.live.store(true, Ordering::Release);
                }
                Ok(Some(WatchNews::Changed)) => shared.changed.store(true, Ordering::Release),
                Ok(Some(WatchNews::Progress)) | Ok(None) => {}
                Err(e) => {
                    lost(&e.to_string());
                    break;
                }
            }
        }
    }
    shared.live.store(false, Ordering::Release);
}
