//! A coordinator's state: the groups it coordinates, their members and assignment, and the
//! committed offsets. Settings and offsets are a view of `%SYS%GROUPS` (applied record by
//! record, the last per key wins); members, generations and assignments live in memory, since
//! members re-join after a restart anyway. No I/O here.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::broker::groups::assignment::{assign, QueueKey};
use crate::broker::groups::records::GroupRecord;
use crate::broker::{Result, ServiceError};
use crate::protocol::ErrorCode;

/// Groups one shard coordinates, at most.
pub const MAX_GROUPS: usize = 10_000;
/// Members of one group, at most.
pub const MAX_MEMBERS: usize = 1_024;
/// Committed offsets (group, topic, queue) one shard keeps, at most: ~100 bytes each.
pub const MAX_COMMITTED_OFFSETS: usize = 262_144;
/// Given-back offsets past their queue's commit one shard keeps, at most (past it a marker
/// is dropped, and that message may come back from its queue as well as from the retry).
pub const MAX_SENT_BACK: usize = 262_144;

/// A group's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_reconsume_times: u32,
    pub consume_timeout_ms: u32,
}

impl Default for Settings {
    /// RocketMQ's defaults: 16 retries, 15 minutes to consume a message.
    fn default() -> Self {
        Settings {
            max_reconsume_times: 16,
            consume_timeout_ms: 15 * 60 * 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub topics: Vec<String>,
    pub session_timeout: Duration,
    pub last_seen: Instant,
}

#[derive(Debug, Default)]
pub struct Group {
    /// `None` until a settings record is applied: the group does not exist yet.
    pub settings: Option<Settings>,
    pub generation: u64,
    pub members: BTreeMap<String, Member>,
    pub assignment: BTreeMap<QueueKey, String>,
}

pub struct GroupTable {
    groups: BTreeMap<String, Group>,
    offsets: HashMap<(String, String, u32), u64>,
    /// Offsets at or past the committed one that a member gave back, per queue.
    sent_back: HashMap<(String, String, u32), std::collections::BTreeSet<u64>>,
    sent_back_count: usize,
    /// The delay scheduler's cursor per level (index `level - 1`).
    progress: [Option<u64>; 18],
    /// Generations only grow, also across restarts: they start at the wall clock in
    /// microseconds when the table is made (more than any generation a previous run handed
    /// out, unless the clock went back) and every change takes the next number.
    next_generation: u64,
    next_member: u64,
}

impl GroupTable {
    pub fn new(now_unix_us: u64) -> GroupTable {
        GroupTable {
            groups: BTreeMap::new(),
            offsets: HashMap::new(),
            sent_back: HashMap::new(),
            sent_back_count: 0,
            progress: [None; 18],
            next_generation: now_unix_us.max(1),
            next_member: 1,
        }
    }

    /// Applies one record read from the log. Over a bound, the record is skipped and `Err`
    /// says so (the caller logs it): the log keeps it, a later start with a larger bound
    /// would see it.
    pub fn apply(&mut self, record: GroupRecord) -> std::result::Result<(), String> {
        match record {
            GroupRecord::Settings {
                group,
                max_reconsume_times,
                consume_timeout_ms,
            } => {
                if !self.groups.contains_key(&group) && self.groups.len() >= MAX_GROUPS {
                    return Err(format!(
                        "group {group:?} skipped: {MAX_GROUPS} groups already"
                    ));
                }
                self.groups.entry(group).or_default().settings = Some(Settings {
                    max_reconsume_times,
                    consume_timeout_ms,
                });
            }
            GroupRecord::Commit {
                group,
                topic,
                queue,
                offset,
            } => {
                let key = (group, topic, queue);
                if !self.offsets.contains_key(&key) && self.offsets.len() >= MAX_COMMITTED_OFFSETS {
                    return Err(format!(
                        "offset of {key:?} skipped: {MAX_COMMITTED_OFFSETS} offsets already"
                    ));
                }
                // Given-back offsets below the commit need no marker any more.
                if let Some(set) = self.sent_back.get_mut(&key) {
                    let keep = set.split_off(&offset);
                    self.sent_back_count -= set.len();
                    *set = keep;
                    if set.is_empty() {
                        self.sent_back.remove(&key);
                    }
                }
                self.offsets.insert(key, offset);
            }
            GroupRecord::SentBack {
                group,
                topic,
                queue,
                offset,
            } => {
                let key = (group, topic, queue);
                if self.offsets.get(&key).is_some_and(|c| offset < *c) {
                    return Ok(());
                }
                if self.sent_back_count >= MAX_SENT_BACK {
                    return Err(format!(
                        "given-back marker of {key:?}/{offset} skipped: {MAX_SENT_BACK} already"
                    ));
                }
                if self.sent_back.entry(key).or_default().insert(offset) {
                    self.sent_back_count += 1;
                }
            }
            GroupRecord::Progress { level, next } => {
                if let Some(slot) = self.progress.get_mut((level as usize).wrapping_sub(1)) {
                    *slot = Some(next);
                }
            }
            GroupRecord::SnapshotBegin { .. } => {}
        }
        Ok(())
    }

    /// The records that restate this table (what a snapshot appends).
    pub fn snapshot(&self) -> Vec<GroupRecord> {
        let mut out = Vec::with_capacity(self.live_records());
        for (group, g) in &self.groups {
            if let Some(st) = g.settings {
                out.push(GroupRecord::Settings {
                    group: group.clone(),
                    max_reconsume_times: st.max_reconsume_times,
                    consume_timeout_ms: st.consume_timeout_ms,
                });
            }
        }
        let mut offsets: Vec<_> = self.offsets.iter().collect();
        offsets.sort();
        for ((group, topic, queue), offset) in offsets {
            out.push(GroupRecord::Commit {
                group: group.clone(),
                topic: topic.clone(),
                queue: *queue,
                offset: *offset,
            });
        }
        let mut sent_back: Vec<_> = self.sent_back.iter().collect();
        sent_back.sort();
        for ((group, topic, queue), offsets) in sent_back {
            for offset in offsets {
                out.push(GroupRecord::SentBack {
                    group: group.clone(),
                    topic: topic.clone(),
                    queue: *queue,
                    offset: *offset,
                });
            }
        }
        for (i, next) in self.progress.iter().enumerate() {
            if let Some(next) = next {
                out.push(GroupRecord::Progress {
                    level: i as u32 + 1,
                    next: *next,
                });
            }
        }
        out
    }

    /// How many records [`Self::snapshot`] writes.
    pub fn live_records(&self) -> usize {
        self.group_count()
            + self.offsets.len()
            + self.sent_back_count
            + self.progress.iter().flatten().count()
    }

    /// The offsets of (topic, queue) a member of `group` gave back, past the committed one.
    pub fn sent_back(&self, group: &str, topic: &str, queue: u32) -> Vec<u64> {
        self.sent_back
            .get(&(group.to_string(), topic.to_string(), queue))
            .map_or(Vec::new(), |s| s.iter().copied().collect())
    }

    pub fn settings(&self, group: &str) -> Option<Settings> {
        self.groups.get(group).and_then(|g| g.settings)
    }

    /// Every existing group, by name.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &Group)> {
        self.groups
            .iter()
            .filter(|(_, g)| g.settings.is_some())
            .map(|(n, g)| (n.as_str(), g))
    }

    pub fn group(&self, group: &str) -> Option<&Group> {
        self.groups.get(group).filter(|g| g.settings.is_some())
    }

    pub fn committed(&self, group: &str, topic: &str, queue: u32) -> Option<u64> {
        self.offsets
            .get(&(group.to_string(), topic.to_string(), queue))
            .copied()
    }

    /// Every committed offset: (group, topic, queue, offset), in no order.
    pub fn all_committed(&self) -> impl Iterator<Item = (&str, &str, u32, u64)> {
        self.offsets
            .iter()
            .map(|((g, t, q), o)| (g.as_str(), t.as_str(), *q, *o))
    }

    /// Committed offsets of `group`, sorted.
    pub fn committed_of(&self, group: &str) -> BTreeMap<QueueKey, u64> {
        self.offsets
            .iter()
            .filter(|((g, _, _), _)| g == group)
            .map(|((_, t, q), o)| ((t.clone(), *q), *o))
            .collect()
    }

    /// Whether committing `keys` would go over [`MAX_COMMITTED_OFFSETS`].
    pub fn check_room(&self, group: &str, keys: &[(String, u32)]) -> Result<()> {
        let new = keys
            .iter()
            .filter(|(t, q)| self.committed(group, t, *q).is_none())
            .count();
        if self.offsets.len() + new > MAX_COMMITTED_OFFSETS {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "this broker shard keeps at most {MAX_COMMITTED_OFFSETS} committed offsets"
                ),
            ));
        }
        Ok(())
    }

    pub fn group_count(&self) -> usize {
        self.groups
            .values()
            .filter(|g| g.settings.is_some())
            .count()
    }

    pub fn progress(&self, level: u32) -> Option<u64> {
        self.progress
            .get((level as usize).wrapping_sub(1))
            .copied()
            .flatten()
    }

    /// A join (`member` is `None`) or a heartbeat. Returns the member id. The group must
    /// exist. `queues_of` gives the queue count of a topic.
    pub fn heartbeat(
        &mut self,
        group: &str,
        member: Option<&str>,
        topics: &[String],
        session_timeout: Duration,
        now: Instant,
        queues_of: &dyn Fn(&str) -> u32,
    ) -> Result<String> {
        self.expire(group, now, queues_of);
        let next_member = self.next_member;
        let g = self.groups.get_mut(group).filter(|g| g.settings.is_some());
        let Some(g) = g else {
            return Err(group_not_found(group));
        };
        let id = match member {
            Some(id) => {
                let Some(m) = g.members.get_mut(id) else {
                    return Err(ServiceError::new(
                        ErrorCode::UnknownMember,
                        format!(
                            "member {id:?} is not in group {group:?} (it left or its session \
                             timed out): join again"
                        ),
                    ));
                };
                m.last_seen = now;
                m.session_timeout = session_timeout;
                // Every queue of a subscribed topic has a holder, so a topic whose last queue
                // has none grew (`admin topic alter`) since the last rebalance.
                let grown = topics.iter().any(|t| {
                    let n = queues_of(t);
                    n > 0 && !g.assignment.contains_key(&(t.clone(), n - 1))
                });
                if m.topics == topics && !grown {
                    return Ok(id.to_string());
                }
                m.topics = topics.to_vec();
                id.to_string()
            }
            None => {
                if g.members.len() >= MAX_MEMBERS {
                    return Err(ServiceError::new(
                        ErrorCode::LimitExceeded,
                        format!("group {group:?} has {MAX_MEMBERS} members, the most it may"),
                    ));
                }
                let id = format!("{group}-{}-{next_member}", self.next_generation);
                self.next_member += 1;
                g.members.insert(
                    id.clone(),
                    Member {
                        topics: topics.to_vec(),
                        session_timeout,
                        last_seen: now,
                    },
                );
                id
            }
        };
        self.rebalance(group, queues_of);
        Ok(id)
    }

    /// Removes `member`; unknown members are not an error (a retried leave).
    pub fn leave(&mut self, group: &str, member: &str, queues_of: &dyn Fn(&str) -> u32) -> u64 {
        let Some(g) = self.groups.get_mut(group) else {
            return 0;
        };
        if g.members.remove(member).is_some() {
            self.rebalance(group, queues_of);
        }
        self.groups.get(group).map_or(0, |g| g.generation)
    }

    /// Drops members whose session timed out, and rebalances if any did.
    pub fn expire(&mut self, group: &str, now: Instant, queues_of: &dyn Fn(&str) -> u32) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let before = g.members.len();
        g.members
            .retain(|_, m| now.saturating_duration_since(m.last_seen) <= m.session_timeout);
        if g.members.len() != before {
            self.rebalance(group, queues_of);
        }
    }

    /// A new generation and assignment for `group`.
    fn rebalance(&mut self, group: &str, queues_of: &dyn Fn(&str) -> u32) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let mut topics: BTreeMap<String, (u32, Vec<String>)> = BTreeMap::new();
        for (id, m) in &g.members {
            for t in &m.topics {
                topics
                    .entry(t.clone())
                    .or_insert_with(|| (queues_of(t), Vec::new()))
                    .1
                    .push(id.clone());
            }
        }
        g.assignment = assign(&topics, &g.assignment);
        g.generation = generation;
    }

    /// Whether `member` holds (topic, queue) in `generation`; refreshes its liveness.
    pub fn check_holder(
        &mut self,
        group: &str,
        member: &str,
        generation: u64,
        queue: Option<(&str, u32)>,
        now: Instant,
        queues_of: &dyn Fn(&str) -> u32,
    ) -> Result<Settings> {
        self.expire(group, now, queues_of);
        let Some(g) = self.groups.get_mut(group).filter(|g| g.settings.is_some()) else {
            return Err(group_not_found(group));
        };
        let Some(m) = g.members.get_mut(member) else {
            return Err(ServiceError::new(
                ErrorCode::UnknownMember,
                format!("member {member:?} is not in group {group:?}: join again"),
            ));
        };
        if generation != g.generation {
            return Err(ServiceError::new(
                ErrorCode::StaleGeneration,
                format!(
                    "group {group:?} is in generation {}, not {generation}: join again for the \
                     new assignment",
                    g.generation
                ),
            ));
        }
        m.last_seen = now;
        if let Some((topic, queue)) = queue {
            let holder = g.assignment.get(&(topic.to_string(), queue));
            if holder.map(String::as_str) != Some(member) {
                return Err(ServiceError::new(
                    ErrorCode::StaleGeneration,
                    format!(
                        "{topic}/{queue} is not assigned to {member:?} in generation {}",
                        g.generation
                    ),
                ));
            }
        }
        Ok(g.settings.expect("filtered above"))
    }

    /// Who holds (topic, queue) now, if anyone.
    pub fn holder(&self, group: &str, topic: &str, queue: u32) -> Option<&str> {
        self.groups
            .get(group)?
            .assignment
            .get(&(topic.to_string(), queue))
            .map(String::as_str)
    }
}

pub fn group_not_found(group: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::GroupNotFound,
        format!(
            "consumer group {group:?} does not exist (a member's first join creates it, or \
             `ringmq admin group create`)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(group: &str) -> GroupTable {
        let mut t = GroupTable::new(1_000);
        t.apply(GroupRecord::Settings {
            group: group.into(),
            max_reconsume_times: 3,
            consume_timeout_ms: 1000,
        })
        .unwrap();
        t
    }

    const S: Duration = Duration::from_secs(10);

    #[test]
    fn the_last_commit_per_key_wins() {
        let mut t = table_with("g");
        for offset in [5, 9, 2] {
            t.apply(GroupRecord::Commit {
                group: "g".into(),
                topic: "t".into(),
                queue: 1,
                offset,
            })
            .unwrap();
        }
        assert_eq!(t.committed("g", "t", 1), Some(2));
        assert_eq!(t.committed("g", "t", 0), None);
    }

    #[test]
    fn joins_leaves_and_timeouts_bump_the_generation_and_stale_members_are_refused() {
        let mut t = table_with("g");
        let q = |_: &str| 4;
        let now = Instant::now();
        let topics = vec!["t".to_string()];
        let a = t.heartbeat("g", None, &topics, S, now, &q).unwrap();
        let g1 = t.group("g").unwrap().generation;
        let b = t.heartbeat("g", None, &topics, S, now, &q).unwrap();
        let g2 = t.group("g").unwrap().generation;
        assert!(g2 > g1);
        // A heartbeat that changes nothing keeps the generation.
        t.heartbeat("g", Some(&a), &topics, S, now, &q).unwrap();
        assert_eq!(t.group("g").unwrap().generation, g2);
        // a's queue from generation 1 is refused in generation 2.
        let err = t
            .check_holder("g", &a, g1, Some(("t", 0)), now, &q)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::StaleGeneration);
        // b times out (a heartbeats, b does not): a gets every queue in a new generation.
        t.heartbeat("g", Some(&a), &topics, S, now + Duration::from_secs(6), &q)
            .unwrap();
        let later = now + Duration::from_secs(11);
        t.heartbeat("g", Some(&a), &topics, S, later, &q).unwrap();
        let g3 = t.group("g").unwrap().generation;
        assert!(g3 > g2);
        for queue in 0..4 {
            t.check_holder("g", &a, g3, Some(("t", queue)), later, &q)
                .unwrap();
        }
        let err = t.check_holder("g", &b, g3, None, later, &q).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownMember);
        assert!(t.leave("g", &a, &q) > g3);
        assert!(t.group("g").unwrap().assignment.is_empty());
    }

    #[test]
    fn a_snapshot_applied_to_an_empty_table_restates_it() {
        let mut t = table_with("g");
        for (topic, queue, offset) in [("t", 0, 5), ("t", 1, 7), ("u", 0, 1), ("t", 0, 9)] {
            t.apply(GroupRecord::Commit {
                group: "g".into(),
                topic: topic.into(),
                queue,
                offset,
            })
            .unwrap();
        }
        t.apply(GroupRecord::Progress { level: 3, next: 11 })
            .unwrap();
        for offset in [8, 12, 15] {
            t.apply(GroupRecord::SentBack {
                group: "g".into(),
                topic: "t".into(),
                queue: 0,
                offset,
            })
            .unwrap();
        }
        // A commit past a marker drops it; a marker below the commit is not kept.
        t.apply(GroupRecord::Commit {
            group: "g".into(),
            topic: "t".into(),
            queue: 0,
            offset: 13,
        })
        .unwrap();
        assert_eq!(t.sent_back("g", "t", 0), [15]);
        let mut back = GroupTable::new(5);
        for r in t.snapshot() {
            back.apply(r).unwrap();
        }
        assert_eq!(back.snapshot(), t.snapshot());
        assert_eq!(back.committed("g", "t", 0), Some(13));
        assert_eq!(back.progress(3), Some(11));
        assert_eq!(back.settings("g"), t.settings("g"));
        assert_eq!(back.sent_back("g", "t", 0), [15]);
        assert_eq!(t.live_records(), 1 + 3 + 1 + 1);
    }

    #[test]
    fn a_group_without_settings_does_not_exist() {
        let mut t = GroupTable::new(1);
        let err = t
            .heartbeat("nope", None, &[], S, Instant::now(), &|_| 1)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::GroupNotFound);
    }

    #[test]
    fn a_new_table_hands_out_larger_generations_than_an_older_one() {
        let mut old = table_with("g");
        old.heartbeat("g", None, &["t".into()], S, Instant::now(), &|_| 1)
            .unwrap();
        let mut new = GroupTable::new(2_000);
        new.apply(GroupRecord::Settings {
            group: "g".into(),
            max_reconsume_times: 1,
            consume_timeout_ms: 1,
        })
        .unwrap();
        new.heartbeat("g", None, &["t".into()], S, Instant::now(), &|_| 1)
            .unwrap();
        assert!(new.group("g").unwrap().generation > old.group("g").unwrap().generation);
    }
}
