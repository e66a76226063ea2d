//! The message batch format: the body of a Produce request, kept by storage exactly as sent (the
//! body of a CommitLog record, see [`super::record`]) and returned by Fetch.
//!
//! A batch is one or more messages back to back, nothing before or after. One message, all
//! integers little-endian:
//!
//! ```text
//!  0          4                      12          14
//!  +----------+----------------------+-----------+
//!  | len u32  | born_timestamp_ms u64| flags u16 |      len = bytes after the len field
//!  +----------+----------------------+-----------+
//!  +-------------+---------+-------------+---------+
//!  | key_len u16 | key     | tag_len u16 | tag     |    a 0 length means "none"
//!  +-------------+---------+-------------+---------+
//!  +---------------+-----------------------------------------------------+
//!  | props_len u16 | props: (k_len u16, k, v_len u16, v) repeated        |
//!  +---------------+-----------------------------------------------------+
//!  +-----------------+---------+
//!  | payload_len u32 | payload |
//!  +-----------------+---------+
//! ```
//!
//! So `len = 20 + key_len + tag_len + props_len + payload_len` exactly, and the smallest
//! message is 24 bytes. `flags` are reserved for later features (transactions, compression)
//! and are 0 today; the codec carries them without interpreting them. An empty key or tag is
//! the same as none.
//!
//! # Contract
//! - [`validate_batch`] is what a broker runs on a Produce body before storing it: it checks
//!   every length against the bytes that remain, allocates nothing, and returns the count.
//! - [`BatchIter`] reads a batch without copying: views borrow the batch's bytes.
//! - Bad input is a [`BatchError`] naming the byte offset in the batch, never a panic.
//! - This is the only parser and the only encoder of the format: storage's indexes read keys
//!   and tags with [`BatchIter`] too, the client and the bench build batches with
//!   [`BatchBuilder`].

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of a message after its `len` field when key, tag, props and payload are all empty.
const FIXED_BYTES_AFTER_LEN: usize = 8 + 2 + 2 + 2 + 2 + 4;

/// Bytes of the smallest possible message, including its `len` field.
pub const MIN_MESSAGE_BYTES: usize = 4 + FIXED_BYTES_AFTER_LEN;

// The diagram above: 20 fixed bytes after `len`, so the smallest message is 24 bytes.
const _: () = assert!(FIXED_BYTES_AFTER_LEN == 20);
const _: () = assert!(MIN_MESSAGE_BYTES == 24);

/// What is wrong with a batch. Offsets are from the start of the batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// A batch holds at least one message.
    #[error("empty batch")]
    Empty,

    /// A message (or its `len` field) runs past the end of the batch.
    #[error("message at offset {offset} needs {need} bytes, {have} left in the batch")]
    Truncated {
        offset: usize,
        need: usize,
        have: usize,
    },

    /// A message's `len` is smaller than its fixed fields.
    #[error("message at offset {offset} has len {len}, below the minimum of {min}")]
    TooShort { offset: usize, len: u32, min: usize },

    /// A field's length runs past the end of its message.
    #[error("message at offset {offset}: {field} needs {need} bytes, {have} left in the message")]
    FieldOverrun {
        offset: usize,
        field: &'static str,
        need: usize,
        have: usize,
    },

    /// A message's parts do not add up to its `len`.
    #[error("message at offset {offset} declares len {declared}, its fields use {used}")]
    LengthMismatch {
        offset: usize,
        declared: u32,
        used: usize,
    },

    /// More messages than the caller allows.
    #[error("batch has more than {max} messages")]
    TooManyMessages { max: u32 },

    /// Building: a field is longer than its length prefix can say.
    #[error("{field} of {len} bytes exceeds the format's maximum of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// A message to send (or an owned copy of a received one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// For lookups by key; `None` (or empty) for no key.
    pub key: Option<Bytes>,
    /// For filtering; `None` (or empty) for no tag.
    pub tag: Option<Bytes>,
    /// Small key/value pairs; order is kept.
    pub properties: Vec<(Bytes, Bytes)>,
    pub payload: Bytes,
    /// When the producer created the message, in ms since the Unix epoch.
    pub born_timestamp_ms: u64,
    /// Reserved, 0 today; see the module doc.
    pub flags: u16,
}

impl Message {
    /// A message with only a payload.
    pub fn new(payload: impl Into<Bytes>) -> Message {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Message {
        self.key = Some(key.into());
        self
    }

    pub fn with_tag(mut self, tag: impl Into<Bytes>) -> Message {
        self.tag = Some(tag.into());
        self
    }

    pub fn with_property(mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Message {
        self.properties.push((key.into(), value.into()));
        self
    }

    pub fn with_born_timestamp_ms(mut self, born_timestamp_ms: u64) -> Message {
        self.born_timestamp_ms = born_timestamp_ms;
        self
    }

    fn props_len(&self) -> usize {
        self.properties
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum()
    }

    /// Bytes this message takes in a batch, including its `len` field.
    pub fn encoded_len(&self) -> usize {
        let key = self.key.as_ref().map_or(0, Bytes::len);
        let tag = self.tag.as_ref().map_or(0, Bytes::len);
        4 + FIXED_BYTES_AFTER_LEN + key + tag + self.props_len() + self.payload.len()
    }

    /// Checks every length prefix can hold its field.
    fn check_lengths(&self) -> Result<(), BatchError> {
        fn fits(field: &'static str, len: usize, max: usize) -> Result<(), BatchError> {
            if len > max {
                return Err(BatchError::FieldTooLong { field, len, max });
            }
            Ok(())
        }
        let u16_max = u16::MAX as usize;
        fits("key", self.key.as_ref().map_or(0, Bytes::len), u16_max)?;
        fits("tag", self.tag.as_ref().map_or(0, Bytes::len), u16_max)?;
        for (k, v) in &self.properties {
            fits("property key", k.len(), u16_max)?;
            fits("property value", v.len(), u16_max)?;
        }
        fits("properties", self.props_len(), u16_max)?;
        fits("message", self.encoded_len() - 4, u32::MAX as usize)
    }
}

/// Appends messages to a caller's buffer in the batch format.
#[derive(Debug)]
pub struct BatchBuilder<'a> {
    out: &'a mut BytesMut,
    start: usize,
    count: u32,
}

impl<'a> BatchBuilder<'a> {
    /// Starts a batch at the end of `out` (whatever `out` already holds is left alone).
    pub fn new(out: &'a mut BytesMut) -> BatchBuilder<'a> {
        let start = out.len();
        BatchBuilder {
            out,
            start,
            count: 0,
        }
    }

    /// Appends one message. On error nothing is written.
    pub fn push(&mut self, message: &Message) -> Result<(), BatchError> {
        message.check_lengths()?;
        let key: &[u8] = message.key.as_deref().unwrap_or_default();
        let tag: &[u8] = message.tag.as_deref().unwrap_or_default();
        let out = &mut *self.out;
        out.reserve(message.encoded_len());
        // Casts are safe: check_lengths proved every length fits its prefix.
        out.put_u32_le((message.encoded_len() - 4) as u32);
        out.put_u64_le(message.born_timestamp_ms);
        out.put_u16_le(message.flags);
        out.put_u16_le(key.len() as u16);
        out.put_slice(key);
        out.put_u16_le(tag.len() as u16);
        out.put_slice(tag);
        out.put_u16_le(message.props_len() as u16);
        for (k, v) in &message.properties {
            out.put_u16_le(k.len() as u16);
            out.put_slice(k);
            out.put_u16_le(v.len() as u16);
            out.put_slice(v);
        }
        out.put_u32_le(message.payload.len() as u32);
        out.put_slice(&message.payload);
        self.count += 1;
        Ok(())
    }

    /// Messages appended so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes appended so far.
    pub fn len(&self) -> usize {
        self.out.len() - self.start
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A message read in place from a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageView<'a> {
    /// Offset of the message (its `len` field) in the batch.
    pub offset: usize,
    pub born_timestamp_ms: u64,
    pub flags: u16,
    pub key: Option<&'a [u8]>,
    pub tag: Option<&'a [u8]>,
    /// The raw, already validated properties section; see [`MessageView::properties`].
    pub properties_raw: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> MessageView<'a> {
    /// The key/value pairs, in order.
    pub fn properties(&self) -> PropertyIter<'a> {
        PropertyIter {
            rest: self.properties_raw,
        }
    }

    /// An owned copy.
    pub fn to_message(&self) -> Message {
        self.to_message_in(&Bytes::new())
    }

    /// An owned message sharing `batch`'s memory when the view was read from `batch` (no copy);
    /// falls back to copying for slices that are not inside `batch`.
    pub fn to_message_in(&self, batch: &Bytes) -> Message {
        let share = |s: &[u8]| {
            let inside = batch.as_ptr_range();
            let s_range = s.as_ptr_range();
            if !s.is_empty() && inside.start <= s_range.start && s_range.end <= inside.end {
                batch.slice_ref(s)
            } else {
                Bytes::copy_from_slice(s)
            }
        };
        Message {
            key: self.key.map(share),
            tag: self.tag.map(share),
            properties: self
                .properties()
                .map(|(k, v)| (share(k), share(v)))
                .collect(),
            payload: share(self.payload),
            born_timestamp_ms: self.born_timestamp_ms,
            flags: self.flags,
        }
    }
}

/// Iterator over a message's properties. Built only from a validated section, so it cannot
/// fail; it stops early rather than panic should it ever see a malformed one.
#[derive(Debug, Clone)]
pub struct PropertyIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PropertyIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let mut r = Reader {
            buf: self.rest,
            pos: 0,
            offset: 0,
        };
        let pair = (|| {
            let k_len = r.u16("property key length")? as usize;
            let k = r.bytes("property key", k_len)?;
            let v_len = r.u16("property value length")? as usize;
            let v = r.bytes("property value", v_len)?;
            Ok::<_, BatchError>((k, v))
        })();
        match pair {
            Ok(pair) => {
                self.rest = &self.rest[r.pos..];
                Some(pair)
            }
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

/// A bounds-checked cursor over one message (after its `len` field).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of the message in the batch, for errors.
    offset: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], BatchError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(BatchError::FieldOverrun {
                offset: self.offset,
                field,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BatchError> {
        let s = self.bytes(field, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, BatchError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, BatchError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, BatchError> {
        self.array(field).map(u64::from_le_bytes)
    }
}

fn non_empty(s: &[u8]) -> Option<&[u8]> {
    (!s.is_empty()).then_some(s)
}

/// Parses the message at `offset`; returns it and the offset just past it.
fn parse_message(batch: &[u8], offset: usize) -> Result<(MessageView<'_>, usize), BatchError> {
    let have = batch.len() - offset;
    if have < 4 {
        return Err(BatchError::Truncated {
            offset,
            need: 4,
            have,
        });
    }
    let rest = &batch[offset..];
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if (len as usize) < FIXED_BYTES_AFTER_LEN {
        return Err(BatchError::TooShort {
            offset,
            len,
            min: FIXED_BYTES_AFTER_LEN,
        });
    }
    // u32 + 4 cannot overflow usize on the 64-bit targets we build for; saturate anyway.
    let total = (len as usize).saturating_add(4);
    if total > have {
        return Err(BatchError::Truncated {
            offset,
            need: total,
            have,
        });
    }
    let mut r = Reader {
        buf: &rest[4..total],
        pos: 0,
        offset,
    };
    let born_timestamp_ms = r.u64("born_timestamp_ms")?;
    let flags = r.u16("flags")?;
    let key_len = r.u16("key length")? as usize;
    let key = r.bytes("key", key_len)?;
    let tag_len = r.u16("tag length")? as usize;
    let tag = r.bytes("tag", tag_len)?;
    let props_len = r.u16("properties length")? as usize;
    let properties_raw = r.bytes("properties", props_len)?;
    validate_properties(properties_raw, offset)?;
    let payload_len = r.u32("payload length")? as usize;
    let payload = r.bytes("payload", payload_len)?;
    if r.pos != r.buf.len() {
        return Err(BatchError::LengthMismatch {
            offset,
            declared: len,
            used: r.pos,
        });
    }
    let view = MessageView {
        offset,
        born_timestamp_ms,
        flags,
        key: non_empty(key),
        tag: non_empty(tag),
        properties_raw,
        payload,
    };
    Ok((view, offset + total))
}

fn validate_properties(section: &[u8], offset: usize) -> Result<(), BatchError> {
    let mut r = Reader {
        buf: section,
        pos: 0,
        offset,
    };
    while r.pos < section.len() {
        let k_len = r.u16("property key length")? as usize;
        r.bytes("property key", k_len)?;
        let v_len = r.u16("property value length")? as usize;
        r.bytes("property value", v_len)?;
    }
    Ok(())
}

/// Checks a whole batch and returns its message count. Allocates nothing. Fails on an empty
/// batch, on any length that overruns what remains, on a message whose fields do not add up to
/// its `len`, and on more than `max_messages` messages.
pub fn validate_batch(body: &[u8], max_messages: u32) -> Result<u32, BatchError> {
    if body.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut count: u32 = 0;
    for message in BatchIter::new(body) {
        message?;
        if count == max_messages {
            return Err(BatchError::TooManyMessages { max: max_messages });
        }
        count += 1;
    }
    Ok(count)
}

/// Zero-copy iterator over the messages of a batch. Yields an error once, at the first bad
/// message, then ends.
#[derive(Debug, Clone)]
pub struct BatchIter<'a> {
    batch: &'a [u8],
    pos: usize,
}

impl<'a> BatchIter<'a> {
    pub fn new(batch: &'a [u8]) -> BatchIter<'a> {
        BatchIter { batch, pos: 0 }
    }
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<MessageView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.batch.len() {
            return None;
        }
        match parse_message(self.batch, self.pos) {
            Ok((view, next)) => {
                self.pos = next;
                Some(Ok(view))
            }
            Err(e) => {
                self.pos = self.batch.len();
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Message {
        Message::new(&b"hello payload"[..])
            .with_key(&b"order-17"[..])
            .with_tag(&b"TagA"[..])
            .with_property(&b"trace"[..], &b"abc"[..])
            .with_property(&b"empty"[..], &b""[..])
            .with_born_timestamp_ms(1_700_000_000_123)
    }

    fn batch(messages: &[Message]) -> BytesMut {
        let mut out = BytesMut::new();
        let mut b = BatchBuilder::new(&mut out);
        for m in messages {
            b.push(m).unwrap();
        }
        out
    }

    #[test]
    fn layout_matches_the_diagram() {
        let m = Message::new(&b"P"[..])
            .with_key(&b"K"[..])
            .with_born_timestamp_ms(5);
        let b = batch(&[m]);
        let mut want = Vec::new();
        want.extend_from_slice(&22u32.to_le_bytes()); // 20 fixed + key 1 + payload 1
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(&0u16.to_le_bytes()); // flags
        want.extend_from_slice(&1u16.to_le_bytes());
        want.extend_from_slice(b"K");
        want.extend_from_slice(&0u16.to_le_bytes()); // tag
        want.extend_from_slice(&0u16.to_le_bytes()); // props
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(b"P");
        assert_eq!(&b[..], &want[..]);
    }

    #[test]
    fn builder_and_iterator_round_trip() {
        let messages = vec![
            full(),
            Message::new(Bytes::new()),
            full().with_tag(&b"B"[..]),
        ];
        let mut out = BytesMut::from(&b"prefix"[..]);
        let mut builder = BatchBuilder::new(&mut out);
        assert!(builder.is_empty());
        for m in &messages {
            builder.push(m).unwrap();
        }
        assert_eq!(builder.count(), 3);
        let len = builder.len();
        assert_eq!(
            len,
            messages.iter().map(Message::encoded_len).sum::<usize>()
        );
        let body = out.split_off(6).freeze();
        assert_eq!(body.len(), len);
        assert_eq!(validate_batch(&body, 10), Ok(3));
        let got: Vec<Message> = BatchIter::new(&body)
            .map(|v| v.unwrap().to_message_in(&body))
            .collect();
        assert_eq!(got, messages);
    }

    #[test]
    fn views_borrow_the_batch() {
        let body = batch(&[full()]).freeze();
        let view = BatchIter::new(&body).next().unwrap().unwrap();
        let range = body.as_ptr_range();
        assert!(range.contains(&view.payload.as_ptr()));
        let props: Vec<_> = view.properties().collect();
        assert_eq!(
            props,
            [(&b"trace"[..], &b"abc"[..]), (&b"empty"[..], &b""[..])]
        );
        let owned = view.to_message_in(&body);
        assert!(range.contains(&owned.payload.as_ptr()));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let body = batch(&[full(), full()]);
        let one = full().encoded_len();
        for cut in 0..body.len() {
            let r = validate_batch(&body[..cut], 10);
            if cut == one {
                assert_eq!(r, Ok(1));
            } else {
                assert!(r.is_err(), "cut at {cut} accepted");
            }
        }
    }

    #[test]
    fn overlong_len_is_truncated_with_offsets() {
        let mut body = batch(&[full(), full()]);
        let second = full().encoded_len();
        body[second..second + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            validate_batch(&body, 10),
            Err(BatchError::Truncated {
                offset: second,
                need: 1004,
                have: second
            })
        );
    }

    #[test]
    fn fields_must_add_up_to_len() {
        // Grow len by 2 and append 2 bytes: the fields no longer account for the message.
        let mut body = batch(&[Message::new(&b"x"[..])]);
        let len = u32::from_le_bytes(body[0..4].try_into().unwrap());
        body[0..4].copy_from_slice(&(len + 2).to_le_bytes());
        body.extend_from_slice(&[0, 0]);
        assert_eq!(
            validate_batch(&body, 10),
            Err(BatchError::LengthMismatch {
                offset: 0,
                declared: len + 2,
                used: len as usize
            })
        );
    }

    #[test]
    fn a_key_length_past_the_message_is_a_field_overrun() {
        let mut body = batch(&[Message::new(&b"x"[..])]);
        body[14..16].copy_from_slice(&500u16.to_le_bytes());
        assert!(matches!(
            validate_batch(&body, 10),
            Err(BatchError::FieldOverrun {
                offset: 0,
                field: "key",
                need: 500,
                ..
            })
        ));
    }

    #[test]
    fn a_bad_property_pair_is_rejected() {
        let mut body = batch(&[Message::new(&b"x"[..]).with_property(&b"k"[..], &b"v"[..])]);
        // props: k_len at 20, 'k' at 22, v_len at 23; claim the value is 9 bytes long.
        body[23..25].copy_from_slice(&9u16.to_le_bytes());
        assert!(matches!(
            validate_batch(&body, 10),
            Err(BatchError::FieldOverrun {
                field: "property value",
                ..
            })
        ));
    }

    #[test]
    fn tiny_len_and_empty_batch_and_count_limit() {
        assert_eq!(validate_batch(&[], 10), Err(BatchError::Empty));
        let mut body = batch(&[Message::new(&b"x"[..])]);
        body[0..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            validate_batch(&body, 10),
            Err(BatchError::TooShort { len: 3, .. })
        ));
        let body = batch(&[full(), full(), full()]);
        assert_eq!(
            validate_batch(&body, 2),
            Err(BatchError::TooManyMessages { max: 2 })
        );
        assert_eq!(validate_batch(&body, 3), Ok(3));
    }

    #[test]
    fn builder_rejects_fields_too_long_for_their_prefix_and_writes_nothing() {
        let mut out = BytesMut::new();
        let mut b = BatchBuilder::new(&mut out);
        let m = Message::new(Bytes::new()).with_key(vec![0u8; 70_000]);
        assert!(matches!(
            b.push(&m),
            Err(BatchError::FieldTooLong { field: "key", .. })
        ));
        let m = Message::new(Bytes::new()).with_property(vec![1u8; 40_000], vec![2u8; 40_000]);
        assert!(matches!(
            b.push(&m),
            Err(BatchError::FieldTooLong {
                field: "properties",
                ..
            })
        ));
        assert_eq!((b.count(), b.len()), (0, 0));
    }

    #[test]
    fn iterator_stops_after_the_first_error() {
        let mut body = batch(&[full()]);
        body.extend_from_slice(&[1, 2, 3]);
        let mut it = BatchIter::new(&body);
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }
}
