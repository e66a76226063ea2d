//! Idempotent producers: per (producer id, queue) the last few stored batches, so a retry of a
//! stored batch returns its original offsets instead of being stored twice. Rebuilt from the
//! record headers at open, so it survives restarts.
//!
//! Rules for a batch `(epoch, base_sequence, count)`:
//! - unknown producer for this queue, or a newer epoch: accepted (the sequence restarts);
//! - older epoch: `ProducerFenced`;
//! - same `(base_sequence, count)` as one of the last [`BATCHES_KEPT`] batches: duplicate;
//! - `base_sequence == last + 1`: accepted;
//! - anything else: `OutOfOrderSequence { expected: last + 1 }`.
//!
//! Sequences are u32 and wrap (wrapping arithmetic).

use std::collections::{HashMap, VecDeque};

use crate::storage::error::StorageError;

/// How many recent batches per producer and queue are remembered (Kafka keeps 5 too).
pub const BATCHES_KEPT: usize = 5;

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
    batches: VecDeque<BatchMeta>,
}

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
        if let Some(b) = s
            .batches
            .iter()
            .find(|b| b.base_seq == base_seq && b.count == count)
        {
            return Ok(SeqCheck::Duplicate(*b));
        }
        let last = s.batches.back().expect("state has a batch");
        let expected = last.base_seq.wrapping_add(last.count);
        if base_seq == expected {
            Ok(SeqCheck::Accept)
        } else {
            Err(StorageError::OutOfOrderSequence {
                producer_id,
                expected,
                got: base_seq,
            })
        }
    }

    pub fn record(&mut self, producer_id: u64, queue_uid: u32, epoch: u16, meta: BatchMeta) {
        let s = self
            .map
            .entry((producer_id, queue_uid))
            .or_insert_with(|| ProducerState {
                epoch,
                batches: VecDeque::with_capacity(BATCHES_KEPT),
            });
        if epoch != s.epoch {
            s.epoch = epoch;
            s.batches.clear();
        }
        if s.batches.len() == BATCHES_KEPT {
            s.batches.pop_front();
        }
        s.batches.push_back(meta);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}
