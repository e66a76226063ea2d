//! The consumer-group family: JoinGroup (30, also the heartbeat), LeaveGroup (31),
//! CommitOffsets (32), SendBack (33), CreateGroup (34) and DescribeGroup (35). Names are
//! checked by the broker ([`validate_group_name`](crate::protocol::validate_group_name)), not
//! here, so that the refusal can say what was wrong.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;
use crate::protocol::Durability;

/// A member's place in its group, sent with each of its fetches, commits and send-backs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub group: String,
    pub member: String,
    pub generation: u64,
}

/// JoinGroup: a first join (empty `member`) or a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinGroupRequest {
    pub group: String,
    pub member: String,
    pub topics: Vec<String>,
    /// 0: the broker's default.
    pub session_timeout_ms: u32,
}

/// A queue assigned to a member and where the group left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedQueue {
    pub topic: String,
    pub queue: u32,
    /// The group's committed offset (the next one to read); `None`: never committed.
    pub committed: Option<u64>,
}

/// The answer to a join or heartbeat: the member's id, the generation and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupJoined {
    pub member: String,
    pub generation: u64,
    pub session_timeout_ms: u32,
    pub consume_timeout_ms: u32,
    pub max_reconsume_times: u32,
    pub assignment: Vec<AssignedQueue>,
}

/// One committed position: `offset` is the next offset the group reads in (topic, queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitOffsetsRequest {
    /// An empty member with generation 0 is an operator commit (see the schema).
    pub who: Membership,
    pub offsets: Vec<CommittedOffset>,
}

/// SendBack: a message the member could not process, by where it was read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendBackRequest {
    pub who: Membership,
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    /// 1..=18; 0: the default (3 + reconsume count).
    pub delay_level: u32,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentBack {
    /// `%RETRY%<group>` or `%DLQ%<group>`.
    pub topic: String,
    /// How many times the message has now failed.
    pub reconsume_times: u32,
    pub durability: Durability,
}

/// A group's settings (CreateGroup's request and response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSettings {
    pub group: String,
    pub max_reconsume_times: u32,
    pub consume_timeout_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub member: String,
    pub topics: Vec<String>,
    pub idle_ms: u64,
    pub queues: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupQueueInfo {
    pub topic: String,
    pub queue: u32,
    /// Empty: no member holds it.
    pub member: String,
    pub committed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub settings: GroupSettings,
    pub generation: u64,
    pub members: Vec<MemberInfo>,
    pub queues: Vec<GroupQueueInfo>,
}

fn strings<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    items: &[String],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<&'a str>>> {
    let items: Vec<_> = items.iter().map(|s| fbb.create_string(s)).collect();
    fbb.create_vector(&items)
}

fn read_strings(
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<&str>>>,
) -> Vec<String> {
    v.into_iter().flatten().map(str::to_owned).collect()
}

impl<'a> fb::JoinGroupRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, j: &JoinGroupRequest) -> WIPOffset<Self> {
        let group = fbb.create_string(&j.group);
        let member = fbb.create_string(&j.member);
        let topics = strings(fbb, &j.topics);
        let args = fb::JoinGroupRequestArgs {
            group: Some(group),
            member: Some(member),
            topics: Some(topics),
            session_timeout_ms: j.session_timeout_ms,
        };
        fb::JoinGroupRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<JoinGroupRequest, String> {
        Ok(JoinGroupRequest {
            group: self.group().to_owned(),
            member: self.member().unwrap_or_default().to_owned(),
            topics: read_strings(self.topics()),
            session_timeout_ms: self.session_timeout_ms(),
        })
    }
}

impl<'a> fb::JoinGroupResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, j: &GroupJoined) -> WIPOffset<Self> {
        let items: Vec<_> = j
            .assignment
            .iter()
            .map(|a| {
                let topic = fbb.create_string(&a.topic);
                let args = fb::AssignedQueueArgs {
                    topic: Some(topic),
                    queue: a.queue,
                    committed: a.committed.is_some(),
                    offset: a.committed.unwrap_or(0),
                };
                fb::AssignedQueue::create(fbb, &args)
            })
            .collect();
        let assignment = fbb.create_vector(&items);
        let member = fbb.create_string(&j.member);
        let args = fb::JoinGroupResponseArgs {
            member: Some(member),
            generation: j.generation,
            session_timeout_ms: j.session_timeout_ms,
            consume_timeout_ms: j.consume_timeout_ms,
            max_reconsume_times: j.max_reconsume_times,
            assignment: Some(assignment),
        };
        fb::JoinGroupResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<GroupJoined, String> {
        Ok(GroupJoined {
            member: self.member().to_owned(),
            generation: self.generation(),
            session_timeout_ms: self.session_timeout_ms(),
            consume_timeout_ms: self.consume_timeout_ms(),
            max_reconsume_times: self.max_reconsume_times(),
            assignment: self
                .assignment()
                .into_iter()
                .flatten()
                .map(|a| AssignedQueue {
                    topic: a.topic().to_owned(),
                    queue: a.queue(),
                    committed: a.committed().then_some(a.offset()),
                })
                .collect(),
        })
    }
}

impl<'a> fb::LeaveGroupRequest<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        group: &str,
        member: &str,
    ) -> WIPOffset<Self> {
        let group = fbb.create_string(group);
        let member = fbb.create_string(member);
        let args = fb::LeaveGroupRequestArgs {
            group: Some(group),
            member: Some(member),
        };
        fb::LeaveGroupRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<(String, String), String> {
        Ok((self.group().to_owned(), self.member().to_owned()))
    }
}

impl<'a> fb::LeaveGroupResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, generation: &u64) -> WIPOffset<Self> {
        let args = fb::LeaveGroupResponseArgs {
            generation: *generation,
        };
        fb::LeaveGroupResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<u64, String> {
        Ok(self.generation())
    }
}

impl<'a> fb::CommitOffsetsRequest<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        c: &CommitOffsetsRequest,
    ) -> WIPOffset<Self> {
        let items: Vec<_> = c
            .offsets
            .iter()
            .map(|o| {
                let topic = fbb.create_string(&o.topic);
                let args = fb::CommittedOffsetArgs {
                    topic: Some(topic),
                    queue: o.queue,
                    offset: o.offset,
                };
                fb::CommittedOffset::create(fbb, &args)
            })
            .collect();
        let offsets = fbb.create_vector(&items);
        let group = fbb.create_string(&c.who.group);
        let member = fbb.create_string(&c.who.member);
        let args = fb::CommitOffsetsRequestArgs {
            group: Some(group),
            member: Some(member),
            generation: c.who.generation,
            offsets: Some(offsets),
        };
        fb::CommitOffsetsRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<CommitOffsetsRequest, String> {
        Ok(CommitOffsetsRequest {
            who: Membership {
                group: self.group().to_owned(),
                member: self.member().unwrap_or_default().to_owned(),
                generation: self.generation(),
            },
            offsets: self
                .offsets()
                .into_iter()
                .flatten()
                .map(|o| CommittedOffset {
                    topic: o.topic().to_owned(),
                    queue: o.queue(),
                    offset: o.offset(),
                })
                .collect(),
        })
    }
}

impl<'a> fb::CommitOffsetsResponse<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        durability: &Durability,
        epoch: &u64,
    ) -> WIPOffset<Self> {
        let args = fb::CommitOffsetsResponseArgs {
            durability: durability.to_wire(),
            epoch: *epoch,
        };
        fb::CommitOffsetsResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<(Durability, u64), String> {
        Ok((Durability::from_wire(self.durability()), self.epoch()))
    }
}

impl<'a> fb::SendBackRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, b: &SendBackRequest) -> WIPOffset<Self> {
        let group = fbb.create_string(&b.who.group);
        let member = fbb.create_string(&b.who.member);
        let topic = fbb.create_string(&b.topic);
        let error = fbb.create_string(&b.error);
        let args = fb::SendBackRequestArgs {
            group: Some(group),
            member: Some(member),
            generation: b.who.generation,
            topic: Some(topic),
            queue: b.queue,
            offset: b.offset,
            delay_level: b.delay_level,
            error: Some(error),
        };
        fb::SendBackRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<SendBackRequest, String> {
        Ok(SendBackRequest {
            who: Membership {
                group: self.group().to_owned(),
                member: self.member().to_owned(),
                generation: self.generation(),
            },
            topic: self.topic().to_owned(),
            queue: self.queue(),
            offset: self.offset(),
            delay_level: self.delay_level(),
            error: self.error().unwrap_or_default().to_owned(),
        })
    }
}

impl<'a> fb::SendBackResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, b: &SentBack) -> WIPOffset<Self> {
        let topic = fbb.create_string(&b.topic);
        let args = fb::SendBackResponseArgs {
            topic: Some(topic),
            reconsume_times: b.reconsume_times,
            durability: b.durability.to_wire(),
        };
        fb::SendBackResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<SentBack, String> {
        Ok(SentBack {
            topic: self.topic().to_owned(),
            reconsume_times: self.reconsume_times(),
            durability: Durability::from_wire(self.durability()),
        })
    }
}

/// CreateGroup's request and response carry the same fields: the response echoes the settings.
macro_rules! group_settings {
    ($table:ident, $args:ident) => {
        impl<'a> fb::$table<'a> {
            pub(crate) fn encode(
                fbb: &mut FlatBufferBuilder<'a>,
                g: &GroupSettings,
            ) -> WIPOffset<Self> {
                let group = fbb.create_string(&g.group);
                let args = fb::$args {
                    group: Some(group),
                    max_reconsume_times: g.max_reconsume_times,
                    consume_timeout_ms: g.consume_timeout_ms,
                };
                fb::$table::create(fbb, &args)
            }

            pub(crate) fn decode(self) -> Result<GroupSettings, String> {
                Ok(GroupSettings {
                    group: self.group().to_owned(),
                    max_reconsume_times: self.max_reconsume_times(),
                    consume_timeout_ms: self.consume_timeout_ms(),
                })
            }
        }
    };
}

group_settings!(CreateGroupRequest, CreateGroupRequestArgs);
group_settings!(CreateGroupResponse, CreateGroupResponseArgs);

impl<'a> fb::DescribeGroupRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, group: &str) -> WIPOffset<Self> {
        let group = fbb.create_string(group);
        fb::DescribeGroupRequest::create(fbb, &fb::DescribeGroupRequestArgs { group: Some(group) })
    }

    pub(crate) fn decode(self) -> Result<String, String> {
        Ok(self.group().to_owned())
    }
}

impl<'a> fb::DescribeGroupResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, d: &GroupDescription) -> WIPOffset<Self> {
        let members: Vec<_> = d
            .members
            .iter()
            .map(|m| {
                let member = fbb.create_string(&m.member);
                let topics = strings(fbb, &m.topics);
                let args = fb::GroupMemberArgs {
                    member: Some(member),
                    topics: Some(topics),
                    idle_ms: m.idle_ms,
                    queues: m.queues,
                };
                fb::GroupMember::create(fbb, &args)
            })
            .collect();
        let members = fbb.create_vector(&members);
        let queues: Vec<_> = d
            .queues
            .iter()
            .map(|q| {
                let topic = fbb.create_string(&q.topic);
                let member = fbb.create_string(&q.member);
                let args = fb::GroupQueueArgs {
                    topic: Some(topic),
                    queue: q.queue,
                    member: Some(member),
                    committed: q.committed.is_some(),
                    offset: q.committed.unwrap_or(0),
                };
                fb::GroupQueue::create(fbb, &args)
            })
            .collect();
        let queues = fbb.create_vector(&queues);
        let group = fbb.create_string(&d.settings.group);
        let args = fb::DescribeGroupResponseArgs {
            group: Some(group),
            generation: d.generation,
            max_reconsume_times: d.settings.max_reconsume_times,
            consume_timeout_ms: d.settings.consume_timeout_ms,
            members: Some(members),
            queues: Some(queues),
        };
        fb::DescribeGroupResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<GroupDescription, String> {
        Ok(GroupDescription {
            settings: GroupSettings {
                group: self.group().to_owned(),
                max_reconsume_times: self.max_reconsume_times(),
                consume_timeout_ms: self.consume_timeout_ms(),
            },
            generation: self.generation(),
            members: self
                .members()
                .into_iter()
                .flatten()
                .map(|m| MemberInfo {
                    member: m.member().to_owned(),
                    topics: read_strings(m.topics()),
                    idle_ms: m.idle_ms(),
                    queues: m.queues(),
                })
                .collect(),
            queues: self
                .queues()
                .into_iter()
                .flatten()
                .map(|q| GroupQueueInfo {
                    topic: q.topic().to_owned(),
                    queue: q.queue(),
                    member: q.member().unwrap_or_default().to_owned(),
                    committed: q.committed().then_some(q.offset()),
                })
                .collect(),
        })
    }
}
