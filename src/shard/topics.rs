//! The topic table: control-plane state, small, changed rarely.
//!
//! Persisted as `<data_dir>/topics.toml` with an atomic replace (write a temp file, fsync it,
//! rename over the old one, fsync the directory), so a crash leaves either the old or the new
//! table, never a torn one. Shard 0 is the only writer; a new version is an immutable
//! `Arc<TopicTable>` pushed to every shard before the create is acknowledged.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol;

/// Queues per topic: enough to spread a topic over many cores and consumers, small enough that
/// a route table fits one frame header.
pub const MAX_QUEUES_PER_TOPIC: u32 = 1024;

/// File name of the topic table inside the data dir.
pub const TOPICS_FILE: &str = "topics.toml";

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("topic table {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid queue count {queues} for topic {name:?}: must be 1..={MAX_QUEUES_PER_TOPIC}")]
    InvalidQueueCount { name: String, queues: u32 },
    #[error("topic {name:?} already exists with {queues} queues")]
    Exists { name: String, queues: u32 },
    #[error("topic {name:?} does not exist")]
    NotFound { name: String },
    #[error(
        "topic {name:?} was deleted; its name cannot be used again while its messages may \
         still be in the log (retention drops them): choose another name"
    )]
    Deleted { name: String },
    #[error(
        "topic {name:?} has {queues} queues; it can grow, not shrink to {wanted} (messages in \
         the queues past {wanted} would be unreachable)"
    )]
    Shrink {
        name: String,
        queues: u32,
        wanted: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub queues: u32,
    /// A tombstone: the topic was deleted. Kept (with its queue count) so its name is not
    /// taken again while its messages may still be in the log: a new topic of that name
    /// would see them, since queue offsets live in the log's records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl TopicMeta {
    pub fn new(queues: u32) -> TopicMeta {
        TopicMeta {
            queues,
            deleted: false,
        }
    }
}

/// One change to the topic table, as the topic log (`%SYS%TOPICS`) records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicChange {
    Create { name: String, queues: u32 },
    Grow { name: String, queues: u32 },
    Delete { name: String },
}

impl TopicChange {
    pub fn name(&self) -> &str {
        match self {
            TopicChange::Create { name, .. }
            | TopicChange::Grow { name, .. }
            | TopicChange::Delete { name } => name,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicTable {
    #[serde(default)]
    topics: BTreeMap<String, TopicMeta>,
}

/// The protocol's one topic-name rule ([`protocol::validate_topic_name`]).
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    protocol::validate_topic_name(name).map_err(|reason| TopicError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

impl TopicTable {
    /// Loads the table; a missing file is an empty table (first start).
    pub fn load(data_dir: &Path) -> Result<TopicTable, TopicError> {
        let path = data_dir.join(TOPICS_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TopicTable::default()),
            Err(source) => {
                return Err(TopicError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let table: TopicTable = toml::from_str(&text).map_err(|e| TopicError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        for (name, meta) in &table.topics {
            validate_topic_name(name).map_err(|e| TopicError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if meta.queues == 0 || meta.queues > MAX_QUEUES_PER_TOPIC {
                return Err(TopicError::Corrupt {
                    path: path.clone(),
                    reason: format!("topic {name:?} has {} queues", meta.queues),
                });
            }
        }
        Ok(table)
    }

    /// Atomically replaces the table on disk: tmp + fsync + rename + directory fsync.
    pub fn save(&self, data_dir: &Path) -> Result<(), TopicError> {
        let path = data_dir.join(TOPICS_FILE);
        let tmp = data_dir.join(format!("{TOPICS_FILE}.tmp"));
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| TopicError::Io { op, path, source }
        };
        let text = toml::to_string(self).expect("a topic table always serializes");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync dir", data_dir))?;
        Ok(())
    }

    /// A live topic (a deleted one is not there).
    pub fn get(&self, name: &str) -> Option<TopicMeta> {
        self.topics.get(name).copied().filter(|m| !m.deleted)
    }

    /// The live topics.
    pub fn iter(&self) -> impl Iterator<Item = (&str, TopicMeta)> {
        self.topics
            .iter()
            .filter(|(_, m)| !m.deleted)
            .map(|(n, m)| (n.as_str(), *m))
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_deleted(&self, name: &str) -> bool {
        self.topics.get(name).is_some_and(|m| m.deleted)
    }

    /// A client's change, checked: [`Self::with_topic`], [`Self::with_more_queues`] or
    /// [`Self::without_topic`].
    pub fn with_change(&self, change: &TopicChange) -> Result<TopicTable, TopicError> {
        match change {
            TopicChange::Create { name, queues } => self.with_topic(name, *queues),
            TopicChange::Grow { name, queues } => self.with_more_queues(name, *queues),
            TopicChange::Delete { name } => self.without_topic(name),
        }
    }

    /// A change read from the topic log (or copied from a master's list), merged in: never an
    /// error, the same result in any order and however often it is applied: per name the
    /// queue count only grows (the larger wins) and a deletion is for good. A change that does
    /// not check out (a bad name or count, from a newer or damaged peer) is ignored.
    pub fn merged(&self, change: &TopicChange) -> TopicTable {
        let mut next = self.clone();
        let name = change.name();
        if validate_topic_name(name).is_err() {
            return next;
        }
        let was = self.topics.get(name).copied().unwrap_or(TopicMeta::new(0));
        let merged = match change {
            TopicChange::Create { queues, .. } | TopicChange::Grow { queues, .. } => {
                if *queues == 0 || *queues > MAX_QUEUES_PER_TOPIC {
                    return next;
                }
                TopicMeta {
                    queues: was.queues.max(*queues),
                    deleted: was.deleted,
                }
            }
            // A tombstone of a topic never seen here still needs a valid count.
            TopicChange::Delete { .. } => TopicMeta {
                queues: was.queues.max(1),
                deleted: true,
            },
        };
        next.topics.insert(name.to_string(), merged);
        next
    }

    /// A copy with `name` deleted (a tombstone). Deleting an unknown topic is NotFound.
    /// Deleting a deleted topic changes nothing (a retried delete succeeds).
    pub fn without_topic(&self, name: &str) -> Result<TopicTable, TopicError> {
        if self.is_deleted(name) {
            return Ok(self.clone());
        }
        let Some(existing) = self.get(name) else {
            return Err(TopicError::NotFound {
                name: name.to_string(),
            });
        };
        let mut next = self.clone();
        next.topics.insert(
            name.to_string(),
            TopicMeta {
                queues: existing.queues,
                deleted: true,
            },
        );
        Ok(next)
    }

    /// A new table with `name` added. Creating a topic that exists with the same queue count
    /// is not an error (creates are idempotent, so a retried create succeeds).
    pub fn with_topic(&self, name: &str, queues: u32) -> Result<TopicTable, TopicError> {
        validate_topic_name(name)?;
        if queues == 0 || queues > MAX_QUEUES_PER_TOPIC {
            return Err(TopicError::InvalidQueueCount {
                name: name.to_string(),
                queues,
            });
        }
        if self.is_deleted(name) {
            return Err(TopicError::Deleted {
                name: name.to_string(),
            });
        }
        if let Some(existing) = self.get(name) {
            if existing.queues != queues {
                return Err(TopicError::Exists {
                    name: name.to_string(),
                    queues: existing.queues,
                });
            }
        }
        let mut next = self.clone();
        next.topics.insert(name.to_string(), TopicMeta::new(queues));
        Ok(next)
    }
}

impl TopicTable {
    /// A copy with `name` grown to `queues` queues (the same count: unchanged). A topic never
    /// shrinks: its messages in the queues past the new count would be unreachable.
    pub fn with_more_queues(&self, name: &str, queues: u32) -> Result<TopicTable, TopicError> {
        if self.is_deleted(name) {
            return Err(TopicError::Deleted {
                name: name.to_string(),
            });
        }
        let Some(existing) = self.get(name) else {
            return Err(TopicError::NotFound {
                name: name.to_string(),
            });
        };
        if queues < existing.queues {
            return Err(TopicError::Shrink {
                name: name.to_string(),
                queues: existing.queues,
                wanted: queues,
            });
        }
        if queues > MAX_QUEUES_PER_TOPIC {
            return Err(TopicError::InvalidQueueCount {
                name: name.to_string(),
                queues,
            });
        }
        let mut next = self.clone();
        next.topics.insert(name.to_string(), TopicMeta::new(queues));
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_survives_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TopicTable::load(dir.path()).unwrap().is_empty());
        let t = TopicTable::default().with_topic("orders", 8).unwrap();
        let t = t.with_topic("%RETRY%g1", 1).unwrap();
        t.save(dir.path()).unwrap();
        let back = TopicTable::load(dir.path()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.get("orders"), Some(TopicMeta::new(8)));
        assert!(!dir.path().join("topics.toml.tmp").exists());
    }

    #[test]
    fn recreating_with_same_queue_count_is_idempotent_but_different_count_is_refused() {
        let t = TopicTable::default().with_topic("a", 4).unwrap();
        assert_eq!(t.with_topic("a", 4).unwrap(), t);
        assert!(matches!(
            t.with_topic("a", 5),
            Err(TopicError::Exists { queues: 4, .. })
        ));
    }

    #[test]
    fn a_deleted_topic_is_gone_for_readers_kept_as_a_tombstone_and_its_name_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let t = TopicTable::default().with_topic("a", 4).unwrap();
        let t = t.with_topic("b", 2).unwrap().without_topic("a").unwrap();
        assert_eq!(t.get("a"), None);
        assert_eq!(t.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["b"]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.without_topic("a").unwrap(), t);
        for refused in [t.with_topic("a", 4), t.with_more_queues("a", 8)] {
            assert!(
                matches!(refused, Err(TopicError::Deleted { .. })),
                "{refused:?}"
            );
        }
        assert!(matches!(
            t.without_topic("nope"),
            Err(TopicError::NotFound { .. })
        ));
        t.save(dir.path()).unwrap();
        let back = TopicTable::load(dir.path()).unwrap();
        assert_eq!(back, t);
        assert!(back.is_deleted("a"));
    }

    #[test]
    fn merging_changes_gives_one_table_in_any_order_and_any_number_of_times() {
        let changes = [
            TopicChange::Create {
                name: "a".into(),
                queues: 2,
            },
            TopicChange::Grow {
                name: "a".into(),
                queues: 6,
            },
            TopicChange::Create {
                name: "b".into(),
                queues: 3,
            },
            TopicChange::Delete { name: "b".into() },
            TopicChange::Create {
                name: "%bad".into(),
                queues: 0,
            },
        ];
        let want = {
            let t = TopicTable::default().with_topic("a", 6).unwrap();
            t.with_topic("b", 3).unwrap().without_topic("b").unwrap()
        };
        // Every rotation and its reverse, each applied twice.
        for start in 0..changes.len() {
            for reverse in [false, true] {
                let mut order: Vec<&TopicChange> = changes
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(changes.len())
                    .collect();
                if reverse {
                    order.reverse();
                }
                let mut t = TopicTable::default();
                for c in order.iter().chain(order.iter()) {
                    t = t.merged(c);
                }
                assert_eq!(t, want, "{order:?}");
            }
        }
    }

    #[test]
    fn bad_names_and_queue_counts_are_refused() {
        let t = TopicTable::default();
        for name in ["", "..", "a/b", "a b", &"x".repeat(128)] {
            assert!(t.with_topic(name, 1).is_err(), "{name:?}");
        }
        assert!(t.with_topic("ok", 0).is_err());
        assert!(t.with_topic("ok", MAX_QUEUES_PER_TOPIC + 1).is_err());
    }

    #[test]
    fn corrupt_table_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TOPICS_FILE), "topics = 5").unwrap();
        assert!(matches!(
            TopicTable::load(dir.path()),
            Err(TopicError::Corrupt { .. })
        ));
    }
}
