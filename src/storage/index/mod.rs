//! The indexes derived from the CommitLog: all of them are rebuilt from (or reconciled with)
//! the log at open, which stays the truth.
//!
//! # Layout
//! - [`consume_queue`]: per (topic, queue) entries pointing into the log, persisted lazily
//!   behind the durable log.
//! - `key_index`: message key -> log positions (in memory, rebuilt at open).
//! - `producer`: the idempotent producer sequence table (rebuilt from record headers at open).
//! - `snapshot`: what the consume queues and producer windows held at a checkpointed position,
//!   so that a restart reads it and scans only the log after it (the key index is rebuilt in
//!   the background).
//!
//! The indexes read keys and tags from a record's body with the one batch parser,
//! [`crate::format::batch::BatchIter`]. Storage keeps a body as the producer sent it; a body
//! that does not parse (the server validates before append, so only a damaged one) is still
//! stored: its messages up to the first bad one are indexed, and a body whose first message
//! does not parse gets tag hash 0 and no keys.

pub mod consume_queue;
pub(crate) mod key_index;
pub(crate) mod producer;
pub(crate) mod snapshot;

use std::collections::HashMap;

use crate::format::batch::BatchIter;
use crate::format::record::RecordHeader;
use crate::storage::index::consume_queue::{CqEntry, QueueIndex};
use crate::storage::index::key_index::KeyIndex;
use crate::storage::index::producer::{BatchMeta, ProducerTable};

/// A shard's derived indexes, all in memory (the consume-queue entries also in their files).
#[derive(Default)]
pub(crate) struct Indexes {
    pub(crate) topics: HashMap<String, HashMap<u32, QueueIndex>>,
    pub(crate) next_uid: u32,
    pub(crate) keys: KeyIndex,
    pub(crate) producers: ProducerTable,
}

impl Indexes {
    pub(crate) fn queue_mut(&mut self, topic: &str, queue_id: u32) -> &mut QueueIndex {
        if !self.topics.contains_key(topic) {
            self.topics.insert(topic.to_string(), HashMap::new());
        }
        let uid = &mut self.next_uid;
        self.topics
            .get_mut(topic)
            .expect("inserted")
            .entry(queue_id)
            .or_insert_with(|| {
                *uid += 1;
                QueueIndex::new(*uid)
            })
    }

    pub(crate) fn queue(&self, topic: &str, queue_id: u32) -> Option<&QueueIndex> {
        self.topics.get(topic)?.get(&queue_id)
    }

    pub(crate) fn apply(&mut self, topic: &str, h: &RecordHeader, body: &[u8]) {
        if h.is_gap() {
            self.apply_gap(topic, h);
            return;
        }
        let pos = h.log_position;
        let keys = &mut self.keys;
        let tag_hash = scan_body(body, |k| keys.insert(topic.as_bytes(), k, pos));
        let q = self.queue_mut(topic, h.queue_id);
        let uid = q.uid;
        q.push(CqEntry {
            position: pos,
            size: h.total_len,
            base_offset: h.base_queue_offset,
            count: h.message_count,
            tag_hash,
        });
        if let Some((pid, epoch, seq)) = h.producer() {
            self.producers.record(
                pid,
                uid,
                epoch,
                BatchMeta {
                    base_seq: seq,
                    count: h.message_count,
                    base_offset: h.base_queue_offset,
                    position: pos,
                    end: pos + u64::from(h.total_len),
                },
            );
        }
    }
}

impl Indexes {
    /// Adds the keys of a record to the key index only (the background check after an open
    /// from a snapshot; the other indexes came from the snapshot).
    pub(crate) fn index_keys(&mut self, topic: &str, h: &RecordHeader, body: &[u8]) {
        if h.is_gap() {
            return;
        }
        let keys = &mut self.keys;
        scan_body(body, |k| keys.insert(topic.as_bytes(), k, h.log_position));
    }

    /// A gap record (a quarantined corrupt record) holds no messages and gets no index entry.
    /// When it repeats the lost record's header and that record continued its queue exactly,
    /// the queue's next offset moves past it, so a lost last record of a queue is never given
    /// to new messages (offsets are not reused). Anything less plausible is ignored: the
    /// fields were read from a record that failed its CRC.
    fn apply_gap(&mut self, topic: &str, h: &RecordHeader) {
        let Some(q) = self
            .topics
            .get_mut(topic)
            .and_then(|qs| qs.get_mut(&h.queue_id))
        else {
            return;
        };
        if h.message_count > 0 && q.next_offset == h.base_queue_offset {
            q.next_offset = h.base_queue_offset + u64::from(h.message_count);
        }
    }
}

/// FNV-1a 32 of a tag; 0 is reserved for "no tag".
pub fn tag_hash(tag: &[u8]) -> u32 {
    if tag.is_empty() {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for &b in tag {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Tag hash of the first message and the keys of all messages (up to the first that does not
/// parse).
pub(crate) fn scan_body(body: &[u8], mut on_key: impl FnMut(&[u8])) -> u32 {
    let mut first_tag = None;
    for message in BatchIter::new(body) {
        let Ok(m) = message else { break };
        let tag = m.tag.unwrap_or_default();
        first_tag.get_or_insert_with(|| tag_hash(tag));
        if let Some(key) = m.key {
            on_key(key);
        }
    }
    first_tag.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::format::batch::{BatchBuilder, Message};

    #[test]
    fn keys_and_first_tag_are_extracted() {
        let mut b = BytesMut::new();
        let mut builder = BatchBuilder::new(&mut b);
        for m in [
            Message::new(&b"p1"[..])
                .with_key(&b"k1"[..])
                .with_tag(&b"tagA"[..]),
            Message::new(&b"p2"[..])
                .with_key(&b""[..])
                .with_tag(&b"tagB"[..]),
            Message::new(&b"p3"[..])
                .with_key(&b"k3"[..])
                .with_tag(&b""[..]),
        ] {
            builder.push(&m).unwrap();
        }
        let mut keys = Vec::new();
        let t = scan_body(&b, |k| keys.push(k.to_vec()));
        assert_eq!(t, tag_hash(b"tagA"));
        assert_eq!(keys, vec![b"k1".to_vec(), b"k3".to_vec()]);
    }

    #[test]
    fn garbage_body_gives_no_tag_and_no_panic() {
        for body in [
            &b""[..],
            b"\xff\xff\xff\xff",
            b"\x03\x00\x00\x00abc",
            &[7u8; 40],
        ] {
            let t = scan_body(body, |_| {});
            assert_eq!(t, 0);
        }
    }
}
