//! Appends in arrival order: a FIFO line across the one await of an append.

use std::collections::VecDeque;

/// Keeps appends in arrival order across the one await of an append (waiting for room in the
/// log: writes in flight at their cap, or the next segment not prepared yet).
///
/// Why: the de-dup table accepts a producer's batches of a queue only in sequence order, and a
/// pipelined producer sends them in order on one connection. Without this gate a batch that
/// arrives while an earlier one waits for room can find room first (the waiter is only woken,
/// not yet run) and be appended before it: the broker then answers the later batch with a
/// sequence gap, and a pipelined producer with hundreds of batches in flight cascades into
/// retries (issue 11 item 8: a long `ringmq produce --mode async` stalled, then failed with
/// OUT_OF_ORDER_SEQUENCE).
///
/// Only the appender at the front of the line waits for room; the others wait for their turn,
/// and each is woken alone when it reaches the front (no thundering herd). Cancel-safe: a
/// dropped ticket leaves the line and wakes the next one.
#[derive(Default)]
pub(crate) struct AppendOrder {
    line: std::cell::RefCell<AppendLine>,
}

#[derive(Default)]
struct AppendLine {
    next_ticket: u64,
    waiting: VecDeque<(u64, Option<std::task::Waker>)>,
}

/// A place in the line; the append proceeds while it is held and is done when it is dropped.
pub(crate) struct AppendTicket<'a> {
    order: &'a AppendOrder,
    ticket: u64,
}

impl AppendOrder {
    /// Joins the line and resolves once every earlier appender has finished (at once, without
    /// yielding, when nobody is ahead).
    pub async fn turn(&self) -> AppendTicket<'_> {
        let ticket = {
            let mut line = self.line.borrow_mut();
            let t = line.next_ticket;
            line.next_ticket += 1;
            line.waiting.push_back((t, None));
            t
        };
        let held = AppendTicket {
            order: self,
            ticket,
        };
        std::future::poll_fn(|cx| {
            let mut line = self.line.borrow_mut();
            if line.waiting.front().map(|(t, _)| *t) == Some(ticket) {
                return std::task::Poll::Ready(());
            }
            if let Some(entry) = line.waiting.iter_mut().find(|(t, _)| *t == ticket) {
                entry.1 = Some(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await;
        held
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.line.borrow().waiting.len()
    }
}

impl Drop for AppendTicket<'_> {
    fn drop(&mut self) {
        let next = {
            let mut line = self.order.line.borrow_mut();
            if line.waiting.front().map(|(t, _)| *t) == Some(self.ticket) {
                line.waiting.pop_front();
                line.waiting.front_mut().and_then(|(_, w)| w.take())
            } else {
                // Cancelled while waiting: leave the line; the front is unaffected.
                line.waiting.retain(|(t, _)| *t != self.ticket);
                None
            }
        };
        if let Some(w) = next {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    #[test]
    fn appends_wait_for_every_earlier_one_and_a_cancelled_wait_leaves_the_line() {
        let order = AppendOrder::default();
        let first = order.turn().now_or_never().expect("nobody ahead: no wait");
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut second = Box::pin(order.turn());
        let mut third = pin!(order.turn());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert!(third.as_mut().poll(&mut cx).is_pending());
        // The second appender gives up (its connection closed): the third still waits for the
        // first, then goes.
        drop(second);
        assert!(third.as_mut().poll(&mut cx).is_pending());
        drop(first);
        match third.as_mut().poll(&mut cx) {
            Poll::Ready(t) => drop(t),
            Poll::Pending => panic!("the third appender is at the front"),
        }
        assert_eq!(order.waiting(), 0);
    }

    #[test]
    fn the_next_in_line_is_woken_when_the_front_finishes() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let order = AppendOrder::default();
        let first = order.turn().now_or_never().unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut second = pin!(order.turn());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        drop(first);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "a lost wake-up would stall the line"
        );
        assert!(second.as_mut().poll(&mut cx).is_ready());
    }
}
