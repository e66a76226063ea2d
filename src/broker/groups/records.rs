//! What consumer groups write to the log: their internal records and the properties a retried
//! or dead-lettered message carries. Pure: encoding and decoding only.
//!
//! Group state lives in `%SYS%GROUPS` (queue 0 of the coordinating shard's log), one message
//! per record, the last record per key winning on load:
//!
//! ```text
//! settings: kind=1 u8 | group_len u16 | group | max_reconsume_times u32 | consume_timeout_ms u32
//! commit:   kind=2 u8 | group_len u16 | group | topic_len u16 | topic | queue u32 | offset u64
//! progress: kind=3 u8 | level u32 | next_offset u64        (the delay scheduler's cursor)
//! snapshot: kind=4 u8 | id u64      (a snapshot of the whole table follows; see `compact`)
//! ```
//!
//! A message given back by a member (SendBack) is copied with its key, tag, payload and born
//! time, plus the `%`-prefixed properties below (a client's own properties are kept; a client
//! cannot set these: they are replaced).

use bytes::{BufMut, Bytes, BytesMut};

use crate::format::batch::{BatchBuilder, BatchIter, Message};
use crate::format::record::RecordIter;

/// Group settings and committed offsets (queue 0 of the coordinating shard).
pub const GROUPS_LOG: &str = "%SYS%GROUPS";
/// Delayed messages: queue `level - 1` holds the messages of delay level `level`; the
/// scheduler's cursors are records in [`GROUPS_LOG`] of the same shard.
pub const SCHEDULE_LOG: &str = "%SYS%SCHEDULE";

/// Where a retried or dead-lettered message was first read.
pub const PROP_ORIGIN_TOPIC: &str = "%ORIGIN_TOPIC";
pub const PROP_ORIGIN_QUEUE: &str = "%ORIGIN_QUEUE";
pub const PROP_ORIGIN_OFFSET: &str = "%ORIGIN_OFFSET";
/// How many times it has failed.
pub const PROP_RECONSUME: &str = "%RECONSUME";
/// The last error text a member gave.
pub const PROP_ERROR: &str = "%ERROR";
/// A scheduled message: where and when the scheduler delivers it.
pub const PROP_TARGET_TOPIC: &str = "%TARGET_TOPIC";
pub const PROP_TARGET_QUEUE: &str = "%TARGET_QUEUE";
pub const PROP_DELIVER_AT: &str = "%DELIVER_AT";
/// A producer's delayed message with a deliver-at time: when it is finally due. It may wait
/// through several levels (hops) on the way, each ending at or before this time.
pub const PROP_FINAL_AT: &str = "%FINAL_AT";

/// RocketMQ's delay levels, 1-based: level `n` waits `DELAY_LEVELS_MS[n - 1]`.
pub const DELAY_LEVELS_MS: [u64; 18] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000,
    480_000, 540_000, 600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];

/// One record of [`GROUPS_LOG`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRecord {
    Settings {
        group: String,
        max_reconsume_times: u32,
        consume_timeout_ms: u32,
    },
    Commit {
        group: String,
        topic: String,
        queue: u32,
        offset: u64,
    },
    /// The delay scheduler has delivered every message of `level` below `next`.
    Progress { level: u32, next: u64 },
    /// The records after this one restate the whole table as it was here.
    SnapshotBegin { id: u64 },
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

impl GroupRecord {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        match self {
            GroupRecord::Settings {
                group,
                max_reconsume_times,
                consume_timeout_ms,
            } => {
                out.put_u8(1);
                put_str(&mut out, group);
                out.put_u32_le(*max_reconsume_times);
                out.put_u32_le(*consume_timeout_ms);
            }
            GroupRecord::Commit {
                group,
                topic,
                queue,
                offset,
            } => {
                out.put_u8(2);
                put_str(&mut out, group);
                put_str(&mut out, topic);
                out.put_u32_le(*queue);
                out.put_u64_le(*offset);
            }
            GroupRecord::Progress { level, next } => {
                out.put_u8(3);
                out.put_u32_le(*level);
                out.put_u64_le(*next);
            }
            GroupRecord::SnapshotBegin { id } => {
                out.put_u8(4);
                out.put_u64_le(*id);
            }
        }
        out.freeze()
    }

    pub fn decode(mut b: &[u8]) -> Result<GroupRecord, String> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if b.len() < n {
                return Err(format!("needs {n} more bytes, {} left", b.len()));
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Ok(head)
        }
        fn u32_(b: &mut &[u8]) -> Result<u32, String> {
            Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")))
        }
        fn u64_(b: &mut &[u8]) -> Result<u64, String> {
            Ok(u64::from_le_bytes(take(b, 8)?.try_into().expect("8 bytes")))
        }
        fn str_(b: &mut &[u8]) -> Result<String, String> {
            let n = u16::from_le_bytes(take(b, 2)?.try_into().expect("2 bytes"));
            String::from_utf8(take(b, n.into())?.to_vec()).map_err(|e| e.to_string())
        }
        let kind = take(&mut b, 1)?[0];
        let record = match kind {
            1 => GroupRecord::Settings {
                group: str_(&mut b)?,
                max_reconsume_times: u32_(&mut b)?,
                consume_timeout_ms: u32_(&mut b)?,
            },
            2 => GroupRecord::Commit {
                group: str_(&mut b)?,
                topic: str_(&mut b)?,
                queue: u32_(&mut b)?,
                offset: u64_(&mut b)?,
            },
            3 => GroupRecord::Progress {
                level: u32_(&mut b)?,
                next: u64_(&mut b)?,
            },
            4 => GroupRecord::SnapshotBegin { id: u64_(&mut b)? },
            k => return Err(format!("unknown record kind {k}")),
        };
        if !b.is_empty() {
            return Err(format!("{} bytes after the record", b.len()));
        }
        Ok(record)
    }
}

/// A batch of `records`, one message each, and its message count.
pub fn encode_batch(records: &[GroupRecord]) -> (Bytes, u32) {
    let mut out = BytesMut::new();
    let mut batch = BatchBuilder::new(&mut out);
    for r in records {
        batch
            .push(&Message::new(r.encode()))
            .expect("a group record fits a message");
    }
    let count = batch.count();
    (out.freeze(), count)
}

/// One message read back from a queue, with its offset.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub offset: u64,
    pub message: Message,
    pub store_timestamp_ms: u64,
}

/// The messages at offsets `>= from` in `records` (whole stored records, as a read returns).
pub fn stored_messages(records: &Bytes, from: u64) -> Result<Vec<StoredMessage>, String> {
    let mut out = Vec::new();
    for record in RecordIter::new(records) {
        let record = record.map_err(|e| format!("a stored record does not parse: {e}"))?;
        let batch = records.slice_ref(record.body);
        for (i, m) in BatchIter::new(&batch).enumerate() {
            let m = m.map_err(|e| format!("a stored batch does not parse: {e}"))?;
            let offset = record.header.base_queue_offset + i as u64;
            if offset >= from {
                out.push(StoredMessage {
                    offset,
                    message: m.to_message_in(&batch),
                    store_timestamp_ms: record.header.store_timestamp_ms,
                });
            }
        }
    }
    Ok(out)
}

/// The value of property `name`, as text.
pub fn property<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.properties
        .iter()
        .find(|(k, _)| k.as_ref() == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The value of property `name`, as a number.
pub fn number_property(m: &Message, name: &str) -> Option<u64> {
    property(m, name).and_then(|v| v.parse().ok())
}

/// `m` with the broker's properties set to `props` (any it had are replaced).
pub fn with_broker_properties(m: &Message, props: &[(&str, String)]) -> Message {
    let mut out = m.clone();
    out.properties
        .retain(|(k, _)| !props.iter().any(|(name, _)| k.as_ref() == name.as_bytes()));
    for (name, value) in props {
        out.properties.push((
            Bytes::copy_from_slice(name.as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
        ));
    }
    out
}

/// `m` without the scheduler's delivery properties (what the target queue stores).
pub fn without_schedule_properties(m: &Message) -> Message {
    let mut out = m.clone();
    out.properties.retain(|(k, _)| {
        ![
            PROP_TARGET_TOPIC,
            PROP_TARGET_QUEUE,
            PROP_DELIVER_AT,
            PROP_FINAL_AT,
        ]
        .iter()
        .any(|name| k.as_ref() == name.as_bytes())
    });
    out
}

/// One message as a batch.
pub fn single_batch(m: &Message) -> Result<Bytes, String> {
    let mut out = BytesMut::new();
    BatchBuilder::new(&mut out)
        .push(m)
        .map_err(|e| e.to_string())?;
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_round_trips_and_garbage_is_an_error() {
        let records = [
            GroupRecord::Settings {
                group: "g".into(),
                max_reconsume_times: 16,
                consume_timeout_ms: 900_000,
            },
            GroupRecord::Commit {
                group: "g".into(),
                topic: "orders".into(),
                queue: 7,
                offset: u64::MAX - 1,
            },
            GroupRecord::Progress { level: 18, next: 5 },
            GroupRecord::SnapshotBegin { id: 42 },
        ];
        for r in &records {
            let bytes = r.encode();
            assert_eq!(&GroupRecord::decode(&bytes).unwrap(), r);
            for cut in 0..bytes.len() {
                assert!(
                    GroupRecord::decode(&bytes[..cut]).is_err(),
                    "{r:?} cut at {cut}"
                );
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(GroupRecord::decode(&longer).is_err());
        }
        assert!(GroupRecord::decode(&[9]).is_err());
    }

    #[test]
    fn broker_properties_replace_what_a_client_set() {
        let m = Message::new("x")
            .with_property("mine", "1")
            .with_property(PROP_RECONSUME, "99");
        let out = with_broker_properties(&m, &[(PROP_RECONSUME, "2".into())]);
        assert_eq!(number_property(&out, PROP_RECONSUME), Some(2));
        assert_eq!(property(&out, "mine"), Some("1"));
        assert_eq!(out.properties.len(), 2);
    }
}
