//! What one connection may make the broker hold, and the counters that show it.
//!
//! Every byte a connection makes the broker keep is charged to that connection's
//! [`ByteBudget`] (`max_inflight_bytes_per_connection`) from the moment its request is read
//! until its response has been written to the socket:
//! - when a request is dispatched, its body plus a *reservation* for the largest response it
//!   can produce ([`response_reserve_bytes`]);
//! - when the handler finishes, the reservation is swapped for the response's real size, which
//!   stays charged while it waits in the outbox and until the writer has handed it to the
//!   kernel.
//!
//! The reader only dispatches a request when its charge fits the budget, so a client that
//! stops reading its responses stops being read: its requests back up into TCP, not memory.
//! The read buffer of a half-received frame grows with the bytes that have arrived (see
//! [`PARTIAL_FRAME_RESERVE_BYTES`](crate::protocol::limits::PARTIAL_FRAME_RESERVE_BYTES)) and
//! the whole frame has one deadline, so a trickling client cannot pin a large buffer either.
//!
//! All connections of one shard also share one [`ShardBudget`] (`shard_inflight_bytes`,
//! default 128 MiB: without it each of hundreds of connections could hold its own 64 MiB;
//! under the wire fuzzer, 256 connections that never read, the broker's peak RSS was
//! ~0.9–1.6 GB, 460 MiB with a 256 MiB shard budget and 250 MiB with 128 MiB, which is 8
//! max-size frames or ~50 ms of the disk's sequential write rate):
//! every charge to a connection's budget is charged to it too, and so are the connections'
//! read buffers. Each kind of request is admitted below its own line of it ([`Admission`]):
//! a request with a large answer (a fetch) waits (its reader stops) while the charge is past
//! three quarters, one with a small answer (a route, a listing, an offset commit) past seven
//! eighths, and a produce is answered SYSTEM_BUSY (retriable) at once past the whole budget.
//! So clients that never read their fetch answers can fill at most three quarters, and a
//! producer still gets its route and its acks; clients that spam small requests and never
//! read them still leave an eighth to producers. A reader between frames waits only when the
//! whole budget is spent: it must read a frame to know what kind it is (seen in CI: a
//! producer's first request waited forever behind non-readers that had filled the fetch line,
//! when the between-frames wait and every non-produce request waited at three quarters).
//! A reader in the middle of a frame always reads on, so every frame can be finished (or is
//! cut off by its deadline): nothing waits for something that itself waits.
//!
//! [`ServerStats`] keeps high-water marks of all of this per listener. They are measured
//! apart from the budget (the outbox counts its own bytes, the reader looks at its buffer's
//! capacity), so a bound that stops working shows up in them.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Poll, Waker};

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use crate::protocol::limits::{
    MAX_ERROR_MESSAGE_BYTES, MAX_FETCH_BYTES, MAX_HEADER_BYTES, PREAMBLE_BYTES,
};
use crate::protocol::Request;

/// Room kept for a response that carries a small fixed header or an error message: the
/// preamble, an error text at its limit, and a margin for the few fixed fields of an ack.
const SMALL_RESPONSE_BYTES: u64 = (PREAMBLE_BYTES + MAX_ERROR_MESSAGE_BYTES + 1024) as u64;
/// Room kept for a response whose header lists things (topics, routes, stats, config): the
/// preamble and a header at its limit.
const LISTING_RESPONSE_BYTES: u64 = (PREAMBLE_BYTES + MAX_HEADER_BYTES as usize) as u64;

/// The most a response to `request` can take, so it can be charged before it exists. A fetch
/// returns at most [`MAX_FETCH_BYTES`], except that it always returns its first record
/// whole, which may be as large as the largest record the store accepts
/// (`max_record_bytes`); it is charged for the larger of the two whatever it asks, because
/// what it asked for does not bound a large first record.
pub fn response_reserve_bytes(request: &Request, max_record_bytes: u64) -> u64 {
    match request {
        // A check-back answer carries half messages, bounded like a fetch.
        Request::Fetch(_) | Request::CheckTransactions(_) => {
            SMALL_RESPONSE_BYTES + u64::from(MAX_FETCH_BYTES).max(max_record_bytes)
        }
        Request::ListTopics
        | Request::GetRoute { .. }
        | Request::BrokerInfo
        | Request::BrokerStats
        | Request::QueueStats { .. }
        | Request::JoinGroup(_)
        | Request::DescribeGroup { .. }
        | Request::ListTransactions { .. } => LISTING_RESPONSE_BYTES,
        Request::Ping
        | Request::CreateTopic { .. }
        | Request::AlterTopic { .. }
        | Request::DeleteTopic { .. }
        | Request::Produce(_)
        | Request::Promote
        | Request::ReplFollow(_)
        | Request::LeaveGroup { .. }
        | Request::CommitOffsets(_)
        | Request::SendBack(_)
        | Request::CreateGroup(_)
        | Request::EndTransaction(_) => SMALL_RESPONSE_BYTES,
    }
}

/// Which line of the shard's budget a request is admitted below ([`ShardBudget::limit`]):
/// the lines rise from requests whose unread answers can pin the most memory to those that
/// must get through for the broker to be of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Fetches and check-backs: up to [`MAX_FETCH_BYTES`] each.
    LargeAnswer,
    /// Routes, listings, admin and group requests: a header at most.
    SmallAnswer,
    /// Refused (SYSTEM_BUSY), never waits.
    Produce,
    /// A reader between frames, before it reads the next one.
    NewFrame,
}

impl Admission {
    pub fn of(request: &Request) -> Admission {
        match request {
            Request::Fetch(_) | Request::CheckTransactions(_) => Admission::LargeAnswer,
            Request::Produce(_) => Admission::Produce,
            _ => Admission::SmallAnswer,
        }
    }
}

/// One connection's in-flight byte budget. Charges never wait and may overdraw it (a response
/// larger than its reservation is still charged in full); only the reader waits, in
/// [`ByteBudget::wait_for_room`], before it takes on more.
pub struct ByteBudget {
    used: Cell<u64>,
    max: u64,
    /// Charged and released along with this budget.
    shard: Option<Rc<ShardBudget>>,
    // Wakes the one waiter (the reader, or the drain after it) when bytes are released.
    freed_tx: LocalSender<()>,
    freed_rx: LocalReceiver<()>,
}

impl ByteBudget {
    pub fn new(max: u64) -> ByteBudget {
        ByteBudget::with_shard(max, None)
    }

    /// A connection's budget whose every charge also counts against its shard's.
    pub fn with_shard(max: u64, shard: Option<Rc<ShardBudget>>) -> ByteBudget {
        let (freed_tx, freed_rx) = local_channel::new_bounded(1);
        ByteBudget {
            used: Cell::new(0),
            max,
            shard,
            freed_tx,
            freed_rx,
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn charge(&self, bytes: u64) {
        self.used.set(self.used.get() + bytes);
        if let Some(shard) = &self.shard {
            shard.charge(bytes);
        }
    }

    pub fn release(&self, bytes: u64) {
        let used = self.used.get();
        debug_assert!(bytes <= used, "released {bytes} of {used} charged bytes");
        let bytes = bytes.min(used);
        self.used.set(used - bytes);
        if let Some(shard) = &self.shard {
            shard.release(bytes);
        }
        // A full channel means a wake-up is already pending.
        let _ = self.freed_tx.try_send(());
    }

    /// Whether `bytes` more fit now. A charge larger than the whole budget fits an empty one,
    /// so a single large request still goes through, alone.
    pub fn has_room(&self, bytes: u64) -> bool {
        let used = self.used.get();
        used == 0 || used + bytes <= self.max
    }

    /// Waits until [`ByteBudget::has_room`] for `bytes`. Returns false, at once, when `giving_up`
    /// says so (checked after each release).
    pub async fn wait_for_room(&self, bytes: u64, giving_up: impl Fn() -> bool) -> bool {
        while !self.has_room(bytes) {
            if giving_up() {
                return false;
            }
            if self.freed_rx.recv().await.is_none() {
                return false;
            }
        }
        true
    }
}

/// The in-flight byte budget shared by all connections of one shard (one listener). Like
/// [`ByteBudget`], charges never wait and may overdraw it; callers ask [`ShardBudget::has_room`]
/// first and either refuse (produce) or wait in [`ShardBudget::wait_for_room`].
pub struct ShardBudget {
    used: Cell<u64>,
    max: u64,
    stats: Arc<ServerStats>,
    /// Every task waiting for room; all are woken on a release and check again.
    waiters: RefCell<Vec<Waker>>,
}

impl ShardBudget {
    pub fn new(max: u64, stats: Arc<ServerStats>) -> ShardBudget {
        ShardBudget {
            used: Cell::new(0),
            max,
            stats,
            waiters: RefCell::new(Vec::new()),
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The charge up to which requests of kind `admission` are admitted.
    pub fn limit(&self, admission: Admission) -> u64 {
        match admission {
            Admission::LargeAnswer => self.max / 4 * 3,
            Admission::SmallAnswer => self.max / 8 * 7,
            Admission::Produce | Admission::NewFrame => self.max,
        }
    }

    pub fn used(&self) -> u64 {
        self.used.get()
    }

    pub fn charge(&self, bytes: u64) {
        let used = self.used.get() + bytes;
        self.used.set(used);
        self.stats.note_shard(used);
    }

    pub fn release(&self, bytes: u64) {
        let used = self.used.get();
        debug_assert!(bytes <= used, "released {bytes} of {used} shard bytes");
        let used = used.saturating_sub(bytes);
        self.used.set(used);
        self.stats.note_shard(used);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    /// Whether `bytes` more keep the charge within `limit` (at most the budget). A charge
    /// larger than the limit fits an empty shard, so one large request still goes through.
    pub fn has_room(&self, bytes: u64, limit: u64) -> bool {
        let used = self.used.get();
        used == 0 || used + bytes <= limit.min(self.max)
    }

    /// Waits until [`ShardBudget::has_room`] for `bytes` under `limit`; false at once when
    /// `giving_up` says so (checked after each release).
    pub async fn wait_for_room(
        &self,
        bytes: u64,
        limit: u64,
        giving_up: impl Fn() -> bool,
    ) -> bool {
        while !self.has_room(bytes, limit) {
            if giving_up() {
                return false;
            }
            let mut registered = false;
            std::future::poll_fn(|cx| {
                if registered {
                    return Poll::Ready(());
                }
                registered = true;
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            })
            .await;
        }
        true
    }
}

/// High-water marks and counters of one listener's connections (one shard), since start.
/// Written by the shard's thread only; read from anywhere (tests, tools).
#[derive(Debug, Default)]
pub struct ServerStats {
    budget_bytes_max: AtomicU64,
    outbox_bytes_max: AtomicU64,
    read_buffer_bytes_max: AtomicU64,
    budget_waits: AtomicU64,
    shard_bytes: AtomicU64,
    shard_bytes_max: AtomicU64,
    shard_waits: AtomicU64,
    shard_readers_waiting: AtomicU64,
    shard_busy_refusals: AtomicU64,
    outbox_total_bytes: AtomicU64,
    outbox_total_bytes_max: AtomicU64,
    partial_frame_timeouts: AtomicU64,
    readers_waiting: AtomicU64,
    requests_in_flight: AtomicU64,
    requests_handled: AtomicU64,
}

/// A copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStatsSnapshot {
    /// The most bytes one connection had charged to its budget.
    pub budget_bytes_max: u64,
    /// The most response bytes one connection held encoded but not yet written to its socket.
    pub outbox_bytes_max: u64,
    /// The largest read buffer (capacity) one connection had.
    pub read_buffer_bytes_max: u64,
    /// Times a reader stopped reading because its connection's budget was spent.
    pub budget_waits: u64,
    /// Bytes charged to the shard's budget now ([`ShardBudget`]).
    pub shard_bytes: u64,
    /// The most bytes charged to the shard's budget at once.
    pub shard_bytes_max: u64,
    /// Times a reader waited for room in the shard's budget.
    pub shard_waits: u64,
    /// Readers waiting for room in the shard's budget right now.
    pub shard_readers_waiting: u64,
    /// Produce requests answered SYSTEM_BUSY because the shard's budget was spent.
    pub shard_busy_refusals: u64,
    /// The most response bytes all connections together held encoded and unwritten (counted
    /// by the outboxes, apart from the budgets).
    pub outbox_total_bytes_max: u64,
    /// Connections closed because a frame was not complete by its deadline.
    pub partial_frame_timeouts: u64,
    /// Readers stopped for their budget right now.
    pub readers_waiting: u64,
    /// Requests being handled right now.
    pub requests_in_flight: u64,
    /// Requests handled since start.
    pub requests_handled: u64,
}

// One writer thread per listener: a load and a store, no read-modify-write on the hot path.
fn add(counter: &AtomicU64, delta: i64) {
    let now = counter.load(Ordering::Relaxed);
    counter.store(now.wrapping_add_signed(delta), Ordering::Relaxed);
}

fn raise(max: &AtomicU64, value: u64) {
    // One writer thread: a load and a store, no read-modify-write on the hot path.
    if value > max.load(Ordering::Relaxed) {
        max.store(value, Ordering::Relaxed);
    }
}

impl ServerStats {
    pub fn note_budget(&self, bytes: u64) {
        raise(&self.budget_bytes_max, bytes);
    }

    pub fn note_outbox(&self, bytes: u64) {
        raise(&self.outbox_bytes_max, bytes);
    }

    pub fn note_read_buffer(&self, bytes: u64) {
        raise(&self.read_buffer_bytes_max, bytes);
    }

    /// A reader starts (`true`) or stops (`false`) waiting for room in its budget.
    pub fn note_waiting(&self, waiting: bool) {
        if waiting {
            add(&self.budget_waits, 1);
            add(&self.readers_waiting, 1);
        } else {
            add(&self.readers_waiting, -1);
        }
    }

    pub fn note_shard(&self, bytes: u64) {
        self.shard_bytes.store(bytes, Ordering::Relaxed);
        raise(&self.shard_bytes_max, bytes);
    }

    /// A reader starts (`true`) or stops (`false`) waiting for room in the shard's budget.
    pub fn note_shard_waiting(&self, waiting: bool) {
        if waiting {
            add(&self.shard_waits, 1);
            add(&self.shard_readers_waiting, 1);
        } else {
            add(&self.shard_readers_waiting, -1);
        }
    }

    /// `delta` response bytes were queued (positive) or written or dropped (negative) by
    /// some connection's outbox.
    pub fn note_outbox_total(&self, delta: i64) {
        add(&self.outbox_total_bytes, delta);
        raise(
            &self.outbox_total_bytes_max,
            self.outbox_total_bytes.load(Ordering::Relaxed),
        );
    }

    pub fn count_shard_busy(&self) {
        add(&self.shard_busy_refusals, 1);
    }

    pub fn count_partial_frame_timeout(&self) {
        add(&self.partial_frame_timeouts, 1);
    }

    pub fn request_started(&self) {
        add(&self.requests_in_flight, 1);
    }

    pub fn request_finished(&self) {
        add(&self.requests_in_flight, -1);
        add(&self.requests_handled, 1);
    }

    pub fn snapshot(&self) -> ServerStatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStatsSnapshot {
            budget_bytes_max: get(&self.budget_bytes_max),
            outbox_bytes_max: get(&self.outbox_bytes_max),
            read_buffer_bytes_max: get(&self.read_buffer_bytes_max),
            budget_waits: get(&self.budget_waits),
            shard_bytes: get(&self.shard_bytes),
            shard_bytes_max: get(&self.shard_bytes_max),
            shard_waits: get(&self.shard_waits),
            shard_readers_waiting: get(&self.shard_readers_waiting),
            shard_busy_refusals: get(&self.shard_busy_refusals),
            outbox_total_bytes_max: get(&self.outbox_total_bytes_max),
            partial_frame_timeouts: get(&self.partial_frame_timeouts),
            readers_waiting: get(&self.readers_waiting),
            requests_in_flight: get(&self.requests_in_flight),
            requests_handled: get(&self.requests_handled),
        }
    }
}

/// Listeners' stats by listening address, for [`stats_of`]. Weak, so a stopped broker's
/// entries go away with it.
static REGISTRY: Mutex<Vec<(SocketAddr, Weak<ServerStats>)>> = Mutex::new(Vec::new());

/// Creates the stats of the listener on `addr` (once per listener, at start).
pub fn register(addr: SocketAddr) -> Arc<ServerStats> {
    let stats = Arc::new(ServerStats::default());
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    registry.retain(|(a, w)| *a != addr && w.strong_count() > 0);
    registry.push((addr, Arc::downgrade(&stats)));
    stats
}

/// The connection stats of the listener on `addr` in this process, if it is running.
pub fn stats_of(addr: SocketAddr) -> Option<ServerStatsSnapshot> {
    let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    registry
        .iter()
        .find(|(a, _)| *a == addr)
        .and_then(|(_, w)| w.upgrade())
        .map(|s| s.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_admits_what_fits_and_one_oversized_charge_alone() {
        let b = ByteBudget::new(100);
        assert!(b.has_room(100));
        b.charge(60);
        assert!(b.has_room(40));
        assert!(!b.has_room(41));
        b.release(60);
        assert!(b.has_room(1000), "an empty budget takes anything, once");
        b.charge(1000);
        assert!(!b.has_room(1));
    }

    #[test]
    fn every_fetch_is_reserved_room_for_its_largest_possible_answer() {
        use crate::protocol::FetchRequest;
        let fetch = |max_bytes| {
            Request::Fetch(FetchRequest {
                topic: "t".into(),
                queue: 0,
                offset: 0,
                max_bytes,
                max_wait_ms: 0,
                group: None,
            })
        };
        let small = response_reserve_bytes(&fetch(0), 8 << 20);
        let huge = response_reserve_bytes(&fetch(u32::MAX), 8 << 20);
        assert_eq!(
            small, huge,
            "a small max_bytes does not bound a large first record"
        );
        assert!(huge >= 8 << 20 && huge >= u64::from(MAX_FETCH_BYTES));
        assert!(huge < u64::from(MAX_FETCH_BYTES) + (8 << 20) + 64 * 1024);
    }

    #[test]
    fn a_shard_filled_by_fetches_to_their_line_still_reads_and_admits_a_producers_requests() {
        use crate::protocol::FetchRequest;
        let shard = ShardBudget::new(128 << 20, Arc::new(ServerStats::default()));
        let fetch = Request::Fetch(FetchRequest {
            topic: "t".into(),
            queue: 0,
            offset: 0,
            max_bytes: u32::MAX,
            max_wait_ms: 0,
            group: None,
        });
        let route = Request::GetRoute { topic: "t".into() };
        let fetch_bytes = response_reserve_bytes(&fetch, 8 << 20);
        let route_bytes = response_reserve_bytes(&route, 8 << 20);
        // Non-readers' fetches, each admitted while it fits below the fetch line, leave less
        // room there than a route's answer; and their read buffers add a little on top.
        let line = shard.limit(Admission::of(&fetch));
        while shard.has_room(fetch_bytes, line) {
            shard.charge(fetch_bytes);
        }
        shard.charge(line - shard.used() - route_bytes / 2);
        assert!(!shard.has_room(fetch_bytes, line), "fetches wait");
        shard.charge(256 << 10);
        assert!(
            shard.has_room(0, shard.limit(Admission::NewFrame)),
            "a new connection's first frame is read"
        );
        assert!(
            shard.has_room(route_bytes, shard.limit(Admission::of(&route))),
            "a producer gets its route"
        );
        assert!(shard.has_room(SMALL_RESPONSE_BYTES + 1024, shard.limit(Admission::Produce)));
        assert!(
            shard.limit(Admission::SmallAnswer) < shard.limit(Admission::Produce),
            "small requests that are never read cannot take the produce line's room"
        );
    }
}
