//! A tiny, defensive reader of the message batch body, only to extract tags and keys for the
//! indexes. Storage keeps the body as the producer sent it; a body that does not parse is still
//! stored, it just gets tag hash 0 and no keys (the server validates before append).
//!
//! Body = messages back to back, each (little-endian):
//! `len u32` (bytes after this field) | `born_timestamp_ms u64` | `flags u16` |
//! `key_len u16` + key | `tag_len u16` + tag | `props_len u16` + props | `payload_len u32` + payload

/// Calls `f(key, tag)` for every message until the body ends or stops parsing. Returns whether
/// the whole body parsed.
pub(crate) fn for_each_message(body: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> bool {
    let mut rest = body;
    while !rest.is_empty() {
        let Some(len) = rest
            .get(0..4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        else {
            return false;
        };
        let Some(msg) = rest.get(4..4 + len as usize) else {
            return false;
        };
        rest = &rest[4 + len as usize..];
        let mut cur = Cursor { b: msg, at: 0 };
        let parsed = (|| {
            cur.skip(8 + 2)?;
            let key_len = cur.u16()?;
            let key = cur.take(key_len as usize)?;
            let tag_len = cur.u16()?;
            let tag = cur.take(tag_len as usize)?;
            let props_len = cur.u16()?;
            cur.skip(props_len as usize)?;
            let payload_len = cur.u32()?;
            cur.skip(payload_len as usize)?;
            Some((key, tag))
        })();
        match parsed {
            Some((key, tag)) => f(key, tag),
            None => return false,
        }
    }
    true
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
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

/// FNV-1a 64 over `topic`, a separator and `key`: the key index stores these hashes.
pub(crate) fn key_hash(topic: &[u8], key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in topic.iter().chain(&[0xffu8]).chain(key) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Tag hash of the first message and the keys of all messages.
pub(crate) fn scan_body(body: &[u8], mut on_key: impl FnMut(&[u8])) -> u32 {
    let mut first_tag = None;
    for_each_message(body, |key, tag| {
        if first_tag.is_none() {
            first_tag = Some(tag_hash(tag));
        }
        if !key.is_empty() {
            on_key(key);
        }
    });
    first_tag.unwrap_or(0)
}

/// Encodes one message in the batch format (tests and the bench).
pub fn encode_message(out: &mut Vec<u8>, key: &[u8], tag: &[u8], payload: &[u8]) {
    let len = 8 + 2 + 2 + key.len() + 2 + tag.len() + 2 + 4 + payload.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_first_tag_are_extracted() {
        let mut b = Vec::new();
        encode_message(&mut b, b"k1", b"tagA", b"p1");
        encode_message(&mut b, b"", b"tagB", b"p2");
        encode_message(&mut b, b"k3", b"", b"p3");
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
