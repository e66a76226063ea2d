//! Key index: message key -> log positions of the records holding it. Derived, in memory,
//! rebuilt at open. Stores 64-bit hashes of (topic, key), so a lookup can return a false
//! positive with negligible probability; the caller checks the key in the record.

use std::collections::HashMap;

#[derive(Default)]
pub(crate) struct KeyIndex {
    map: HashMap<u64, Vec<u64>>,
}

impl KeyIndex {
    pub fn insert(&mut self, topic: &[u8], key: &[u8], position: u64) {
        let v = self.map.entry(key_hash(topic, key)).or_default();
        if v.last() != Some(&position) {
            v.push(position);
        }
    }

    pub fn lookup(&self, topic: &[u8], key: &[u8]) -> &[u64] {
        self.map
            .get(&key_hash(topic, key))
            .map_or(&[], |v| v.as_slice())
    }

    pub fn prune_below(&mut self, position: u64) {
        self.map.retain(|_, v| {
            v.retain(|&p| p >= position);
            !v.is_empty()
        });
    }
}

/// FNV-1a 64 over `topic`, a separator and `key`: the index stores these hashes.
fn key_hash(topic: &[u8], key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in topic.iter().chain(&[0xffu8]).chain(key) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
