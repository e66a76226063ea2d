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

    pub fn get(&self, name: &str) -> Option<TopicMeta> {
        self.topics.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, TopicMeta)> {
        self.topics.iter().map(|(n, m)| (n.as_str(), *m))
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
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
        if let Some(existing) = self.get(name) {
            if existing.queues != queues {
                return Err(TopicError::Exists {
                    name: name.to_string(),
                    queues: existing.queues,
                });
            }
        }
        let mut next = self.clone();
        next.topics.insert(name.to_string(), TopicMeta { queues });
        Ok(next)
    }
}

impl TopicTable {
    /// A copy with `name` grown to `queues` queues (the same count: unchanged). A topic never
    /// shrinks: its messages in the queues past the new count would be unreachable.
    pub fn with_more_queues(&self, name: &str, queues: u32) -> Result<TopicTable, TopicError> {
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
        next.topics.insert(name.to_string(), TopicMeta { queues });
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
        assert_eq!(back.get("orders"), Some(TopicMeta { queues: 8 }));
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
