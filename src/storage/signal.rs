//! The waiting primitive of a shard's storage: a task waits until a condition over shared
//! state holds, re-checked after every notify. Everything runs on one executor, so it is a
//! `RefCell` of wakers, not a lock.

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes every waiting task; waiters re-check their condition. Cancel-safe: a dropped waiter
/// leaves only a stale waker that is discarded on the next notify.
#[derive(Default)]
pub struct Signal {
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    pub fn notify_all(&self) {
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
    }

    /// Resolves once `cond` holds (checked now and after every notify).
    pub async fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        poll_fn(|cx| {
            if cond() {
                Poll::Ready(())
            } else {
                let mut w = self.wakers.borrow_mut();
                if !w.iter().any(|x| x.will_wake(cx.waker())) {
                    w.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}
