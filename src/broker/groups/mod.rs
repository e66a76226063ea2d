//! Consumer groups: membership and assignment on a coordinator, committed offsets in the log.
//!
//! One shard coordinates a group: [`coordinator_of`], a pure function of its name, so every
//! shard (and a client that knows the shard count) finds it without asking. The coordinator's
//! [`GroupTable`] holds the group's settings and committed offsets as a view of `%SYS%GROUPS`
//! in its own CommitLog ([`records`]): a commit is an append acked under the same flush and
//! replication rules as a produce, so it is durable, replicated to the slave and recovered
//! after a crash like any message, and a promoted slave has every offset its master acked.
//! The view catches up with the log before every use ([`catch_up`]), so after a restart or a
//! promotion it is rebuilt from the log, never from memory.
//!
//! Members, generations and assignments are memory only: members heartbeat (JoinGroup with
//! their id), a member silent for its session timeout is dropped, and every change of
//! membership or subscription takes a new generation and a new assignment
//! ([`assignment`]: even, sticky). Fetches, commits and send-backs name the member and
//! generation; the coordinator refuses a stale one (STALE_GENERATION, UNKNOWN_MEMBER), so a
//! member presumed dead cannot move offsets.
//!
//! Each group has a retry topic `%RETRY%<group>` and a dead-letter topic `%DLQ%<group>`, one
//! queue per shard, created with the group; see `broker::retry`.
//!
//! Compaction ([`compact`]): retention deletes old segments, and with them old commits, and a
//! start-up must not read every commit ever made. So every [`COMPACT_EVERY`] (or once the
//! records since the last snapshot outnumber twice the live ones) the table is restated as a
//! snapshot (a `SnapshotBegin` record, then one record per live key), and the snapshot's
//! offset and id are kept in `<shard>/groups-snapshot` once it is acked. A view is then
//! loaded from there rather than from the oldest record. The file is checked against the
//! record it names (a replica that truncated its log, a lost file: the load starts at the
//! oldest record instead, which is slower, never wrong), and it is advisory: the log alone
//! always suffices.

pub mod assignment;
pub mod records;
pub mod table;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::broker::{ack, topic_log, topics, Result, ServiceError, Services};
use crate::protocol::{
    validate_group_name, AssignedQueue, CommitOffsetsRequest, ErrorCode, GroupDescription,
    GroupJoined, GroupQueueInfo, GroupSettings, JoinGroupRequest, MemberInfo, Membership, Response,
};
use crate::shard::mesh::{MeshReply, MeshRequest};
use crate::shard::router::shard_of;
use crate::shard::topics::TopicChange;
use crate::storage::{AppendRequest, QueueOffset};

use records::{encode_batch, stored_messages, GroupRecord, GROUPS_LOG};
pub use table::{GroupTable, Settings};

/// Default session timeout of a member that does not ask for one.
pub const DEFAULT_SESSION_TIMEOUT_MS: u32 = 10_000;
/// Bounds of a member's session timeout.
pub const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 1_000..=300_000;
/// Bounds of a group's consume timeout.
pub const CONSUME_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 1_000..=86_400_000;
/// Most retries a group may allow before the dead-letter queue.
pub const MAX_RECONSUME_TIMES: u32 = 1_000;
/// Most topics one member subscribes to, and most offsets in one commit.
pub const MAX_TOPICS_PER_MEMBER: usize = 64;
pub const MAX_OFFSETS_PER_COMMIT: usize = 4_096;

/// The shard that coordinates `group`.
pub fn coordinator_of(group: &str, shards: usize) -> usize {
    shard_of(group, 0, shards)
}

pub fn retry_topic(group: &str) -> String {
    format!("%RETRY%{group}")
}

pub fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

/// How often the table is restated as a snapshot (well under any retention: hours).
pub const COMPACT_EVERY: Duration = Duration::from_secs(3600);
/// The file naming the latest acked snapshot.
pub const SNAPSHOT_FILE: &str = "groups-snapshot";

/// A shard's coordinator state (used for the groups [`coordinator_of`] gives it, and for the
/// delay scheduler's cursors, which live in the same per-shard log queue).
pub struct Coordinator {
    table: RefCell<GroupTable>,
    /// The next offset of `%SYS%GROUPS` to apply.
    applied: Cell<u64>,
    /// Whether the first catch-up looked for a snapshot to start from.
    started: Cell<bool>,
    /// One catch-up at a time.
    catching_up: glommio::sync::Semaphore,
    /// One append to `%SYS%GROUPS` at a time (a snapshot holds it while it restates the table,
    /// so no record lands between the state it restates and its first record).
    writing: glommio::sync::Semaphore,
    /// The offset of the latest snapshot (0: none) and when it was written.
    last_snapshot: Cell<(u64, Option<Instant>)>,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
            table: RefCell::new(GroupTable::new(now_unix_us())),
            applied: Cell::new(0),
            started: Cell::new(false),
            catching_up: glommio::sync::Semaphore::new(1),
            writing: glommio::sync::Semaphore::new(1),
            last_snapshot: Cell::new((0, None)),
        }
    }
}

fn closed(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(ErrorCode::ShuttingDown, e.to_string())
}

/// `(offset, id)` of the snapshot `<shard>/groups-snapshot` names, if the file reads.
fn read_snapshot_file(s: &Services) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(s.shard.shard_dir().join(SNAPSHOT_FILE)).ok()?;
    let (offset, id) = text.trim().split_once(' ')?;
    Some((offset.parse().ok()?, id.parse().ok()?))
}

fn write_snapshot_file(s: &Services, offset: u64, id: u64) -> std::io::Result<()> {
    let dir = s.shard.shard_dir();
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{offset} {id}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(&dir)?.sync_all()
}

/// Where the first catch-up starts: the snapshot the file names, if the record at its offset
/// is that snapshot's first record; else the oldest record.
async fn load_start(s: &Services) -> u64 {
    let Some((offset, id)) = read_snapshot_file(s) else {
        return 0;
    };
    let store = s.shard.store();
    let first = match store.read(GROUPS_LOG, 0, QueueOffset(offset), 1).await {
        Ok(batch) => stored_messages(&batch.records, offset).ok(),
        Err(_) => None,
    };
    let found = first
        .and_then(|m| m.into_iter().next())
        .filter(|m| m.offset == offset)
        .and_then(|m| GroupRecord::decode(&m.message.payload).ok());
    if found == Some(GroupRecord::SnapshotBegin { id }) {
        s.groups.last_snapshot.set((offset, None));
        offset
    } else {
        log::warn!(
            "shard {}: {SNAPSHOT_FILE} names offset {offset}, which is not that snapshot;              loading consumer groups from the oldest record",
            s.shard.shard
        );
        0
    }
}

fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn now_unix_ms() -> u64 {
    now_unix_us() / 1000
}

fn internal(what: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(ErrorCode::Internal, what.to_string())
}

/// A request's setting: 0 means `default`; otherwise it must lie in `range`.
fn setting(
    name: &str,
    value: u32,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32> {
    match value {
        0 => Ok(default),
        v if range.contains(&v) => Ok(v),
        v => Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!("{name} {v} is outside {range:?}"),
        )),
    }
}

/// INVALID_ARGUMENT unless `1 <= n <= max`.
fn check_count(what: &str, n: usize, max: usize) -> Result<()> {
    if n == 0 || n > max {
        return Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!("{what}: 1..={max}, not {n}"),
        ));
    }
    Ok(())
}

fn check_group_name(group: &str) -> Result<()> {
    validate_group_name(group).map_err(|why| {
        ServiceError::new(
            ErrorCode::InvalidArgument,
            format!("invalid group name {group:?}: {why}"),
        )
    })
}

/// Applies what `%SYS%GROUPS` holds beyond what the table has seen.
pub async fn catch_up(s: &Services) -> Result<()> {
    let c = &s.groups;
    let _one = c
        .catching_up
        .acquire_permit(1)
        .await
        .map_err(|e| ServiceError::new(ErrorCode::ShuttingDown, e.to_string()))?;
    let store = s.shard.store();
    if !c.started.get() {
        c.started.set(true);
        c.applied.set(load_start(s).await);
    }
    loop {
        let stats = store.queue_stats(GROUPS_LOG, 0);
        if c.applied.get() > stats.written_end_offset.0 {
            // The log was truncated under the view (a replica dropping a diverged tail): what
            // was applied from the dropped part must go too, so start over from the log.
            log::warn!(
                "shard {}: {GROUPS_LOG} ends at {} but {} were applied: reloading consumer groups",
                s.shard.shard,
                stats.written_end_offset.0,
                c.applied.get()
            );
            *c.table.borrow_mut() = GroupTable::new(now_unix_us());
            c.applied.set(0);
            continue;
        }
        let from = c.applied.get().max(stats.min_offset.0);
        if from >= stats.visible_end_offset.0 {
            c.applied.set(from);
            return Ok(());
        }
        let batch = store
            .read(GROUPS_LOG, 0, QueueOffset(from), 1 << 20)
            .await?;
        let messages = stored_messages(&batch.records, from).map_err(internal)?;
        let mut table = c.table.borrow_mut();
        for m in &messages {
            match GroupRecord::decode(&m.message.payload) {
                Ok(r) => {
                    if let Err(why) = table.apply(r) {
                        log::warn!(
                            "shard {}: {GROUPS_LOG} offset {}: {why}",
                            s.shard.shard,
                            m.offset
                        );
                    }
                }
                Err(why) => log::warn!(
                    "shard {}: {GROUPS_LOG} offset {} is not a group record, skipped: {why}",
                    s.shard.shard,
                    m.offset
                ),
            }
        }
        if batch.next_offset.0 <= from {
            return Err(internal(format!(
                "{GROUPS_LOG} read at {from} made no progress"
            )));
        }
        c.applied.set(batch.next_offset.0);
    }
}

/// Appends `records` to this shard's `%SYS%GROUPS`, waits for the ack rule, applies them.
pub async fn append_records(
    s: &Services,
    records: &[GroupRecord],
) -> Result<crate::protocol::Durability> {
    let appended = {
        let _one = s.groups.writing.acquire_permit(1).await.map_err(closed)?;
        append_unlocked(s, records).await?
    };
    let durability = ack::acknowledge(s, 0, &appended).await?;
    // The view applies only what is visible, and under ASYNC_FLUSH an ack comes before that:
    // wait for it (bounded), so a join right after a create, or a describe right after a
    // commit, sees the record. Past the bound the record is applied by a later catch-up.
    let store = s.shard.store();
    let last = appended.base_offset.0 + u64::from(appended.count.max(1)) - 1;
    let bound = Duration::from_millis(s.shard.config.storage.flush_timeout_ms);
    let _ = glommio::timer::timeout(bound, async {
        store
            .wait_visible_beyond(GROUPS_LOG, 0, QueueOffset(last))
            .await;
        Ok(())
    })
    .await;
    catch_up(s).await?;
    // What the watermarks show now (after that wait, often more than the ack's own rule).
    Ok(durability.max(ack::durability_reached(s, &appended)))
}

async fn append_unlocked(
    s: &Services,
    records: &[GroupRecord],
) -> Result<crate::storage::Appended> {
    let (body, count) = encode_batch(records);
    Ok(s.shard
        .store()
        .append(AppendRequest {
            topic: GROUPS_LOG,
            queue_id: 0,
            message_count: count,
            producer: None,
            body: &body,
        })
        .await?)
}

/// Restates the table as a snapshot when it is due; returns the snapshot's offset if one was
/// written. Master only.
pub async fn compact(s: &Services, force: bool) -> Result<Option<u64>> {
    catch_up(s).await?;
    let (last, at) = s.groups.last_snapshot.get();
    let live = table(s).live_records() as u64;
    let since = s.groups.applied.get().saturating_sub(last);
    let stale = at.map_or(true, |t| t.elapsed() >= COMPACT_EVERY);
    let due = force || (live > 0 && (since > 2 * live + 1024 || (stale && since > live)));
    if !due {
        return Ok(None);
    }
    let id = now_unix_us();
    let (offset, appended) = {
        let _one = s.groups.writing.acquire_permit(1).await.map_err(closed)?;
        // Everything appended before must be in the table, so that the snapshot restates all
        // of it: wait until it is visible, then apply it.
        let store = s.shard.store();
        let end = store.queue_stats(GROUPS_LOG, 0).written_end_offset.0;
        if end > 0 {
            let visible = glommio::timer::timeout(Duration::from_secs(5), async {
                store
                    .wait_visible_beyond(GROUPS_LOG, 0, QueueOffset(end - 1))
                    .await;
                Ok(())
            })
            .await;
            if visible.is_err() {
                return Ok(None); // not visible yet (a replica is behind): next time
            }
        }
        catch_up(s).await?;
        let mut records = vec![GroupRecord::SnapshotBegin { id }];
        records.extend(table(s).snapshot());
        let mut first = None;
        let mut last = None;
        for chunk in records.chunks(MAX_OFFSETS_PER_COMMIT) {
            let a = append_unlocked(s, chunk).await?;
            first.get_or_insert(a.base_offset.0);
            last = Some(a);
        }
        (
            first.expect("one record at least"),
            last.expect("one chunk at least"),
        )
    };
    ack::acknowledge(s, 0, &appended).await?;
    write_snapshot_file(s, offset, id).map_err(|e| {
        internal(format!(
            "write {}: {e}",
            s.shard.shard_dir().join(SNAPSHOT_FILE).display()
        ))
    })?;
    s.groups.last_snapshot.set((offset, Some(Instant::now())));
    catch_up(s).await?;
    Ok(Some(offset))
}

/// Compacts `%SYS%GROUPS` when due (checked every second: a few comparisons when it is not)
/// while this shard is a master.
pub async fn run_compaction(s: std::rc::Rc<Services>) {
    while !s.shard.is_shutting_down() {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        if s.replication.role() != crate::replication::Role::Master
            || s.replication.fence_message().is_some()
        {
            continue;
        }
        if let Err(e) = compact(&s, false).await {
            log::warn!("shard {}: compacting consumer groups: {e}", s.shard.shard);
        }
    }
}

/// The table, for a short look (no `.await` while it is borrowed).
pub fn table(s: &Services) -> std::cell::RefMut<'_, GroupTable> {
    s.groups.table.borrow_mut()
}

fn queues_of(s: &Services) -> impl Fn(&str) -> u32 + '_ {
    |t: &str| s.shard.topic(t).map_or(0, |m| m.queues)
}

/// Creates the group's retry and dead-letter topics when they do not exist yet.
async fn ensure_group_topics(s: &Services, group: &str) -> Result<()> {
    ensure_internal_topics(s, [retry_topic(group), dlq_topic(group)]).await
}

/// Creates broker topics with one queue per shard (so each shard writes into a queue it
/// owns) when they do not exist yet; shard 0, the topic table's writer, creates them.
pub async fn ensure_internal_topics(
    s: &Services,
    names: impl IntoIterator<Item = String>,
) -> Result<()> {
    for name in names {
        create_topic_from_any_shard(s, name, s.shard.shards as u32).await?;
    }
    Ok(())
}

/// Creates `name` with `queues` queues if this shard does not know it, through shard 0 (the
/// topic table's one writer) from whichever shard runs this.
pub async fn create_topic_from_any_shard(s: &Services, name: String, queues: u32) -> Result<()> {
    if s.shard.topic(&name).is_some() {
        return Ok(());
    }
    if s.shard.shard == 0 {
        return create_internal_topic(s, &name, queues).await;
    }
    let reply = s
        .shard
        .mesh
        .call(0, MeshRequest::CreateInternalTopic { name, queues })
        .await?;
    done(reply, 0)
}

/// Shard 0, for another shard's coordinator: see [`MeshRequest::CreateInternalTopic`].
pub async fn create_internal_topic(s: &Services, name: &str, queues: u32) -> Result<()> {
    let change = TopicChange::Create {
        name: name.to_string(),
        queues,
    };
    topic_log::change(s, change).await
}

/// Makes the group exist (with `settings`, or the defaults when it is new and none are given).
async fn ensure_group(s: &Services, group: &str, settings: Option<Settings>) -> Result<Settings> {
    catch_up(s).await?;
    let current = table(s).settings(group);
    let wanted = match (current, settings) {
        (Some(c), None) => c,
        (Some(c), Some(w)) if c == w => c,
        (None, None) => Settings::default(),
        (_, Some(w)) => w,
    };
    if current != Some(wanted) {
        if current.is_none() && table(s).group_count() >= table::MAX_GROUPS {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "this broker shard coordinates {} groups, the most it may",
                    table::MAX_GROUPS
                ),
            ));
        }
        append_records(
            s,
            &[GroupRecord::Settings {
                group: group.to_string(),
                max_reconsume_times: wanted.max_reconsume_times,
                consume_timeout_ms: wanted.consume_timeout_ms,
            }],
        )
        .await?;
    }
    ensure_group_topics(s, group).await?;
    Ok(wanted)
}

/// CreateGroup (on the coordinator): create the group or change its settings.
pub async fn create(s: &Services, g: GroupSettings) -> Result<Response> {
    s.check_writable("create consumer groups")?;
    check_group_name(&g.group)?;
    if g.max_reconsume_times > MAX_RECONSUME_TIMES {
        return Err(ServiceError::new(
            ErrorCode::InvalidArgument,
            format!(
                "max_reconsume_times {} is over {MAX_RECONSUME_TIMES}",
                g.max_reconsume_times
            ),
        ));
    }
    let consume_timeout_ms = setting(
        "consume_timeout_ms",
        g.consume_timeout_ms,
        Settings::default().consume_timeout_ms,
        CONSUME_TIMEOUT_MS,
    )?;
    let settings = Settings {
        max_reconsume_times: g.max_reconsume_times,
        consume_timeout_ms,
    };
    ensure_group(s, &g.group, Some(settings)).await?;
    Ok(Response::GroupCreated(GroupSettings {
        group: g.group,
        max_reconsume_times: settings.max_reconsume_times,
        consume_timeout_ms: settings.consume_timeout_ms,
    }))
}

/// JoinGroup (on the coordinator): a first join creates the group with default settings.
pub async fn join(s: &Services, j: JoinGroupRequest) -> Result<Response> {
    s.check_writable("join consumer groups")?;
    check_group_name(&j.group)?;
    check_count(
        "topics a member subscribes to",
        j.topics.len(),
        MAX_TOPICS_PER_MEMBER,
    )?;
    for t in &j.topics {
        if t.starts_with('%') {
            return Err(ServiceError::new(
                ErrorCode::InvalidTopic,
                format!("{t:?} is a broker topic; a group reads its retry topic by itself"),
            ));
        }
        topics::queue_count(s, t)?;
        topics::check_one_group(s, t, "consumer groups")?;
    }
    let timeout_ms = setting(
        "session_timeout_ms",
        j.session_timeout_ms,
        DEFAULT_SESSION_TIMEOUT_MS,
        SESSION_TIMEOUT_MS,
    )?;
    let settings = ensure_group(s, &j.group, None).await?;
    let mut subscribed: BTreeSet<String> = j.topics.iter().cloned().collect();
    subscribed.insert(retry_topic(&j.group));
    let subscribed: Vec<String> = subscribed.into_iter().collect();
    let queues = queues_of(s);
    let mut table = table(s);
    let member = table.heartbeat(
        &j.group,
        (!j.member.is_empty()).then_some(j.member.as_str()),
        &subscribed,
        Duration::from_millis(u64::from(timeout_ms)),
        Instant::now(),
        &queues,
    )?;
    let g = table.group(&j.group).expect("heartbeat succeeded");
    let assignment = g
        .assignment
        .iter()
        .filter(|(_, m)| **m == member)
        .map(|((topic, queue), _)| AssignedQueue {
            topic: topic.clone(),
            queue: *queue,
            committed: table.committed(&j.group, topic, *queue),
            sent_back: table.sent_back(&j.group, topic, *queue),
        })
        .collect();
    Ok(Response::GroupJoined(GroupJoined {
        member,
        generation: g.generation,
        session_timeout_ms: timeout_ms,
        consume_timeout_ms: settings.consume_timeout_ms,
        max_reconsume_times: settings.max_reconsume_times,
        assignment,
    }))
}

/// LeaveGroup (on the coordinator).
pub fn leave(s: &Services, group: &str, member: &str) -> Result<Response> {
    check_group_name(group)?;
    let queues = queues_of(s);
    let generation = table(s).leave(group, member, &queues);
    Ok(Response::GroupLeft { generation })
}

/// The end offset of (topic, queue), from the shard that owns it.
async fn queue_end(s: &Services, topic: &str, queue: u32) -> Result<u64> {
    let owner = s.shard.owner_of(topic, queue);
    let stats = if owner == s.shard.shard {
        crate::broker::stats::local_queue_stats(s, topic)
    } else {
        match s
            .shard
            .mesh
            .call(
                owner,
                MeshRequest::LocalQueueStats {
                    topic: topic.to_string(),
                },
            )
            .await?
        {
            MeshReply::QueueStats(v) => v,
            other => return Err(internal(format!("shard {owner} answered {other:?}"))),
        }
    };
    Ok(stats
        .iter()
        .find(|q| q.queue == queue)
        .map_or(0, |q| q.end_offset))
}

/// CommitOffsets (on the coordinator).
pub async fn commit(s: &Services, c: CommitOffsetsRequest) -> Result<Response> {
    s.check_writable("commit offsets")?;
    let group = &c.who.group;
    check_group_name(group)?;
    check_count(
        "offsets in a commit",
        c.offsets.len(),
        MAX_OFFSETS_PER_COMMIT,
    )?;
    catch_up(s).await?;
    if table(s).settings(group).is_none() {
        return Err(table::group_not_found(group));
    }
    for o in &c.offsets {
        topics::check_queue(s, &o.topic, o.queue)?;
        let end = queue_end(s, &o.topic, o.queue).await?;
        if o.offset > end {
            return Err(ServiceError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "cannot commit offset {} of {}/{}: the queue ends at {end}",
                    o.offset, o.topic, o.queue
                ),
            ));
        }
    }
    // Checked last, with no await between the check and the append: a rebalance in between
    // would otherwise let a member that just lost a queue move its offset.
    let operator = c.who.member.is_empty() && c.who.generation == 0;
    {
        let queues = queues_of(s);
        let mut table = table(s);
        for o in &c.offsets {
            if operator {
                if let Some(holder) = table.holder(group, &o.topic, o.queue) {
                    return Err(ServiceError::new(
                        ErrorCode::StaleGeneration,
                        format!(
                            "{}/{} is held by member {holder:?}; an operator commit moves only \
                             queues no member holds",
                            o.topic, o.queue
                        ),
                    ));
                }
            } else {
                table.check_holder(
                    group,
                    &c.who.member,
                    c.who.generation,
                    Some((&o.topic, o.queue)),
                    Instant::now(),
                    &queues,
                )?;
            }
        }
        let keys: Vec<_> = c
            .offsets
            .iter()
            .map(|o| (o.topic.clone(), o.queue))
            .collect();
        table.check_room(group, &keys)?;
    }
    let records: Vec<GroupRecord> = c
        .offsets
        .iter()
        .map(|o| GroupRecord::Commit {
            group: group.clone(),
            topic: o.topic.clone(),
            queue: o.queue,
            offset: o.offset,
        })
        .collect();
    let durability = append_records(s, &records).await?;
    Ok(Response::OffsetsCommitted {
        durability,
        epoch: s.replication.epoch(),
    })
}

/// DescribeGroup (on the coordinator). Works on a slave too (read only).
pub async fn describe(s: &Services, group: &str) -> Result<Response> {
    check_group_name(group)?;
    catch_up(s).await?;
    let queues = queues_of(s);
    let mut table = table(s);
    table.expire(group, Instant::now(), &queues);
    let Some(g) = table.group(group) else {
        return Err(table::group_not_found(group));
    };
    let settings = g.settings.expect("an existing group");
    let now = Instant::now();
    let members = g
        .members
        .iter()
        .map(|(id, m)| MemberInfo {
            member: id.clone(),
            topics: m.topics.clone(),
            idle_ms: now.saturating_duration_since(m.last_seen).as_millis() as u64,
            queues: g.assignment.values().filter(|h| *h == id).count() as u32,
        })
        .collect();
    let committed = table.committed_of(group);
    let mut keys: BTreeSet<(String, u32)> = committed.keys().cloned().collect();
    keys.extend(g.assignment.keys().cloned());
    let queues = keys
        .into_iter()
        .map(|key| GroupQueueInfo {
            member: g.assignment.get(&key).cloned().unwrap_or_default(),
            committed: committed.get(&key).copied(),
            topic: key.0,
            queue: key.1,
        })
        .collect();
    Ok(Response::GroupDescribed(GroupDescription {
        settings: GroupSettings {
            group: group.to_string(),
            max_reconsume_times: settings.max_reconsume_times,
            consume_timeout_ms: settings.consume_timeout_ms,
        },
        generation: g.generation,
        members,
        queues,
    }))
}

/// On the coordinator: does `who` hold (topic, queue) in its generation?
pub async fn check_member_here(
    s: &Services,
    who: &Membership,
    topic: &str,
    queue: u32,
) -> Result<Settings> {
    check_group_name(&who.group)?;
    catch_up(s).await?;
    let queues = queues_of(s);
    let settings = table(s).check_holder(
        &who.group,
        &who.member,
        who.generation,
        Some((topic, queue)),
        Instant::now(),
        &queues,
    )?;
    Ok(settings)
}

/// From any shard: asks the group's coordinator whether `who` holds (topic, queue).
pub async fn check_member(
    s: &Services,
    who: &Membership,
    topic: &str,
    queue: u32,
) -> Result<Settings> {
    check_group_name(&who.group)?;
    let coordinator = coordinator_of(&who.group, s.shard.shards);
    if coordinator == s.shard.shard {
        return check_member_here(s, who, topic, queue).await;
    }
    let request = MeshRequest::CheckMember {
        who: who.clone(),
        topic: topic.to_string(),
        queue,
    };
    match s.shard.mesh.call(coordinator, request).await? {
        MeshReply::MemberChecked(Ok(g)) => Ok(Settings {
            max_reconsume_times: g.max_reconsume_times,
            consume_timeout_ms: g.consume_timeout_ms,
        }),
        MeshReply::MemberChecked(Err(e)) => Err(ServiceError::new(e.code, e.message)),
        other => Err(internal(format!("shard {coordinator} answered {other:?}"))),
    }
}

/// On the coordinator: records that `who` gave back (topic, queue, offset), so that whoever
/// holds the queue next skips it there (it comes back through the retry topic).
pub async fn record_sent_back_here(
    s: &Services,
    who: &Membership,
    topic: &str,
    queue: u32,
    offset: u64,
) -> Result<()> {
    check_member_here(s, who, topic, queue).await?;
    append_records(
        s,
        &[GroupRecord::SentBack {
            group: who.group.clone(),
            topic: topic.to_string(),
            queue,
            offset,
        }],
    )
    .await?;
    Ok(())
}

/// From any shard: [`record_sent_back_here`] on the group's coordinator.
pub async fn record_sent_back(
    s: &Services,
    who: &Membership,
    topic: &str,
    queue: u32,
    offset: u64,
) -> Result<()> {
    let coordinator = coordinator_of(&who.group, s.shard.shards);
    if coordinator == s.shard.shard {
        return record_sent_back_here(s, who, topic, queue, offset).await;
    }
    let request = MeshRequest::RecordSentBack {
        who: who.clone(),
        topic: topic.to_string(),
        queue,
        offset,
    };
    done(s.shard.mesh.call(coordinator, request).await?, coordinator)
}

/// What a `MeshReply::Done` from shard `from` says.
fn done(reply: MeshReply, from: usize) -> Result<()> {
    match reply {
        MeshReply::Done(Ok(())) => Ok(()),
        MeshReply::Done(Err(e)) => Err(ServiceError::new(e.code, e.message)),
        other => Err(internal(format!("shard {from} answered {other:?}"))),
    }
}
