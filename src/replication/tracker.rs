//! Replication progress of a shard: the follower session's acknowledged positions on a
//! master (what SYNC_MASTER produce requests wait on), the link to the master on a slave, and
//! the lag in bytes and milliseconds both report.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::{ErrorCode, ReplicaStats};
use crate::replication::{ReplicaAck, Role};
use crate::storage::{LogPosition, Signal};

/// Samples kept for the lag in milliseconds (one per millisecond with appends at most).
const MAX_LAG_SAMPLES: usize = 100_000;

/// Why a SYNC_MASTER wait for the slave failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaWaitError {
    /// No slave is connected (FLUSH_SLAVE_TIMEOUT's sibling, SLAVE_NOT_AVAILABLE).
    NotAvailable,
    /// A slave is connected but did not acknowledge in time (FLUSH_SLAVE_TIMEOUT).
    Timeout,
    /// This master learnt of a newer epoch while waiting: it acks nothing more (NOT_MASTER).
    Fenced,
}

impl ReplicaWaitError {
    pub fn code(self) -> ErrorCode {
        match self {
            ReplicaWaitError::NotAvailable => ErrorCode::SlaveNotAvailable,
            ReplicaWaitError::Timeout => ErrorCode::FlushSlaveTimeout,
            ReplicaWaitError::Fenced => ErrorCode::NotMaster,
        }
    }
}

/// Replication progress of one shard, on either side of the link.
///
/// On a master: the follower session, the positions it acknowledged, and the samples that turn
/// the unacknowledged bytes into an age. On a slave: the link to the master and how far behind
/// the master's log end it is. Lives on the shard's thread.
#[derive(Default)]
pub struct ReplicaTracker {
    st: RefCell<TrackerState>,
    /// Notified when acknowledged positions move or the session changes.
    changed: Signal,
}

#[derive(Default)]
struct TrackerState {
    /// Id of the live session (master: follower session; slave: link to the master).
    session: Option<u64>,
    next_session: u64,
    /// 1 = connecting / handshaking, 2 = streaming.
    link: u8,
    /// Master: the follower's acknowledged positions. Slave: our own appended / durable.
    received: u64,
    durable: u64,
    /// Slave: the master's log end as last heard.
    peer_end: u64,
    /// Master: end of what the session has sent; acks beyond it are not believed.
    sent: u64,
    connects: u64,
    /// (log end, when it was reached), oldest first: the age of the oldest byte the other side
    /// does not have yet.
    samples: VecDeque<(u64, Instant)>,
    rate_window: Option<(Instant, u64)>,
    rate: u64,
    /// Master: a newer epoch exists; every wait fails from now on.
    fenced: bool,
}

impl TrackerState {
    fn sample(&mut self, end: u64) {
        let now = Instant::now();
        let full = self.samples.len() >= MAX_LAG_SAMPLES;
        match self.samples.back_mut() {
            Some((e, _)) if *e >= end => {}
            // Within a millisecond of the last sample, or out of room: extend the last one (the
            // oldest samples are the ones that say how old the lag is).
            Some((e, t)) if full || now.duration_since(*t) < Duration::from_millis(1) => *e = end,
            _ => self.samples.push_back((end, now)),
        }
    }

    fn progress(&mut self, received: u64, durable: u64) {
        self.received = self.received.max(received);
        self.durable = self.durable.max(durable);
        while self
            .samples
            .front()
            .is_some_and(|(e, _)| *e <= self.received)
        {
            self.samples.pop_front();
        }
        let now = Instant::now();
        match self.rate_window {
            Some((t, at)) if now.duration_since(t) >= Duration::from_secs(1) => {
                let secs = now.duration_since(t).as_secs_f64();
                self.rate = ((self.received - at) as f64 / secs) as u64;
                self.rate_window = Some((now, self.received));
            }
            Some(_) => {}
            None => self.rate_window = Some((now, self.received)),
        }
    }
}

impl ReplicaTracker {
    /// Starts a session (master: a follower connected; slave: dialling the master) and returns
    /// its id; any older session is superseded.
    pub fn begin_session(&self, link: u8) -> u64 {
        let mut st = self.st.borrow_mut();
        st.next_session += 1;
        let id = st.next_session;
        st.session = Some(id);
        st.link = link;
        drop(st);
        self.changed.notify_all();
        id
    }

    /// Marks session `id` as streaming from `start` (both sides have everything below it);
    /// the other side has made `durable` of it durable (what it said, never more than
    /// `start`: a follower's appended end is not on its disk yet).
    pub fn streaming(&self, id: u64, start: u64, durable: u64, peer_end: u64) {
        let mut st = self.st.borrow_mut();
        if st.session != Some(id) {
            return;
        }
        st.link = 2;
        st.connects += 1;
        st.received = start;
        st.durable = durable.min(start);
        st.sent = start;
        st.peer_end = peer_end;
        st.samples.retain(|(e, _)| *e > start);
        st.rate_window = None;
        drop(st);
        self.changed.notify_all();
    }

    pub fn end_session(&self, id: u64) {
        let mut st = self.st.borrow_mut();
        if st.session == Some(id) {
            st.session = None;
            st.link = 0;
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Master: a newer epoch exists; pending and future waits fail with
    /// [`ReplicaWaitError::Fenced`].
    pub fn set_fenced(&self) {
        self.st.borrow_mut().fenced = true;
        self.changed.notify_all();
    }

    pub fn has_session(&self) -> bool {
        self.st.borrow().session.is_some()
    }

    pub fn is_current(&self, id: u64) -> bool {
        self.st.borrow().session == Some(id)
    }

    pub fn is_streaming(&self) -> bool {
        let st = self.st.borrow();
        st.session.is_some() && st.link == 2
    }

    /// The follower (master side) or this slave (slave side) has `received` / `durable`.
    pub fn on_progress(&self, id: u64, received: u64, durable: u64) {
        let mut st = self.st.borrow_mut();
        if st.session != Some(id) {
            return;
        }
        st.progress(received, durable);
        drop(st);
        self.changed.notify_all();
    }

    /// Master: session `id` has sent everything below `end`.
    pub fn sent(&self, id: u64, end: u64) {
        let mut st = self.st.borrow_mut();
        if st.session == Some(id) {
            st.sent = st.sent.max(end);
        }
    }

    /// Master: the follower of session `id` acknowledged. A follower cannot have more than it
    /// was sent, nor have made durable more than it received: anything beyond is clamped, so a
    /// confused follower can never release a SYNC_MASTER ack early.
    pub fn on_ack(&self, id: u64, received: u64, durable: u64) {
        let sent = self.st.borrow().sent;
        let received = received.min(sent);
        self.on_progress(id, received, durable.min(received));
    }

    /// Master: the log now ends at `end` (for the lag's age). Slave: the master said its log
    /// ends at `end`.
    pub fn note_end(&self, end: u64) {
        let mut st = self.st.borrow_mut();
        st.peer_end = st.peer_end.max(end);
        st.sample(end);
    }

    /// Acknowledged position for `kind`.
    pub fn acked(&self, kind: ReplicaAck) -> u64 {
        let st = self.st.borrow();
        match kind {
            ReplicaAck::Received => st.received,
            ReplicaAck::Durable => st.durable,
        }
    }

    /// Waits until the follower has acknowledged everything below `end` as `kind`.
    pub async fn wait_replicated(
        &self,
        end: LogPosition,
        kind: ReplicaAck,
        timeout: Duration,
    ) -> Result<(), ReplicaWaitError> {
        if self.st.borrow().fenced {
            return Err(ReplicaWaitError::Fenced);
        }
        if !self.is_streaming() {
            return Err(ReplicaWaitError::NotAvailable);
        }
        let done = glommio::timer::timeout(timeout, async {
            self.changed
                .wait_until(|| {
                    let st = self.st.borrow();
                    st.fenced || st.session.is_none() || self.acked(kind) >= end.0
                })
                .await;
            Ok(())
        })
        .await;
        if self.st.borrow().fenced {
            Err(ReplicaWaitError::Fenced)
        } else if self.acked(kind) >= end.0 {
            Ok(())
        } else if done.is_ok() || !self.is_streaming() {
            Err(ReplicaWaitError::NotAvailable)
        } else {
            Err(ReplicaWaitError::Timeout)
        }
    }

    /// Resolves when the acknowledged positions differ from `received` / `durable` or the
    /// session changes.
    pub(crate) async fn wait_acks_change(&self, id: u64, received: u64, durable: u64) {
        self.changed
            .wait_until(|| {
                let st = self.st.borrow();
                st.received != received || st.durable != durable || st.session != Some(id)
            })
            .await
    }

    /// Resolves when acknowledgements move past `pos` or the session changes.
    pub(crate) async fn wait_acked_beyond(&self, pos: u64, id: u64) {
        self.changed
            .wait_until(|| {
                let st = self.st.borrow();
                st.received > pos || st.session != Some(id)
            })
            .await
    }

    /// Stats for BrokerStats; `log_end` is this shard's append position.
    pub fn stats(&self, role: Role, epoch: u64, log_end: u64) -> ReplicaStats {
        let st = self.st.borrow();
        let (end, have) = match role {
            Role::Master => (log_end, st.received),
            Role::Slave => (st.peer_end.max(log_end), log_end),
        };
        // A master that never had a slave has no lag to speak of; once one was seen, the lag is
        // what it lacks, connected or not.
        let lag_bytes = if st.connects > 0 || role == Role::Slave {
            end.saturating_sub(have)
        } else {
            0
        };
        let lag_ms = if lag_bytes == 0 {
            0
        } else {
            st.samples
                .iter()
                .find(|(e, _)| *e > have)
                .map_or(0, |(_, t)| t.elapsed().as_millis() as u64)
        };
        let rate = match st.rate_window {
            _ if st.session.is_none() => 0,
            Some((t, at)) if t.elapsed() >= Duration::from_secs(2) => {
                ((st.received - at) as f64 / t.elapsed().as_secs_f64()) as u64
            }
            _ => st.rate,
        };
        ReplicaStats {
            role: match role {
                Role::Master => 0,
                Role::Slave => 1,
            },
            epoch,
            link: if st.session.is_some() { st.link } else { 0 },
            peer_received: st.received,
            peer_durable: st.durable,
            log_end: end,
            lag_bytes,
            lag_ms,
            catchup_bytes_per_sec: rate,
            connects: st.connects,
        }
    }
}
