//! Epochs: the history of master terms of one shard's log.
//!
//! Every time a shard becomes master — at every start as master and at every promotion — it
//! begins a new epoch at its current log end and records `(epoch, start)` in
//! `<shard dir>/epochs` before taking a write. One epoch therefore has one writer, so two logs
//! whose histories say the same epoch for a byte hold the same byte there. A slave adopts its
//! master's history as it follows.
//!
//! An epoch is unique to the node that minted it: `term << NODE_BITS | node_id` ([`pack`]).
//! Two brokers that both take "current term + 1" (an old master restarting while its slave is
//! promoted) mint different epochs, so their logs diverge where the epochs begin instead of
//! passing as equal. Epochs compare as numbers: the higher term is newer, a tie in term is
//! broken by the node id (either way the two are different writers).
//!
//! A new epoch starts exactly at the minting node's log end: entries adopted from a master
//! that start at or beyond our end covered bytes we do not have, and are dropped
//! ([`EpochHistory::begin`]), so a promoted slave that lags never attributes its own first
//! writes to the old master's epoch.
//!
//! Starting a new epoch at every start (not only at promotions) matters: a master that crashes
//! after streaming bytes it had not yet written durably may come back without them and write
//! different bytes at the same positions; the new epoch makes the slave's copy of the lost
//! bytes show up as divergent, and it is truncated.
//!
//! [`divergence`] is pure: where two histories, with their log ends, stop agreeing.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::protocol::EpochEntry;

/// Errors reading or writing the epoch file.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {detail}")]
    Parse {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

pub use crate::config::replication::{NODE_BITS, NODE_ID_MAX};

/// The epoch of `term` minted by `node`.
pub fn pack(term: u64, node: u32) -> u64 {
    debug_assert!(node <= NODE_ID_MAX, "node id {node} out of range");
    (term << NODE_BITS) | u64::from(node & NODE_ID_MAX)
}

/// The term of an epoch (epochs written before node ids existed have term 0).
pub fn term_of(epoch: u64) -> u64 {
    epoch >> NODE_BITS
}

/// The node that minted an epoch.
pub fn node_of(epoch: u64) -> u32 {
    (epoch & u64::from(NODE_ID_MAX)) as u32
}

/// `12345 (term 3, node 77)`, for logs and errors.
pub fn describe(epoch: u64) -> String {
    format!("{epoch} (term {}, node {})", term_of(epoch), node_of(epoch))
}

/// This broker's node id: `configured`, or the one kept in `<data_dir>/node_id`, made at
/// random (and saved with tmp + fsync + rename) the first time. Runs before the shards start.
pub fn node_id(data_dir: &Path, configured: Option<u32>) -> Result<u32, EpochError> {
    if let Some(id) = configured {
        return Ok(id);
    }
    let path = data_dir.join("node_id");
    let io = |source| EpochError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|id| (1..=NODE_ID_MAX).contains(id))
                .ok_or_else(|| EpochError::Parse {
                    path: path.clone(),
                    line: 1,
                    detail: format!("expected a node id in 1..={NODE_ID_MAX}"),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // RandomState is seeded from the OS's random source: good enough to keep two brokers'
    // ids apart (a clash is also refused at the replication handshake).
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let id = (h.finish() % u64::from(NODE_ID_MAX)) as u32 + 1;
    let tmp = data_dir.join("node_id.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(id)
}

/// Entries kept by [`EpochHistory::begin`]; well under the wire limit
/// (`protocol::MAX_EPOCH_ENTRIES`).
pub const MAX_KEPT: usize = 512;

/// `(epoch, start)` entries, epochs strictly increasing, starts non-decreasing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochHistory {
    entries: Vec<EpochEntry>,
}

impl EpochHistory {
    /// A history from entries received from a peer; `None` unless epochs strictly increase and
    /// starts never decrease.
    pub fn from_entries(entries: Vec<EpochEntry>) -> Option<EpochHistory> {
        let ok = entries
            .windows(2)
            .all(|w| w[1].epoch > w[0].epoch && w[1].start >= w[0].start);
        ok.then_some(EpochHistory { entries })
    }

    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The current (last) epoch; 0 for a log that never had a master.
    pub fn current(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.epoch)
    }

    /// Starts a new epoch of `node` at `end` (this node's log end) and returns it: the next
    /// term after the current epoch's, with `node` in the low bits.
    ///
    /// Entries starting at or beyond `end` go: an epoch that wrote nothing here (restarts),
    /// or one adopted from a master whose bytes we never received (a lagging slave being
    /// promoted). Keeping the latter would credit our own writes from `end` on to the old
    /// master's epoch. Only the newest [`MAX_KEPT`] entries are kept, so restarts cannot grow
    /// the history without bound. Forgetting old entries is safe: a position no entry covers
    /// compares as "no epoch", so the worst case is a full re-sync of a slave, never a wrong
    /// match.
    pub fn begin(&mut self, end: u64, node: u32) -> u64 {
        self.begin_at_term(end, node, 0)
    }

    /// Like [`EpochHistory::begin`], with a term of at least `min_term` (a cluster's
    /// election revision).
    pub fn begin_at_term(&mut self, end: u64, node: u32, min_term: u64) -> u64 {
        let epoch = pack((term_of(self.current()) + 1).max(min_term), node);
        self.entries.retain(|e| e.start < end);
        self.entries.push(EpochEntry { epoch, start: end });
        if self.entries.len() > MAX_KEPT {
            self.entries.drain(..self.entries.len() - MAX_KEPT);
        }
        epoch
    }

    /// The epoch that wrote the byte at `pos`, if any.
    fn epoch_at(&self, pos: u64) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.start <= pos)
            .map(|e| e.epoch)
    }

    /// The file in a shard directory.
    pub fn path(shard_dir: &Path) -> PathBuf {
        shard_dir.join("epochs")
    }

    /// Loads `<shard_dir>/epochs`; a missing file is an empty history.
    pub fn load(shard_dir: &Path) -> Result<EpochHistory, EpochError> {
        let path = Self::path(shard_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(EpochError::Io { path, source }),
        };
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |detail: &str| EpochError::Parse {
                path: path.clone(),
                line: i + 1,
                detail: detail.to_string(),
            };
            let mut parts = line.split_whitespace();
            let (Some(e), Some(s), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("expected `<epoch> <start position>`"));
            };
            let epoch = e.parse().map_err(|_| bad("epoch is not a number"))?;
            let start = s.parse().map_err(|_| bad("start is not a number"))?;
            entries.push(EpochEntry { epoch, start });
        }
        Self::from_entries(entries).ok_or_else(|| EpochError::Parse {
            path: path.clone(),
            line: 0,
            detail: "epochs must increase and starts must not decrease".into(),
        })
    }

    /// Writes the history atomically (tmp + fsync + rename + directory fsync): after a crash
    /// the file is the old or the new history, never a torn one.
    pub fn save(&self, shard_dir: &Path) -> Result<(), EpochError> {
        let path = Self::path(shard_dir);
        let tmp = shard_dir.join("epochs.tmp");
        let io = |source| EpochError::Io {
            path: path.clone(),
            source,
        };
        let mut text =
            String::from("# epoch start_position (written by ringmq; see replication/epoch.rs)\n");
        for e in &self.entries {
            text.push_str(&format!("{} {}\n", e.epoch, e.start));
        }
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(shard_dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// The end of the longest common prefix of two logs, given their histories and ends: the first
/// position where the epochs that wrote the byte differ, or the shorter end.
pub fn divergence(a: &EpochHistory, a_end: u64, b: &EpochHistory, b_end: u64) -> u64 {
    let end = a_end.min(b_end);
    let mut bounds: Vec<u64> = a
        .entries
        .iter()
        .chain(&b.entries)
        .map(|e| e.start)
        .chain([0])
        .filter(|&p| p < end)
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    // Each epoch covers an interval, so the two "epoch at position" step functions can only
    // start to differ at one of the starts.
    bounds
        .into_iter()
        .find(|&p| a.epoch_at(p) != b.epoch_at(p))
        .unwrap_or(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(entries: &[(u64, u64)]) -> EpochHistory {
        EpochHistory::from_entries(
            entries
                .iter()
                .map(|&(epoch, start)| EpochEntry { epoch, start })
                .collect(),
        )
        .expect("valid history")
    }

    #[test]
    fn same_history_diverges_at_the_shorter_end() {
        let m = h(&[(1, 0), (2, 100)]);
        assert_eq!(divergence(&m, 500, &m, 300), 300);
        assert_eq!(divergence(&m, 200, &m, 300), 200);
    }

    #[test]
    fn a_restarted_master_makes_the_slaves_unsynced_tail_diverge() {
        // The slave got [0, 400) in epoch 1; the master crashed having kept only [0, 250) and
        // started epoch 2 there.
        let slave = h(&[(1, 0)]);
        let master = h(&[(1, 0), (2, 250)]);
        assert_eq!(divergence(&master, 900, &slave, 400), 250);
        // A slave that had only 200 bytes keeps them all.
        assert_eq!(divergence(&master, 900, &slave, 200), 200);
    }

    #[test]
    fn an_old_master_rejoining_truncates_to_the_promotion_point() {
        // Old master wrote epoch 1 to 1000; the slave had 800 when promoted (epoch 2 at 800).
        let old = h(&[(1, 0)]);
        let new = h(&[(1, 0), (2, 800)]);
        assert_eq!(divergence(&new, 1500, &old, 1000), 800);
    }

    #[test]
    fn unrelated_or_empty_histories_share_nothing() {
        let a = h(&[(1, 0)]);
        let b = h(&[(3, 0)]);
        assert_eq!(divergence(&a, 100, &b, 100), 0);
        assert_eq!(divergence(&a, 100, &EpochHistory::default(), 0), 0);
        // An empty slave log has nothing to keep, whatever its history says.
        assert_eq!(divergence(&a, 100, &a, 0), 0);
    }

    #[test]
    fn the_history_stays_bounded_and_forgotten_positions_never_match() {
        let n = MAX_KEPT as u64 + 10;
        let mut h = EpochHistory::default();
        for i in 0..n {
            h.begin(i * 100, 7);
        }
        assert_eq!((h.entries().len(), h.current()), (MAX_KEPT, pack(n, 7)));
        // A peer that still remembers the oldest epochs shares nothing below what we keep.
        let full = EpochHistory::from_entries(
            (0..n)
                .map(|i| EpochEntry {
                    epoch: pack(i + 1, 7),
                    start: i * 100,
                })
                .collect(),
        )
        .unwrap();
        assert_eq!(divergence(&h, n * 100, &full, n * 100), 0);
        // Above it the two agree.
        assert_eq!(divergence(&h, n * 100, &h, n * 100), n * 100);
    }

    #[test]
    fn a_promoted_lagging_slave_starts_its_epoch_at_its_own_log_end() {
        // The master (node 1) wrote epoch 1 from 0 and, after a restart, epoch 2 from 1000;
        // its slave (node 2) adopted that history but has only 800 bytes when promoted.
        let master = h(&[(pack(1, 1), 0), (pack(2, 1), 1000)]);
        let mut promoted = master.clone();
        let epoch = promoted.begin(800, 2);
        assert_eq!(epoch, pack(3, 2));
        assert_eq!(
            promoted.entries(),
            &[
                EpochEntry {
                    epoch: pack(1, 1),
                    start: 0
                },
                EpochEntry { epoch, start: 800 },
            ]
        );
        // It then writes to 1500; the old master, back with its 1200 bytes, keeps only what
        // both wrote in epoch 1.
        assert_eq!(divergence(&promoted, 1500, &master, 1200), 800);
    }

    #[test]
    fn the_same_term_minted_by_two_nodes_diverges() {
        // Both nodes took term 2 after the same epoch 1: an old master restarting (node 1,
        // at its end 900) and its slave promoted (node 2, at its end 600).
        let before = h(&[(pack(1, 1), 0)]);
        let (mut restarted, mut promoted) = (before.clone(), before);
        restarted.begin(900, 1);
        promoted.begin(600, 2);
        assert_ne!(restarted.current(), promoted.current());
        assert_eq!(term_of(restarted.current()), term_of(promoted.current()));
        assert_eq!(divergence(&restarted, 1400, &promoted, 1000), 600);
        assert_eq!(divergence(&promoted, 1000, &restarted, 1400), 600);
    }

    #[test]
    fn a_node_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = node_id(dir.path(), None).unwrap();
        assert!((1..=NODE_ID_MAX).contains(&id));
        assert_eq!(node_id(dir.path(), None).unwrap(), id);
        assert_eq!(node_id(dir.path(), Some(9)).unwrap(), 9);
        std::fs::write(dir.path().join("node_id"), "0\n").unwrap();
        assert!(node_id(dir.path(), None).is_err());
        assert_eq!(
            describe(pack(3, 77)),
            format!("{} (term 3, node 77)", pack(3, 77))
        );
    }

    #[test]
    fn begin_numbers_epochs_and_the_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut hist = EpochHistory::load(dir.path()).unwrap();
        assert_eq!(hist.current(), 0);
        assert_eq!(hist.begin(0, 5), pack(1, 5));
        assert_eq!(hist.begin(4096, 5), pack(2, 5));
        // Restarts without writes in between do not add entries.
        assert_eq!(hist.begin(4096, 5), pack(3, 5));
        assert_eq!(hist.entries().len(), 2);
        hist.save(dir.path()).unwrap();
        assert_eq!(EpochHistory::load(dir.path()).unwrap(), hist);
        std::fs::write(EpochHistory::path(dir.path()), "2 0\n1 5\n").unwrap();
        assert!(EpochHistory::load(dir.path()).is_err());
        assert!(EpochHistory::from_entries(vec![
            EpochEntry {
                epoch: 2,
                start: 10
            },
            EpochEntry { epoch: 3, start: 5 },
        ])
        .is_none());
    }
}
