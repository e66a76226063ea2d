//! [`ShardMetrics`]: the request counters one shard keeps on its own thread.
//!
//! Plain `Cell`/`RefCell` state owned by the shard (through its `ShardContext`): recording is
//! a borrow and an add on the shard's thread, never a lock or an atomic. Other threads never
//! see it; the shard copies it into a snapshot ([`crate::metrics::Family`]) when it publishes.
//! What storage and replication already count (fsyncs, unflushed bytes, lag) stays where it
//! is and is read from there; this registry holds only what nobody counted before.

use std::cell::RefCell;
use std::collections::HashMap;

/// Messages and bytes into and out of one topic on one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicCounters {
    /// Messages stored by produce requests (a duplicate of a stored batch is not counted).
    pub produced_messages: u64,
    /// Batch bytes (as the producer sent them) of those produce requests.
    pub produced_bytes: u64,
    /// Messages at or after the requested offset in fetch answers.
    pub fetched_messages: u64,
    /// Record bytes sent in fetch answers.
    pub fetched_bytes: u64,
}

/// A shard's request counters. Topic entries are only made for topics that exist (callers
/// take a [`TopicSlot`] only for a topic in the topic table), so a client cannot grow them
/// with made-up names.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    topic_index: RefCell<HashMap<String, usize>>,
    topics: RefCell<Vec<(String, TopicCounters)>>,
    /// Produce answers by status name (`OK`, `SYSTEM_BUSY`, ...). A handful of codes: a
    /// vector beats a map.
    produce_results: RefCell<Vec<(&'static str, u64)>>,
    /// Requests refused to protect the broker, by reason.
    refusals: RefCell<Vec<(&'static str, u64)>>,
}

/// A topic's place in [`ShardMetrics`], taken before a request is handled (while its topic
/// name is at hand) and used after, so counting never copies the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSlot(usize);

fn bump(list: &RefCell<Vec<(&'static str, u64)>>, key: &'static str) {
    let mut list = list.borrow_mut();
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => list.push((key, 1)),
    }
}

impl ShardMetrics {
    /// The slot of `topic`; its name is copied once, the first time. Only for existing topics.
    pub fn topic_slot(&self, topic: &str) -> TopicSlot {
        if let Some(i) = self.topic_index.borrow().get(topic) {
            return TopicSlot(*i);
        }
        let mut topics = self.topics.borrow_mut();
        topics.push((topic.to_string(), TopicCounters::default()));
        let i = topics.len() - 1;
        self.topic_index.borrow_mut().insert(topic.to_string(), i);
        TopicSlot(i)
    }

    fn with_topic(&self, slot: TopicSlot, f: impl FnOnce(&mut TopicCounters)) {
        if let Some((_, c)) = self.topics.borrow_mut().get_mut(slot.0) {
            f(c);
        }
    }

    /// A produce stored `messages` messages of `bytes` batch bytes.
    pub fn count_produced(&self, slot: TopicSlot, messages: u64, bytes: u64) {
        self.with_topic(slot, |c| {
            c.produced_messages += messages;
            c.produced_bytes += bytes;
        });
    }

    /// A fetch answered `messages` messages in `bytes` record bytes.
    pub fn count_fetched(&self, slot: TopicSlot, messages: u64, bytes: u64) {
        self.with_topic(slot, |c| {
            c.fetched_messages += messages;
            c.fetched_bytes += bytes;
        });
    }

    /// A produce request was answered with status `code` (its name, `OK` for success).
    pub fn count_produce_result(&self, code: &'static str) {
        bump(&self.produce_results, code);
    }

    /// A request was refused to protect the broker (`reason`: `shutting_down`, ...).
    pub fn count_refusal(&self, reason: &'static str) {
        bump(&self.refusals, reason);
    }

    /// Per-topic counters, sorted by topic.
    pub fn topics(&self) -> Vec<(String, TopicCounters)> {
        let mut v = self.topics.borrow().clone();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn produce_results(&self) -> Vec<(&'static str, u64)> {
        self.produce_results.borrow().clone()
    }

    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        self.refusals.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_topic_and_per_code() {
        let m = ShardMetrics::default();
        let b = m.topic_slot("b");
        let a = m.topic_slot("a");
        m.count_produced(a, 3, 300);
        m.count_produced(m.topic_slot("a"), 2, 200);
        m.count_fetched(b, 1, 64);
        m.count_produce_result("OK");
        m.count_produce_result("OK");
        m.count_produce_result("SYSTEM_BUSY");
        let t = m.topics();
        assert_eq!(t.len(), 2, "one entry per topic");
        assert_eq!(t[0].0, "a");
        assert_eq!((t[0].1.produced_messages, t[0].1.produced_bytes), (5, 500));
        assert_eq!((t[1].1.fetched_messages, t[1].1.fetched_bytes), (1, 64));
        assert_eq!(m.produce_results(), vec![("OK", 2), ("SYSTEM_BUSY", 1)]);
    }
}
