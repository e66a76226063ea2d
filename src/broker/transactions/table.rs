//! The transactions view of one shard: which half messages are open, which ended and how,
//! and which are due for a check-back. Pure: built by applying the records of `%SYS%TXN` in
//! order (see the module doc of `transactions` for the records), so a restart or a promotion
//! rebuilds it from the log.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::format::batch::Message;
use crate::protocol::TransactionState;

/// The log of half messages and their op records: queue 0 of each shard's CommitLog.
pub const TXN_LOG: &str = "%SYS%TXN";

/// Properties of a half message (on each of its messages; the commit's copy drops them).
pub const PROP_TXN_ID: &str = "%TXN_ID";
pub const PROP_TXN_GROUP: &str = "%TXN_GROUP";
pub const PROP_TXN_TOPIC: &str = "%TXN_TOPIC";
pub const PROP_TXN_QUEUE: &str = "%TXN_QUEUE";
/// Messages in the half's batch.
pub const PROP_TXN_COUNT: &str = "%TXN_COUNT";
/// The real topic's queue count when the half was stored: a promoted slave that never copied
/// the topic (created just before the failover) creates it from this.
pub const PROP_TXN_QUEUES: &str = "%TXN_QUEUES";
/// On every record of the log: the lowest offset a load must start from (the oldest half
/// still open, or whose end is still remembered, when the record was written; or the record
/// itself).
pub const PROP_TXN_FLOOR: &str = "%TXN_FLOOR";
/// An op record: `commit`, `rollback`, `checked` or `discard`.
pub const PROP_TXN_OP: &str = "%TXN_OP";
/// The half message(s) an op is about: an offset (`checked`: a comma-separated list).
pub const PROP_TXN_HALF: &str = "%TXN_HALF";
/// A commit: the real queue's end offset just before the copy was appended (the copy is at
/// or after it).
pub const PROP_TXN_COPY_FROM: &str = "%TXN_COPY_FROM";
/// On a commit's copy in the real queue: the half message it came from.
pub const PROP_TXN_COPY_OF: &str = "%TXN_COPY_OF";
/// On a discarded half's copy: how many check-backs went unanswered.
pub const PROP_TXN_CHECKS: &str = "%TXN_CHECKS";

/// Ended transactions remembered for duplicate ends (by offset and id), per shard.
pub const MAX_REMEMBERED_ENDS: usize = 65_536;
/// Open half messages one shard holds at most.
pub const MAX_OPEN: usize = 100_000;

/// An op record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The half at `half` is committed; its copy goes to its real queue at `copy_from` or later.
    Commit {
        half: u64,
        copy_from: u64,
    },
    Rollback {
        half: u64,
    },
    /// A check-back was issued for each of these halves.
    Checked {
        halves: Vec<u64>,
    },
    /// Rolled back after the most check-backs (and copied to the discarded topic).
    Discard {
        half: u64,
    },
}

impl Op {
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let (op, half) = match self {
            Op::Commit { half, .. } => ("commit", half.to_string()),
            Op::Rollback { half } => ("rollback", half.to_string()),
            Op::Checked { halves } => (
                "checked",
                halves
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Op::Discard { half } => ("discard", half.to_string()),
        };
        let mut props = vec![(PROP_TXN_OP, op.to_string()), (PROP_TXN_HALF, half)];
        if let Op::Commit { copy_from, .. } = self {
            props.push((PROP_TXN_COPY_FROM, copy_from.to_string()));
        }
        props
    }

    /// The op a message of the log holds; `Ok(None)` for a half message.
    pub fn from_message(m: &Message) -> Result<Option<Op>, String> {
        let Some(op) = prop(m, PROP_TXN_OP) else {
            return Ok(None);
        };
        let half = prop(m, PROP_TXN_HALF).ok_or("an op without %TXN_HALF")?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{v:?} is not an offset"))
        };
        Ok(Some(match op {
            "commit" => Op::Commit {
                half: number(half)?,
                copy_from: number(
                    prop(m, PROP_TXN_COPY_FROM).ok_or("a commit without %TXN_COPY_FROM")?,
                )?,
            },
            "rollback" => Op::Rollback {
                half: number(half)?,
            },
            "discard" => Op::Discard {
                half: number(half)?,
            },
            "checked" => Op::Checked {
                halves: half.split(',').map(number).collect::<Result<Vec<_>, _>>()?,
            },
            other => return Err(format!("unknown op {other:?}")),
        }))
    }
}

fn prop<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.properties
        .iter()
        .find(|(k, _)| k.as_ref() == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// A half message's identity and destination, as its first message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfInfo {
    pub id: String,
    pub group: String,
    pub topic: String,
    pub queue: u32,
    pub count: u32,
    /// The real topic's queue count (0: not recorded).
    pub queues: u32,
}

impl HalfInfo {
    pub fn properties(&self, floor: u64) -> Vec<(&'static str, String)> {
        vec![
            (PROP_TXN_ID, self.id.clone()),
            (PROP_TXN_GROUP, self.group.clone()),
            (PROP_TXN_TOPIC, self.topic.clone()),
            (PROP_TXN_QUEUE, self.queue.to_string()),
            (PROP_TXN_COUNT, self.count.to_string()),
            (PROP_TXN_QUEUES, self.queues.to_string()),
            (PROP_TXN_FLOOR, floor.to_string()),
        ]
    }

    pub fn from_message(m: &Message) -> Result<HalfInfo, String> {
        let get = |name| prop(m, name).ok_or_else(|| format!("a half message without {name}"));
        let number = |name| {
            get(name)?
                .parse::<u32>()
                .map_err(|_| format!("{name} is not a number"))
        };
        Ok(HalfInfo {
            id: get(PROP_TXN_ID)?.to_string(),
            group: get(PROP_TXN_GROUP)?.to_string(),
            topic: get(PROP_TXN_TOPIC)?.to_string(),
            queue: number(PROP_TXN_QUEUE)?,
            count: number(PROP_TXN_COUNT)?.max(1),
            queues: number(PROP_TXN_QUEUES).unwrap_or(0),
        })
    }
}

/// The floor a record carries.
pub fn floor_of(m: &Message) -> Option<u64> {
    prop(m, PROP_TXN_FLOOR).and_then(|v| v.parse().ok())
}

/// `m` as its real queue stores it after a commit: without the half's properties, with the
/// half it came from.
pub fn committed_copy(m: &Message, half: u64) -> Message {
    let mut out = m.clone();
    out.properties.retain(|(k, _)| !k.starts_with(b"%TXN_"));
    out.properties.push((
        bytes::Bytes::from_static(PROP_TXN_COPY_OF.as_bytes()),
        bytes::Bytes::from(half.to_string()),
    ));
    out
}

/// Whether `m` is the commit copy of the half at `half`.
pub fn is_copy_of(m: &Message, half: u64) -> bool {
    prop(m, PROP_TXN_COPY_OF) == Some(half.to_string().as_str())
}

/// `m` as a check-back hands it to the producer: without the broker's properties.
pub fn as_checked(m: &Message) -> Message {
    let mut out = m.clone();
    out.properties.retain(|(k, _)| !k.starts_with(b"%TXN_"));
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenHalf {
    pub info: HalfInfo,
    /// When the broker stored it (Unix ms).
    pub stored_ms: u64,
    pub checks: u32,
    pub next_check_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub state: TransactionState,
    /// A commit's offset in the real queue, when this broker process made the copy.
    pub offset: Option<u64>,
}

/// A committed half whose copy may be missing: the log's last op was its commit, and a crash
/// (or a failed append) can come between the commit record and the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnconfirmedCopy {
    pub half: u64,
    pub topic: String,
    pub queue: u32,
    /// The topic's queue count, as the half recorded it.
    pub queues: u32,
    pub copy_from: u64,
}

/// What an end finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Open(OpenHalf),
    Ended(String, Ended),
    /// Nothing at this offset: never there, or forgotten (below the load floor or past the
    /// remembered ends).
    Unknown,
}

#[derive(Debug, Default)]
pub struct TxnTable {
    open: BTreeMap<u64, OpenHalf>,
    /// The ended transactions remembered, oldest first in `ended_order`.
    ended: BTreeMap<u64, (String, Ended)>,
    ended_order: VecDeque<u64>,
    /// Transaction id -> half offset, for open and remembered halves.
    by_id: HashMap<String, u64>,
    /// `(next_check_ms, half)` of every open half.
    due: BTreeSet<(u64, u64)>,
    unconfirmed_copy: Option<UnconfirmedCopy>,
}

impl TxnTable {
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// The lowest open half, if any.
    pub fn oldest_open(&self) -> Option<u64> {
        self.open.keys().next().copied()
    }

    /// The lowest half whose end is remembered, if any: a load must start at or below it, or
    /// a restart forgets ends it had remembered (a retried end would be refused).
    pub fn oldest_remembered_end(&self) -> Option<u64> {
        self.ended.keys().next().copied()
    }

    pub fn by_id(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    pub fn lookup(&self, half: u64) -> Lookup {
        if let Some(h) = self.open.get(&half) {
            return Lookup::Open(h.clone());
        }
        match self.ended.get(&half) {
            Some((id, e)) => Lookup::Ended(id.clone(), *e),
            None => Lookup::Unknown,
        }
    }

    pub fn open_halves(&self) -> impl Iterator<Item = (&u64, &OpenHalf)> {
        self.open.iter()
    }

    /// Open halves whose next check is due at `now_ms`, oldest due first, at most `limit`.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<(u64, OpenHalf)> {
        self.due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .filter_map(|(_, half)| self.open.get(half).map(|h| (*half, h.clone())))
            .collect()
    }

    pub fn unconfirmed_copy(&self) -> Option<&UnconfirmedCopy> {
        self.unconfirmed_copy.as_ref()
    }

    /// The first message of a half (`offset`, stored at `stored_ms`); the batch's other
    /// messages carry the same id and are skipped.
    pub fn apply_half(&mut self, offset: u64, info: HalfInfo, stored_ms: u64, timeout_ms: u64) {
        self.unconfirmed_copy = None;
        if let Some(first) = self.by_id.get(&info.id) {
            if *first < offset {
                return; // a later message of the same half, or a duplicate id (ignored)
            }
        }
        self.by_id.insert(info.id.clone(), offset);
        let next_check_ms = stored_ms + timeout_ms;
        self.due.insert((next_check_ms, offset));
        self.open.insert(
            offset,
            OpenHalf {
                info,
                stored_ms,
                checks: 0,
                next_check_ms,
            },
        );
    }

    /// An op record, written at `at_ms`; an op about a half this table does not hold (below
    /// the floor it loaded from) is ignored.
    pub fn apply_op(&mut self, op: &Op, at_ms: u64, interval_ms: u64) {
        self.unconfirmed_copy = None;
        match op {
            Op::Commit { half, copy_from } => {
                if let Some(h) = self.end(*half, TransactionState::Committed) {
                    self.unconfirmed_copy = Some(UnconfirmedCopy {
                        half: *half,
                        topic: h.info.topic,
                        queue: h.info.queue,
                        queues: h.info.queues,
                        copy_from: *copy_from,
                    });
                }
            }
            Op::Rollback { half } | Op::Discard { half } => {
                self.end(*half, TransactionState::RolledBack);
            }
            Op::Checked { halves } => {
                for half in halves {
                    if let Some(h) = self.open.get_mut(half) {
                        self.due.remove(&(h.next_check_ms, *half));
                        h.checks += 1;
                        h.next_check_ms = at_ms + interval_ms;
                        self.due.insert((h.next_check_ms, *half));
                    }
                }
            }
        }
    }

    /// Records the copy's offset of a commit this process made (answers for duplicates).
    pub fn set_committed_offset(&mut self, half: u64, offset: u64) {
        if let Some((_, e)) = self.ended.get_mut(&half) {
            e.offset = Some(offset);
        }
    }

    fn end(&mut self, half: u64, state: TransactionState) -> Option<OpenHalf> {
        let h = self.open.remove(&half)?;
        self.due.remove(&(h.next_check_ms, half));
        self.ended.insert(
            half,
            (
                h.info.id.clone(),
                Ended {
                    state,
                    offset: None,
                },
            ),
        );
        self.ended_order.push_back(half);
        while self.ended_order.len() > MAX_REMEMBERED_ENDS {
            if let Some(old) = self.ended_order.pop_front() {
                if let Some((id, _)) = self.ended.remove(&old) {
                    self.by_id.remove(&id);
                }
            }
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> HalfInfo {
        HalfInfo {
            id: id.into(),
            group: "g".into(),
            topic: "t".into(),
            queue: 1,
            count: 1,
            queues: 2,
        }
    }

    #[test]
    fn ops_round_trip_through_message_properties() {
        for op in [
            Op::Commit {
                half: 7,
                copy_from: 99,
            },
            Op::Rollback { half: 3 },
            Op::Discard { half: 0 },
            Op::Checked {
                halves: vec![1, 5, 9],
            },
        ] {
            let mut m = Message::new("");
            for (k, v) in op.properties() {
                m = m.with_property(k, v);
            }
            assert_eq!(Op::from_message(&m).unwrap(), Some(op));
        }
        let half = info("x")
            .properties(4)
            .into_iter()
            .fold(Message::new("p"), |m, (k, v)| m.with_property(k, v));
        assert_eq!(Op::from_message(&half).unwrap(), None);
        assert_eq!(HalfInfo::from_message(&half).unwrap(), info("x"));
        assert_eq!(floor_of(&half), Some(4));
        let bad = Message::new("").with_property(PROP_TXN_OP, "commit");
        assert!(Op::from_message(&bad).is_err());
    }

    #[test]
    fn a_half_is_open_until_its_end_and_checks_move_its_due_time() {
        let mut t = TxnTable::default();
        t.apply_half(10, info("a"), 1_000, 6_000);
        assert!(t.due(6_999, 10).is_empty());
        assert_eq!(t.due(7_000, 10).len(), 1);
        t.apply_op(&Op::Checked { halves: vec![10] }, 7_000, 6_000);
        assert!(t.due(12_999, 10).is_empty());
        assert!(matches!(t.lookup(10), Lookup::Open(h) if h.checks == 1));
        t.apply_op(
            &Op::Commit {
                half: 10,
                copy_from: 4,
            },
            8_000,
            6_000,
        );
        assert!(
            matches!(t.lookup(10), Lookup::Ended(id, e) if id == "a" && e.state == TransactionState::Committed)
        );
        assert!(t.due(u64::MAX, 10).is_empty());
        assert_eq!(t.unconfirmed_copy().map(|u| u.copy_from), Some(4));
        // Any later record proves the copy was appended before it.
        t.apply_half(11, info("b"), 9_000, 6_000);
        assert_eq!(t.unconfirmed_copy(), None);
        t.apply_op(&Op::Rollback { half: 11 }, 9_500, 6_000);
        assert!(
            matches!(t.lookup(11), Lookup::Ended(_, e) if e.state == TransactionState::RolledBack)
        );
        assert_eq!(t.unconfirmed_copy(), None, "a rollback needs no copy");
        // A second end of an ended half changes nothing.
        t.apply_op(
            &Op::Commit {
                half: 11,
                copy_from: 0,
            },
            9_600,
            6_000,
        );
        assert!(
            matches!(t.lookup(11), Lookup::Ended(_, e) if e.state == TransactionState::RolledBack)
        );
        assert_eq!(t.lookup(12), Lookup::Unknown);
    }

    #[test]
    fn the_later_messages_of_a_half_batch_do_not_open_another_half() {
        let mut t = TxnTable::default();
        let mut i = info("batch");
        i.count = 3;
        for offset in 20..23 {
            t.apply_half(offset, i.clone(), 1, 1);
        }
        assert_eq!(t.open_count(), 1);
        assert_eq!(t.by_id("batch"), Some(20));
    }

    #[test]
    fn the_oldest_remembered_end_bounds_the_floor_whatever_the_order_of_ends() {
        let mut t = TxnTable::default();
        for n in 0..3 {
            t.apply_half(n, info(&n.to_string()), 0, 1);
        }
        assert_eq!(t.oldest_remembered_end(), None);
        t.apply_op(&Op::Rollback { half: 1 }, 0, 1);
        t.apply_op(
            &Op::Commit {
                half: 0,
                copy_from: 0,
            },
            0,
            1,
        );
        // Half 2 is the oldest open one, but a restart must still know how 0 and 1 ended.
        assert_eq!(t.oldest_open(), Some(2));
        assert_eq!(t.oldest_remembered_end(), Some(0));
    }

    #[test]
    fn remembered_ends_are_bounded() {
        let mut t = TxnTable::default();
        for n in 0..(MAX_REMEMBERED_ENDS as u64 + 10) {
            t.apply_half(n, info(&n.to_string()), 0, 1);
            t.apply_op(&Op::Rollback { half: n }, 0, 1);
        }
        assert_eq!(t.ended.len(), MAX_REMEMBERED_ENDS);
        assert_eq!(t.by_id.len(), MAX_REMEMBERED_ENDS);
        assert_eq!(t.lookup(0), Lookup::Unknown);
    }
}
