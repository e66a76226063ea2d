//! Idempotent producers: per (producer id, queue) the window of recently stored batches, so a
//! retry of a stored batch returns its original offsets instead of being stored twice. Rebuilt
//! from the record headers at open, so it survives restarts.
//!
//! The window is [`PRODUCER_WINDOW_BATCHES`] batches, a constant the client shares: a producer
//! never has more batches of one queue unacknowledged than that, so every batch it may retry is
//! still in the window (issue 11 item 6: the broker kept 5 while the client kept up to 1024 in
//! flight, and a retry of an older stored batch failed).
//!
//! Rules for a batch `(epoch, base_sequence, count)`:
//! - unknown producer for this queue, or a newer epoch: accepted (the sequence restarts);
//! - older epoch: `ProducerFenced`;
//! - `base_sequence == next expected`: accepted (checked first: the common case costs nothing);
//! - `base_sequence` and `count` of a batch in the window: duplicate, with its original offsets;
//! - ahead of the next expected one: `SequenceGap` (retriable: an earlier batch has not arrived,
//!   the producer re-sends from its earliest unacknowledged batch);
//! - anything else (older than the window, or not a stored batch's boundaries):
//!   `OutOfOrderSequence`, not retriable.
//!
//! Sequences are u32 and wrap (wrapping arithmetic); "ahead" means less than 2^31 ahead.
//!
//! Memory: at most [`PRODUCER_WINDOW_BATCHES`] × 32 bytes of batch metadata (4 KiB) per
//! producer and queue it wrote to, plus the map entry; a producer that wrote a few batches holds
//! only those. Producers are not expired yet (a table of many short-lived producers grows by
//! their entries).

use std::collections::{HashMap, VecDeque};

use crate::storage::error::StorageError;

pub use crate::protocol::limits::PRODUCER_WINDOW_BATCHES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    pub base_seq: u32,
    pub count: u32,
    pub base_offset: u64,
    pub position: u64,
    pub end: u64,
}

struct ProducerState {
    epoch: u16,
    /// In sequence order, each batch starting where the previous one ended (only the next
    /// expected sequence is ever accepted within an epoch).
    batches: VecDeque<BatchMeta>,
}

impl ProducerState {
    fn next_expected(&self) -> u32 {
        let last = self.batches.back().expect("state has a batch");
        last.base_seq.wrapping_add(last.count)
    }
}

#[derive(Debug)]
pub(crate) enum SeqCheck {
    Accept,
    Duplicate(BatchMeta),
}

#[derive(Default)]
pub(crate) struct ProducerTable {
    map: HashMap<(u64, u32), ProducerState>,
}

impl ProducerTable {
    pub fn check(
        &self,
        producer_id: u64,
        queue_uid: u32,
        epoch: u16,
        base_seq: u32,
        count: u32,
    ) -> Result<SeqCheck, StorageError> {
        let Some(s) = self.map.get(&(producer_id, queue_uid)) else {
            return Ok(SeqCheck::Accept);
        };
        if epoch < s.epoch {
            return Err(StorageError::ProducerFenced {
                producer_id,
                epoch,
                current_epoch: s.epoch,
            });
        }
        if epoch > s.epoch {
            return Ok(SeqCheck::Accept);
        }
        let expected = s.next_expected();
        if base_seq == expected {
            return Ok(SeqCheck::Accept);
        }
        let ahead = base_seq.wrapping_sub(expected);
        if ahead < 1 << 31 {
            return Err(StorageError::SequenceGap {
                producer_id,
                expected,
                got: base_seq,
            });
        }
        // Behind: a retry. The window is contiguous, so the batch is found by its distance
        // from the window's first sequence.
        let first = s.batches.front().expect("state has a batch").base_seq;
        let from_first = base_seq.wrapping_sub(first);
        let span = expected.wrapping_sub(first);
        if from_first < span {
            let i = s
                .batches
                .partition_point(|b| b.base_seq.wrapping_sub(first) < from_first);
            if let Some(b) = s.batches.get(i) {
                if b.base_seq == base_seq && b.count == count {
                    return Ok(SeqCheck::Duplicate(*b));
                }
            }
        }
        Err(StorageError::OutOfOrderSequence {
            producer_id,
            expected,
            got: base_seq,
        })
    }

    pub fn record(&mut self, producer_id: u64, queue_uid: u32, epoch: u16, meta: BatchMeta) {
        let s = self
            .map
            .entry((producer_id, queue_uid))
            .or_insert_with(|| ProducerState {
                epoch,
                batches: VecDeque::new(),
            });
        if epoch != s.epoch {
            s.epoch = epoch;
            s.batches.clear();
        }
        if s.batches.len() == PRODUCER_WINDOW_BATCHES {
            s.batches.pop_front();
        }
        s.batches.push_back(meta);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Every (producer, queue) with its epoch and window, for the index snapshot.
    pub(crate) fn states(&self) -> impl Iterator<Item = (u64, u32, u16, &VecDeque<BatchMeta>)> {
        self.map
            .iter()
            .map(|(&(pid, uid), s)| (pid, uid, s.epoch, &s.batches))
    }

    /// Puts back one state read from an index snapshot (`batches` non-empty, in order).
    pub(crate) fn restore(
        &mut self,
        producer_id: u64,
        queue_uid: u32,
        epoch: u16,
        batches: Vec<BatchMeta>,
    ) {
        if batches.is_empty() {
            return;
        }
        self.map.insert(
            (producer_id, queue_uid),
            ProducerState {
                epoch,
                batches: batches.into(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(base_seq: u32, count: u32, base_offset: u64) -> BatchMeta {
        BatchMeta {
            base_seq,
            count,
            base_offset,
            position: base_offset * 100,
            end: (base_offset + u64::from(count)) * 100,
        }
    }

    /// Stores `n` batches of `count` messages from `first_seq` on, at queue offsets 1000, ...
    fn stored(table: &mut ProducerTable, first_seq: u32, n: usize, count: u32) -> Vec<BatchMeta> {
        let mut out = Vec::new();
        for i in 0..n {
            let seq = first_seq.wrapping_add(i as u32 * count);
            assert!(matches!(
                table.check(7, 1, 0, seq, count).unwrap(),
                SeqCheck::Accept
            ));
            let m = meta(seq, count, 1000 + (i as u64) * u64::from(count));
            table.record(7, 1, 0, m);
            out.push(m);
        }
        out
    }

    #[test]
    fn a_retry_of_any_batch_in_the_window_gets_its_original_offsets() {
        let mut table = ProducerTable::default();
        let batches = stored(&mut table, 0, PRODUCER_WINDOW_BATCHES, 3);
        for b in &batches {
            match table.check(7, 1, 0, b.base_seq, b.count).unwrap() {
                SeqCheck::Duplicate(m) => assert_eq!(m, *b),
                SeqCheck::Accept => panic!("batch {} accepted twice", b.base_seq),
            }
        }
    }

    #[test]
    fn the_window_holds_exactly_the_shared_constant_of_batches() {
        let mut table = ProducerTable::default();
        let batches = stored(&mut table, 0, PRODUCER_WINDOW_BATCHES + 10, 1);
        let s = &table.map[&(7, 1)];
        assert_eq!(s.batches.len(), PRODUCER_WINDOW_BATCHES, "memory bound");
        // The 10 oldest fell out: a retry of one is refused, not stored again.
        let e = table.check(7, 1, 0, batches[9].base_seq, 1).unwrap_err();
        assert!(matches!(e, StorageError::OutOfOrderSequence { .. }), "{e}");
        let oldest_kept = batches[10];
        assert!(matches!(
            table.check(7, 1, 0, oldest_kept.base_seq, 1).unwrap(),
            SeqCheck::Duplicate(m) if m == oldest_kept
        ));
    }

    #[test]
    fn a_batch_ahead_is_a_retriable_gap_and_a_misaligned_retry_is_refused() {
        let mut table = ProducerTable::default();
        stored(&mut table, 0, 4, 10);
        let e = table.check(7, 1, 0, 50, 10).unwrap_err();
        assert!(
            matches!(
                e,
                StorageError::SequenceGap {
                    expected: 40,
                    got: 50,
                    ..
                }
            ),
            "{e}"
        );
        // Inside a stored batch, or its start with another count: not that batch.
        for (seq, count) in [(15, 10), (10, 9)] {
            let e = table.check(7, 1, 0, seq, count).unwrap_err();
            assert!(matches!(e, StorageError::OutOfOrderSequence { .. }), "{e}");
        }
        assert!(matches!(
            table.check(7, 1, 0, 40, 10).unwrap(),
            SeqCheck::Accept
        ));
    }

    #[test]
    fn sequences_wrap_around_u32() {
        let mut table = ProducerTable::default();
        let batches = stored(&mut table, u32::MAX - 15, 8, 4);
        for b in &batches {
            assert!(matches!(
                table.check(7, 1, 0, b.base_seq, b.count).unwrap(),
                SeqCheck::Duplicate(m) if m == *b
            ));
        }
        assert!(matches!(
            table.check(7, 1, 0, 16, 4).unwrap(),
            SeqCheck::Accept
        ));
        assert!(matches!(
            table.check(7, 1, 0, 20, 4).unwrap_err(),
            StorageError::SequenceGap { expected: 16, .. }
        ));
    }

    #[test]
    fn an_older_epoch_is_fenced_and_a_newer_one_restarts_the_sequence() {
        let mut table = ProducerTable::default();
        table.record(7, 1, 3, meta(0, 1, 0));
        assert!(matches!(
            table.check(7, 1, 2, 1, 1).unwrap_err(),
            StorageError::ProducerFenced {
                epoch: 2,
                current_epoch: 3,
                ..
            }
        ));
        assert!(matches!(
            table.check(7, 1, 4, 99, 1).unwrap(),
            SeqCheck::Accept
        ));
    }
}
