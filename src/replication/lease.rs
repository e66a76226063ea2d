//! A cluster lease: in a broker group on etcd (`ringmq broker --cluster ...`), a master acks
//! only while it holds its lease.
//!
//! The cluster's control thread renews the lease at etcd and, after every renewal that etcd
//! confirmed, moves [`Lease::valid_until`] to *the time the renewal was sent* plus a safe
//! fraction of the TTL. etcd cannot expire the lease before it received that renewal plus the
//! full TTL, and only then can another broker win the election, so this master stops acking
//! before anyone else may start (the margin absorbs a clock-rate difference between the two
//! hosts and the time an ack checked just before the deadline takes to leave). Every ack
//! checks the lease after its waits, like the fence, so a record stored while the lease ran
//! out is not acknowledged (an idempotent producer retries it at the new master).
//!
//! A lease that *lapsed* (not renewed in time, etcd unreachable or without a quorum) is not
//! the same as one *revoked* (etcd said it is gone, or we step down): without etcd no other
//! broker can be elected, but we cannot tell a lost quorum from a partition that cut only us
//! off. A SYNC_MASTER whose in-sync set names its slave keeps acking through a lapse, because
//! every ack waits for that slave anyway, and the slave stops confirming before it takes over
//! (promotion stops the follower first): whatever it confirmed, it holds. A master with
//! nothing else to fence it (ASYNC_MASTER, or a SYNC_MASTER acking alone) acks nothing once
//! its lease lapsed. (Kafka's leaders behave the same way without their controller quorum:
//! they serve with the ISR they have, and cannot shrink it.)
//!
//! Shared by the control thread (plain threads) and every shard: atomics, no lock. Without a
//! cluster there is no lease and nothing changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The lease of one broker, as the shards see it.
#[derive(Debug)]
pub struct Lease {
    /// What `valid_until_ns` counts from.
    origin: Instant,
    /// Nanoseconds after `origin` until which acks may be sent; 0 = not held.
    valid_until_ns: AtomicU64,
    /// The term a new epoch of this broker takes at least: the create revision of the
    /// election key it holds, unique in the etcd cluster (0 = none).
    term: AtomicU64,
    /// SYNC_MASTER: acks need no replica, because the group's in-sync set in etcd names no
    /// slave (written there *before* this is set, so no slave that lacks these acks may take
    /// over). Cleared before a slave is put back in the set.
    solo: AtomicBool,
    /// Whether etcd answered the last renewal (for metrics and logs).
    etcd_answering: AtomicBool,
}

/// Where a lease stands, as an ack sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Never held, or revoked: acks stop.
    NotHeld,
    Held,
    /// Held once, not renewed in time: see the module doc for who may still ack.
    Lapsed,
}

impl LeaseState {
    pub fn name(self) -> &'static str {
        match self {
            LeaseState::NotHeld => "not_held",
            LeaseState::Held => "held",
            LeaseState::Lapsed => "lapsed",
        }
    }
}

impl Default for Lease {
    fn default() -> Self {
        Lease::new()
    }
}

impl Lease {
    /// A lease not held.
    pub fn new() -> Lease {
        Lease {
            origin: Instant::now(),
            valid_until_ns: AtomicU64::new(0),
            term: AtomicU64::new(0),
            solo: AtomicBool::new(false),
            etcd_answering: AtomicBool::new(true),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Acks may be sent until `until` (never moved back by a late renewal).
    pub fn extend_to(&self, until: Instant) {
        // At least 1, so a deadline at the origin still reads as "held once".
        self.valid_until_ns
            .fetch_max(self.nanos(until).max(1), Ordering::AcqRel);
    }

    /// No more acks, at once (lost the election key, stepping down, shutting down).
    pub fn revoke(&self) {
        self.valid_until_ns.store(0, Ordering::Release);
    }

    /// Whether acks may be sent now.
    pub fn holds(&self) -> bool {
        self.remaining().is_some()
    }

    /// Time left until acks stop, `None` if they have stopped.
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.valid_until_ns.load(Ordering::Acquire);
        let now = self.nanos(Instant::now());
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Held, lapsed (not renewed in time) or not held (never, or revoked).
    pub fn state(&self) -> LeaseState {
        let until = self.valid_until_ns.load(Ordering::Acquire);
        if until == 0 {
            LeaseState::NotHeld
        } else if until > self.nanos(Instant::now()) {
            LeaseState::Held
        } else {
            LeaseState::Lapsed
        }
    }

    /// Whether etcd answered the last renewal.
    pub fn etcd_answering(&self) -> bool {
        self.etcd_answering.load(Ordering::Acquire)
    }

    pub fn set_etcd_answering(&self, answering: bool) {
        self.etcd_answering.store(answering, Ordering::Release);
    }

    /// The term a new epoch takes at least (see the field).
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Set before this broker becomes master under a newly won election key.
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::Release);
    }

    /// Whether SYNC_MASTER acks may go without a replica (see the field).
    pub fn solo(&self) -> bool {
        self.solo.load(Ordering::Acquire)
    }

    pub fn set_solo(&self, solo: bool) {
        self.solo.store(solo, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_its_deadline_and_never_moves_back() {
        let lease = Lease::new();
        assert!(!lease.holds(), "a new lease is not held");
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(lease.holds());
        // A late renewal with an earlier deadline does not shorten it.
        lease.extend_to(Instant::now() + Duration::from_millis(1));
        assert!(lease.remaining().unwrap() > Duration::from_secs(50));
        assert_eq!(lease.state(), LeaseState::Held);
        lease.revoke();
        assert!(!lease.holds());
        assert_eq!(lease.state(), LeaseState::NotHeld, "revoked is not lapsed");
        lease.extend_to(Instant::now() - Duration::from_millis(1));
        assert!(!lease.holds(), "a deadline in the past is not held");
        assert_eq!(lease.state(), LeaseState::Lapsed);
    }
}
