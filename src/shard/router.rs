//! Which shard owns a queue.
//!
//! `shard_of` is a pure function of the topic name, the queue id and the shard count, so a
//! client that knows the shard count can route without asking; the route table
//! (`GetRoute`) says the same thing with addresses attached. The topic hash offsets the
//! queues of each topic so that many small topics do not all pile onto shard 0, while the
//! queues of one topic still spread round robin (8 queues on 2 shards: 4 each).

/// FNV-1a, 32 bit: stable across versions and platforms (it is part of the contract with
/// clients), and cheap.
pub fn topic_hash(topic: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in topic.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The shard that owns `queue` of `topic` on a broker with `shards` shards.
pub fn shard_of(topic: &str, queue: u32, shards: usize) -> usize {
    assert!(shards > 0, "a broker has at least one shard");
    ((u64::from(topic_hash(topic)) + u64::from(queue)) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_of_a_topic_spread_evenly_over_shards() {
        let mut per_shard = [0; 2];
        for q in 0..8 {
            per_shard[shard_of("orders", q, 2)] += 1;
        }
        assert_eq!(per_shard, [4, 4]);
    }

    #[test]
    fn routing_is_stable() {
        // Part of the client contract: these values must never change.
        assert_eq!(topic_hash(""), 0x811c_9dc5);
        assert_eq!(topic_hash("a"), 0xe40c_292c);
        assert_eq!(shard_of("t", 0, 1), 0);
    }
}
