//! Typed requests and responses, and their FlatBuffers headers.
//!
//! A frame's opcode says which header table it carries (its RESPONSE flag says whether the
//! request or the response table); the mapping is:
//!
//! | opcode | request header | response header | request body | response body |
//! |---|---|---|---|---|
//! | 1 Ping | `PingRequest` | `PongResponse` | – | – |
//! | 2 CreateTopic | `CreateTopicRequest` | `TopicCreatedResponse` | – | – |
//! | 3 ListTopics | `ListTopicsRequest` | `ListTopicsResponse` | – | – |
//! | 4 GetRoute | `GetRouteRequest` | `RouteResponse` | – | – |
//! | 5 BrokerInfo | `BrokerInfoRequest` | `BrokerInfoResponse` | – | – |
//! | 6 BrokerStats | `BrokerStatsRequest` | `BrokerStatsResponse` | – | – |
//! | 7 Promote | `PromoteRequest` | `PromoteResponse` | – | – |
//! | 10 Produce | `ProduceRequest` | `ProduceResponse` | message batch | – |
//! | 11 Fetch | `FetchRequest` | `FetchResponse` | – | stored batches |
//! | 12 QueueStats | `QueueStatsRequest` | `QueueStatsResponse` | – | – |
//! | 20 ReplFollow | `ReplFollowRequest` | `ReplFollowResponse` | – | – |
//! | 21 ReplData | `ReplData` (ONEWAY, stream only) | – | CommitLog bytes | – |
//! | 22 ReplAck | `ReplAck` (ONEWAY, stream only) | – | – | – |
//!
//! A response with a non-zero status is an error response: empty header, UTF-8 message as body
//! (see [`error_frame`] and [`RemoteError::from_frame`]). Headers from the network are read with
//! [`HEADER_VERIFIER`]'s limits; a header that fails is a [`WireError::BadHeader`], never a panic.
//! Field-less tables (Ping, ListTopics, BrokerInfo, BrokerStats, Promote requests and Pong) may
//! also be sent as an empty header.
//!
//! ReplData and ReplAck belong to a replication connection (see [`super::replication`]) and are
//! read only there: [`Request::from_frame`] and [`Response::from_frame`] refuse them with
//! [`WireError::ReplicationStreamOnly`].

use std::fmt;

use bytes::Bytes;
use flatbuffers::{FlatBufferBuilder, Follow, Verifiable, WIPOffset};

use super::error::{ErrorCode, RemoteError, WireError};
use super::frame::{Frame, FrameFlags};
use super::generated as fb;
use super::limits::{HEADER_VERIFIER, MAX_ERROR_MESSAGE_BYTES};
use super::replication::{ReplFollowRequest, ReplFollowResponse};

/// What a frame asks for. Numbers are stable; a retired opcode is never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    Ping = 1,
    CreateTopic = 2,
    ListTopics = 3,
    GetRoute = 4,
    BrokerInfo = 5,
    BrokerStats = 6,
    /// Admin: turn this broker (a slave) into a master in a new epoch.
    Promote = 7,
    Produce = 10,
    Fetch = 11,
    QueueStats = 12,
    /// Slave to master, the first frame of a replication connection.
    ReplFollow = 20,
    /// Master to slave on a replication connection: raw CommitLog bytes as the body.
    ReplData = 21,
    /// Slave to master on a replication connection: received and durable positions.
    ReplAck = 22,
}

impl Opcode {
    /// Every opcode, in numeric order.
    pub const ALL: [Opcode; 13] = [
        Opcode::Ping,
        Opcode::CreateTopic,
        Opcode::ListTopics,
        Opcode::GetRoute,
        Opcode::BrokerInfo,
        Opcode::BrokerStats,
        Opcode::Promote,
        Opcode::Produce,
        Opcode::Fetch,
        Opcode::QueueStats,
        Opcode::ReplFollow,
        Opcode::ReplData,
        Opcode::ReplAck,
    ];

    /// The number sent on the wire.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// `None` for a number this build does not know.
    pub const fn from_u16(n: u16) -> Option<Opcode> {
        Some(match n {
            1 => Opcode::Ping,
            2 => Opcode::CreateTopic,
            3 => Opcode::ListTopics,
            4 => Opcode::GetRoute,
            5 => Opcode::BrokerInfo,
            6 => Opcode::BrokerStats,
            7 => Opcode::Promote,
            10 => Opcode::Produce,
            11 => Opcode::Fetch,
            12 => Opcode::QueueStats,
            20 => Opcode::ReplFollow,
            21 => Opcode::ReplData,
            22 => Opcode::ReplAck,
            _ => return None,
        })
    }

    /// SCREAMING_SNAKE name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Opcode::Ping => "PING",
            Opcode::CreateTopic => "CREATE_TOPIC",
            Opcode::ListTopics => "LIST_TOPICS",
            Opcode::GetRoute => "GET_ROUTE",
            Opcode::BrokerInfo => "BROKER_INFO",
            Opcode::BrokerStats => "BROKER_STATS",
            Opcode::Promote => "PROMOTE",
            Opcode::Produce => "PRODUCE",
            Opcode::Fetch => "FETCH",
            Opcode::QueueStats => "QUEUE_STATS",
            Opcode::ReplFollow => "REPL_FOLLOW",
            Opcode::ReplData => "REPL_DATA",
            Opcode::ReplAck => "REPL_ACK",
        }
    }

    /// Whether frames with this opcode only travel on a replication connection after the
    /// ReplFollow handshake, never as ordinary requests or responses.
    pub const fn is_replication_stream(self) -> bool {
        matches!(self, Opcode::ReplData | Opcode::ReplAck)
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Header of a Produce request. The message batch itself is the frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRequest {
    pub topic: String,
    /// `None`: the broker picks the queue.
    pub queue: Option<u32>,
    /// 0: not idempotent (no de-duplication).
    pub producer_id: u64,
    pub producer_epoch: u16,
    /// Sequence number of the batch's first message; the broker expects the next one.
    pub base_sequence: u32,
    /// Must equal the number of messages in the body.
    pub message_count: u32,
    /// How long the broker may wait for the durability the flush/replication mode promises.
    pub timeout_ms: u32,
}

/// Header of a Fetch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub topic: String,
    pub queue: u32,
    /// First queue offset wanted.
    pub offset: u64,
    /// Soft cap on the response body (at least one batch is returned if any is visible).
    pub max_bytes: u32,
    /// Long polling: how long to wait for data when none is visible at `offset`.
    pub max_wait_ms: u32,
}

/// A request, as a client sends it and a broker handles it.
///
/// `Promote` makes the broker that receives it a master and is answered with
/// [`Response::Promoted`]. `ReplFollow` opens a replication connection and is answered with
/// [`Response::ReplFollowing`] or an error (REPLICATION_REFUSED); see [`super::replication`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    CreateTopic { name: String, queues: u32 },
    ListTopics,
    GetRoute { topic: String },
    BrokerInfo,
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    QueueStats { topic: String },
    BrokerStats,
    Promote,
    ReplFollow(ReplFollowRequest),
}

/// One topic in a ListTopics response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub queues: u32,
}

/// Which shard owns a queue and where that shard listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRoute {
    pub queue: u32,
    pub shard: u32,
    /// `host:port` of the owning shard's listener.
    pub address: String,
}

/// The route table of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    pub topic: String,
    pub queues: Vec<QueueRoute>,
}

/// What a broker says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    pub version: String,
    pub shards: u32,
    /// `SYNC_FLUSH` or `ASYNC_FLUSH`.
    pub flush_mode: String,
    /// `master` or `slave`.
    pub role: String,
    /// The effective configuration.
    pub config_toml: String,
    /// The broker's current epoch (0 from a broker that predates replication).
    pub epoch: u64,
    /// `host:port` of the master this broker follows; empty when it follows none.
    pub master_address: String,
    /// The replication mode, e.g. `ASYNC_MASTER` or `SYNC_MASTER/durable`; empty from a broker
    /// that predates replication.
    pub replication: String,
    /// `host:port` of each shard's listener, by shard index.
    pub shard_addresses: Vec<String>,
}

/// The ack of a Produce request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceAck {
    pub queue: u32,
    /// Queue offset of the batch's first message; the batch holds `base_offset..base_offset+count`.
    pub base_offset: u64,
    pub count: u32,
    /// The batch had been stored before (an idempotent retry); the offsets are the original ones.
    pub duplicate: bool,
    /// Where the batch's bytes were when the broker answered.
    pub durability: Durability,
    /// The epoch of the master that acked (0 from a broker that predates epochs in acks).
    pub epoch: u64,
}

/// How durable an acked batch is: a ladder, each level saying more than the one before it.
///
/// The broker reports the strongest level its watermarks show when it answers, which may be
/// more than the flush and replication modes wait for (an ASYNC_FLUSH ack whose bytes happened
/// to be synced already says `disk`), never less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Durability {
    /// From a broker that predates this field.
    Unknown,
    /// Appended in the master's memory only (ASYNC_FLUSH): a crash of the broker may lose it.
    Memory,
    /// fdatasync'd on the master's disk.
    Disk,
    /// Also received (appended in memory) by the slave.
    ReplicaReceived,
    /// Also fdatasync'd on the slave's disk.
    ReplicaDurable,
}

impl Durability {
    /// The stable text form printed by the CLI (`level=...`).
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Unknown => "unknown",
            Durability::Memory => "memory",
            Durability::Disk => "disk",
            Durability::ReplicaReceived => "replica-received",
            Durability::ReplicaDurable => "replica-durable",
        }
    }

    fn to_wire(self) -> fb::Durability {
        match self {
            Durability::Unknown => fb::Durability::Unknown,
            Durability::Memory => fb::Durability::Memory,
            Durability::Disk => fb::Durability::Disk,
            Durability::ReplicaReceived => fb::Durability::ReplicaReceived,
            Durability::ReplicaDurable => fb::Durability::ReplicaDurable,
        }
    }

    /// A value this build does not know (from a newer broker) reads as `Unknown`.
    fn from_wire(d: fb::Durability) -> Durability {
        match d {
            fb::Durability::Memory => Durability::Memory,
            fb::Durability::Disk => Durability::Disk,
            fb::Durability::ReplicaReceived => Durability::ReplicaReceived,
            fb::Durability::ReplicaDurable => Durability::ReplicaDurable,
            _ => Durability::Unknown,
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header of a Fetch response; the body is the concatenation of stored batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchHeader {
    pub queue: u32,
    /// Offset to fetch next.
    pub next_offset: u64,
    /// Oldest offset still stored.
    pub min_offset: u64,
    /// One past the newest visible offset.
    pub end_offset: u64,
}

/// Offsets and size of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStat {
    pub queue: u32,
    pub min_offset: u64,
    pub end_offset: u64,
    pub bytes: u64,
}

/// A successful response. Errors travel as [`error_frame`]s instead.
///
/// `Promoted` carries the epoch the broker entered as a master. `ReplFollowing` accepts a
/// follower; the ReplData stream follows on the same connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Pong,
    TopicCreated { name: String, queues: u32 },
    Topics(Vec<TopicInfo>),
    Route(RouteTable),
    BrokerInfo(BrokerInfo),
    Produced(ProduceAck),
    Fetched(FetchHeader),
    QueueStats(Vec<QueueStat>),
    BrokerStats(Vec<ShardStats>),
    Promoted { epoch: u64 },
    ReplFollowing(ReplFollowResponse),
}

/// Counters and watermarks of one shard; log positions are bytes into its CommitLog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardStats {
    pub shard: u32,
    pub written: u64,
    pub durable: u64,
    pub visible: u64,
    pub fsyncs: u64,
    pub appends: u64,
    pub unflushed_bytes: u64,
    pub unflushed_bytes_max: u64,
    pub flush_latency_us_total: u64,
    pub connections: u32,
    pub poisoned: bool,
    /// Replication state of the shard; defaults when the broker predates replication.
    pub replication: ReplicaStats,
}

/// Replication state of one shard, from its own point of view. Travels next to
/// [`ShardStats`] (the wire struct of which has a fixed layout) as a separate struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaStats {
    /// 0 = master, 1 = slave.
    pub role: u8,
    /// Current epoch of this shard's log history.
    pub epoch: u64,
    /// 0 = no peer, 1 = connecting / handshaking, 2 = streaming.
    pub link: u8,
    /// Master: the slave's acknowledged received / durable positions. Slave: its own
    /// appended / durable.
    pub peer_received: u64,
    pub peer_durable: u64,
    /// Master: its own log end. Slave: the master's log end as last heard.
    pub log_end: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub catchup_bytes_per_sec: u64,
    /// Times the replication link (re)connected since start.
    pub connects: u64,
}

impl ReplicaStats {
    pub const ROLE_MASTER: u8 = 0;
    pub const ROLE_SLAVE: u8 = 1;
    pub const LINK_NONE: u8 = 0;
    pub const LINK_CONNECTING: u8 = 1;
    pub const LINK_STREAMING: u8 = 2;

    /// `master` or `slave`; `unknown` for a number from a newer broker, so a report never
    /// fails on it.
    pub const fn role_name(self) -> &'static str {
        match self.role {
            Self::ROLE_MASTER => "master",
            Self::ROLE_SLAVE => "slave",
            _ => "unknown",
        }
    }

    /// `none`, `connecting` or `streaming`; `unknown` for a number from a newer broker.
    pub const fn link_name(self) -> &'static str {
        match self.link {
            Self::LINK_NONE => "none",
            Self::LINK_CONNECTING => "connecting",
            Self::LINK_STREAMING => "streaming",
            _ => "unknown",
        }
    }
}

pub(super) fn finish<T>(mut fbb: FlatBufferBuilder<'_>, root: WIPOffset<T>) -> Bytes {
    fbb.finish_minimal(root);
    Bytes::copy_from_slice(fbb.finished_data())
}

/// Verifies `frame.header` as a `T` with the network limits.
pub(super) fn verify<'a, T>(frame: &'a Frame) -> Result<T::Inner, WireError>
where
    T: Follow<'a> + Verifiable + 'a,
{
    flatbuffers::root_with_opts::<T>(&HEADER_VERIFIER, &frame.header).map_err(|e| {
        WireError::BadHeader {
            request_id: frame.request_id,
            opcode: frame.opcode,
            reason: e.to_string(),
        }
    })
}

/// For field-less tables: an empty header is accepted, anything else must verify.
fn verify_empty<'a, T>(frame: &'a Frame) -> Result<(), WireError>
where
    T: Follow<'a> + Verifiable + 'a,
{
    if !frame.header.is_empty() {
        verify::<T>(frame)?;
    }
    Ok(())
}

impl Request {
    /// The opcode this request is sent with.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Ping => Opcode::Ping,
            Request::CreateTopic { .. } => Opcode::CreateTopic,
            Request::ListTopics => Opcode::ListTopics,
            Request::GetRoute { .. } => Opcode::GetRoute,
            Request::BrokerInfo => Opcode::BrokerInfo,
            Request::Produce(_) => Opcode::Produce,
            Request::Fetch(_) => Opcode::Fetch,
            Request::QueueStats { .. } => Opcode::QueueStats,
            Request::BrokerStats => Opcode::BrokerStats,
            Request::Promote => Opcode::Promote,
            Request::ReplFollow(_) => Opcode::ReplFollow,
        }
    }

    /// Encodes the FlatBuffers header of this request.
    pub fn encode_header(&self) -> Bytes {
        let mut fbb = FlatBufferBuilder::with_capacity(128);
        match self {
            Request::Ping => {
                let root = fb::PingRequest::create(&mut fbb, &fb::PingRequestArgs {});
                finish(fbb, root)
            }
            Request::CreateTopic { name, queues } => {
                let name = fbb.create_string(name);
                let args = fb::CreateTopicRequestArgs {
                    name: Some(name),
                    queues: *queues,
                };
                let root = fb::CreateTopicRequest::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Request::ListTopics => {
                let root = fb::ListTopicsRequest::create(&mut fbb, &fb::ListTopicsRequestArgs {});
                finish(fbb, root)
            }
            Request::GetRoute { topic } => {
                let topic = fbb.create_string(topic);
                let args = fb::GetRouteRequestArgs { topic: Some(topic) };
                let root = fb::GetRouteRequest::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Request::BrokerInfo => {
                let root = fb::BrokerInfoRequest::create(&mut fbb, &fb::BrokerInfoRequestArgs {});
                finish(fbb, root)
            }
            Request::BrokerStats => {
                let root = fb::BrokerStatsRequest::create(&mut fbb, &fb::BrokerStatsRequestArgs {});
                finish(fbb, root)
            }
            Request::Promote => {
                let root = fb::PromoteRequest::create(&mut fbb, &fb::PromoteRequestArgs {});
                finish(fbb, root)
            }
            Request::ReplFollow(f) => f.encode_header(),
            Request::Produce(p) => {
                let topic = fbb.create_string(&p.topic);
                let args = fb::ProduceRequestArgs {
                    topic: Some(topic),
                    queue: p.queue,
                    producer_id: p.producer_id,
                    producer_epoch: p.producer_epoch,
                    base_sequence: p.base_sequence,
                    message_count: p.message_count,
                    timeout_ms: p.timeout_ms,
                };
                let root = fb::ProduceRequest::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Request::Fetch(f) => {
                let topic = fbb.create_string(&f.topic);
                let args = fb::FetchRequestArgs {
                    topic: Some(topic),
                    queue: f.queue,
                    offset: f.offset,
                    max_bytes: f.max_bytes,
                    max_wait_ms: f.max_wait_ms,
                };
                let root = fb::FetchRequest::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Request::QueueStats { topic } => {
                let topic = fbb.create_string(topic);
                let args = fb::QueueStatsRequestArgs { topic: Some(topic) };
                let root = fb::QueueStatsRequest::create(&mut fbb, &args);
                finish(fbb, root)
            }
        }
    }

    /// A request frame (flags clear, status 0). Set [`FrameFlags::ONEWAY`] on the result for a
    /// request that wants no response.
    pub fn to_frame(&self, request_id: u64, body: Bytes) -> Frame {
        Frame {
            opcode: self.opcode().as_u16(),
            flags: FrameFlags::EMPTY,
            request_id,
            status: 0,
            header: self.encode_header(),
            body,
        }
    }

    /// Reads the request in `frame`'s header. The body (a Produce batch) stays in the frame.
    pub fn from_frame(frame: &Frame) -> Result<Request, WireError> {
        let request_id = frame.request_id;
        if frame.flags.is_response() {
            return Err(WireError::WrongDirection {
                request_id,
                expected: "request",
            });
        }
        let opcode = Opcode::from_u16(frame.opcode).ok_or(WireError::UnknownOpcode {
            request_id,
            opcode: frame.opcode,
        })?;
        Ok(match opcode {
            Opcode::Ping => {
                verify_empty::<fb::PingRequest>(frame)?;
                Request::Ping
            }
            Opcode::CreateTopic => {
                let h = verify::<fb::CreateTopicRequest>(frame)?;
                Request::CreateTopic {
                    name: h.name().to_owned(),
                    queues: h.queues(),
                }
            }
            Opcode::ListTopics => {
                verify_empty::<fb::ListTopicsRequest>(frame)?;
                Request::ListTopics
            }
            Opcode::GetRoute => {
                let h = verify::<fb::GetRouteRequest>(frame)?;
                Request::GetRoute {
                    topic: h.topic().to_owned(),
                }
            }
            Opcode::BrokerInfo => {
                verify_empty::<fb::BrokerInfoRequest>(frame)?;
                Request::BrokerInfo
            }
            Opcode::BrokerStats => {
                verify_empty::<fb::BrokerStatsRequest>(frame)?;
                Request::BrokerStats
            }
            Opcode::Promote => {
                verify_empty::<fb::PromoteRequest>(frame)?;
                Request::Promote
            }
            Opcode::ReplFollow => Request::ReplFollow(ReplFollowRequest::from_header(frame)?),
            Opcode::ReplData | Opcode::ReplAck => {
                return Err(WireError::ReplicationStreamOnly {
                    request_id,
                    opcode: frame.opcode,
                })
            }
            Opcode::Produce => {
                let h = verify::<fb::ProduceRequest>(frame)?;
                Request::Produce(ProduceRequest {
                    topic: h.topic().to_owned(),
                    queue: h.queue(),
                    producer_id: h.producer_id(),
                    producer_epoch: h.producer_epoch(),
                    base_sequence: h.base_sequence(),
                    message_count: h.message_count(),
                    timeout_ms: h.timeout_ms(),
                })
            }
            Opcode::Fetch => {
                let h = verify::<fb::FetchRequest>(frame)?;
                Request::Fetch(FetchRequest {
                    topic: h.topic().to_owned(),
                    queue: h.queue(),
                    offset: h.offset(),
                    max_bytes: h.max_bytes(),
                    max_wait_ms: h.max_wait_ms(),
                })
            }
            Opcode::QueueStats => {
                let h = verify::<fb::QueueStatsRequest>(frame)?;
                Request::QueueStats {
                    topic: h.topic().to_owned(),
                }
            }
        })
    }
}

impl Response {
    /// The opcode of the request this response answers.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::Pong => Opcode::Ping,
            Response::TopicCreated { .. } => Opcode::CreateTopic,
            Response::Topics(_) => Opcode::ListTopics,
            Response::Route(_) => Opcode::GetRoute,
            Response::BrokerInfo(_) => Opcode::BrokerInfo,
            Response::Produced(_) => Opcode::Produce,
            Response::Fetched(_) => Opcode::Fetch,
            Response::QueueStats(_) => Opcode::QueueStats,
            Response::BrokerStats(_) => Opcode::BrokerStats,
            Response::Promoted { .. } => Opcode::Promote,
            Response::ReplFollowing(_) => Opcode::ReplFollow,
        }
    }

    /// Encodes the FlatBuffers header of this response.
    pub fn encode_header(&self) -> Bytes {
        let mut fbb = FlatBufferBuilder::with_capacity(128);
        match self {
            Response::Pong => {
                let root = fb::PongResponse::create(&mut fbb, &fb::PongResponseArgs {});
                finish(fbb, root)
            }
            Response::TopicCreated { name, queues } => {
                let name = fbb.create_string(name);
                let args = fb::TopicCreatedResponseArgs {
                    name: Some(name),
                    queues: *queues,
                };
                let root = fb::TopicCreatedResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::Topics(topics) => {
                let items: Vec<_> = topics
                    .iter()
                    .map(|t| {
                        let name = fbb.create_string(&t.name);
                        let args = fb::TopicInfoArgs {
                            name: Some(name),
                            queues: t.queues,
                        };
                        fb::TopicInfo::create(&mut fbb, &args)
                    })
                    .collect();
                let topics = fbb.create_vector(&items);
                let args = fb::ListTopicsResponseArgs {
                    topics: Some(topics),
                };
                let root = fb::ListTopicsResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::Route(route) => {
                let items: Vec<_> = route
                    .queues
                    .iter()
                    .map(|q| {
                        let address = fbb.create_string(&q.address);
                        let args = fb::QueueRouteArgs {
                            queue: q.queue,
                            shard: q.shard,
                            address: Some(address),
                        };
                        fb::QueueRoute::create(&mut fbb, &args)
                    })
                    .collect();
                let queues = fbb.create_vector(&items);
                let topic = fbb.create_string(&route.topic);
                let args = fb::RouteResponseArgs {
                    topic: Some(topic),
                    queues: Some(queues),
                };
                let root = fb::RouteResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::BrokerInfo(info) => {
                let version = fbb.create_string(&info.version);
                let flush_mode = fbb.create_string(&info.flush_mode);
                let role = fbb.create_string(&info.role);
                let config_toml = fbb.create_string(&info.config_toml);
                let master_address = fbb.create_string(&info.master_address);
                let replication = fbb.create_string(&info.replication);
                let addrs: Vec<_> = info
                    .shard_addresses
                    .iter()
                    .map(|a| fbb.create_string(a))
                    .collect();
                let shard_addresses = fbb.create_vector(&addrs);
                let args = fb::BrokerInfoResponseArgs {
                    version: Some(version),
                    shards: info.shards,
                    flush_mode: Some(flush_mode),
                    role: Some(role),
                    config_toml: Some(config_toml),
                    epoch: info.epoch,
                    master_address: Some(master_address),
                    replication: Some(replication),
                    shard_addresses: Some(shard_addresses),
                };
                let root = fb::BrokerInfoResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::Produced(ack) => {
                let args = fb::ProduceResponseArgs {
                    queue: ack.queue,
                    base_offset: ack.base_offset,
                    count: ack.count,
                    duplicate: ack.duplicate,
                    durability: ack.durability.to_wire(),
                    epoch: ack.epoch,
                };
                let root = fb::ProduceResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::Fetched(h) => {
                let args = fb::FetchResponseArgs {
                    queue: h.queue,
                    next_offset: h.next_offset,
                    min_offset: h.min_offset,
                    end_offset: h.end_offset,
                };
                let root = fb::FetchResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::QueueStats(stats) => {
                let items: Vec<fb::QueueStat> = stats
                    .iter()
                    .map(|s| fb::QueueStat::new(s.queue, s.min_offset, s.end_offset, s.bytes))
                    .collect();
                let stats = fbb.create_vector(&items);
                let args = fb::QueueStatsResponseArgs { stats: Some(stats) };
                let root = fb::QueueStatsResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::BrokerStats(shards) => {
                let items: Vec<fb::ShardStats> = shards
                    .iter()
                    .map(|s| {
                        fb::ShardStats::new(
                            s.shard,
                            s.written,
                            s.durable,
                            s.visible,
                            s.fsyncs,
                            s.appends,
                            s.unflushed_bytes,
                            s.unflushed_bytes_max,
                            s.flush_latency_us_total,
                            s.connections,
                            s.poisoned,
                        )
                    })
                    .collect();
                // Entry i of `replicas` describes `shards[i]`; ShardStats' wire layout is fixed.
                let replicas: Vec<fb::ReplicaStats> = shards
                    .iter()
                    .map(|s| {
                        let r = &s.replication;
                        fb::ReplicaStats::new(
                            r.role,
                            r.link,
                            r.epoch,
                            r.peer_received,
                            r.peer_durable,
                            r.log_end,
                            r.lag_bytes,
                            r.lag_ms,
                            r.catchup_bytes_per_sec,
                            r.connects,
                        )
                    })
                    .collect();
                let shards = fbb.create_vector(&items);
                let replicas = fbb.create_vector(&replicas);
                let args = fb::BrokerStatsResponseArgs {
                    shards: Some(shards),
                    replicas: Some(replicas),
                };
                let root = fb::BrokerStatsResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::Promoted { epoch } => {
                let args = fb::PromoteResponseArgs { epoch: *epoch };
                let root = fb::PromoteResponse::create(&mut fbb, &args);
                finish(fbb, root)
            }
            Response::ReplFollowing(f) => f.encode_header(),
        }
    }

    /// A successful response frame (RESPONSE flag, status 0) answering `request_id`.
    pub fn to_frame(&self, request_id: u64, body: Bytes) -> Frame {
        Frame {
            opcode: self.opcode().as_u16(),
            flags: FrameFlags::RESPONSE,
            request_id,
            status: 0,
            header: self.encode_header(),
            body,
        }
    }

    /// Reads the response to a request sent with `expected`. An error response (status != 0)
    /// becomes [`WireError::Remote`]. The body (Fetch records) stays in the frame.
    pub fn from_frame(expected: Opcode, frame: &Frame) -> Result<Response, WireError> {
        let request_id = frame.request_id;
        if !frame.flags.is_response() {
            return Err(WireError::WrongDirection {
                request_id,
                expected: "response",
            });
        }
        if frame.opcode != expected.as_u16() {
            return Err(WireError::OpcodeMismatch {
                request_id,
                expected: expected.as_u16(),
                found: frame.opcode,
            });
        }
        if let Some(error) = RemoteError::from_frame(frame) {
            return Err(WireError::Remote { request_id, error });
        }
        Ok(match expected {
            Opcode::Ping => {
                verify_empty::<fb::PongResponse>(frame)?;
                Response::Pong
            }
            Opcode::CreateTopic => {
                let h = verify::<fb::TopicCreatedResponse>(frame)?;
                Response::TopicCreated {
                    name: h.name().to_owned(),
                    queues: h.queues(),
                }
            }
            Opcode::ListTopics => {
                let h = verify::<fb::ListTopicsResponse>(frame)?;
                let topics = h
                    .topics()
                    .map(|v| {
                        v.iter()
                            .map(|t| TopicInfo {
                                name: t.name().to_owned(),
                                queues: t.queues(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Response::Topics(topics)
            }
            Opcode::GetRoute => {
                let h = verify::<fb::RouteResponse>(frame)?;
                let queues = h
                    .queues()
                    .map(|v| {
                        v.iter()
                            .map(|q| QueueRoute {
                                queue: q.queue(),
                                shard: q.shard(),
                                address: q.address().to_owned(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Response::Route(RouteTable {
                    topic: h.topic().to_owned(),
                    queues,
                })
            }
            Opcode::BrokerInfo => {
                let h = verify::<fb::BrokerInfoResponse>(frame)?;
                Response::BrokerInfo(BrokerInfo {
                    version: h.version().to_owned(),
                    shards: h.shards(),
                    flush_mode: h.flush_mode().to_owned(),
                    role: h.role().to_owned(),
                    config_toml: h.config_toml().to_owned(),
                    epoch: h.epoch(),
                    master_address: h.master_address().unwrap_or_default().to_owned(),
                    replication: h.replication().unwrap_or_default().to_owned(),
                    shard_addresses: h
                        .shard_addresses()
                        .map(|v| v.iter().map(str::to_owned).collect())
                        .unwrap_or_default(),
                })
            }
            Opcode::Produce => {
                let h = verify::<fb::ProduceResponse>(frame)?;
                Response::Produced(ProduceAck {
                    queue: h.queue(),
                    base_offset: h.base_offset(),
                    count: h.count(),
                    duplicate: h.duplicate(),
                    durability: Durability::from_wire(h.durability()),
                    epoch: h.epoch(),
                })
            }
            Opcode::Fetch => {
                let h = verify::<fb::FetchResponse>(frame)?;
                Response::Fetched(FetchHeader {
                    queue: h.queue(),
                    next_offset: h.next_offset(),
                    min_offset: h.min_offset(),
                    end_offset: h.end_offset(),
                })
            }
            Opcode::QueueStats => {
                let h = verify::<fb::QueueStatsResponse>(frame)?;
                let stats = h
                    .stats()
                    .map(|v| {
                        v.iter()
                            .map(|s| QueueStat {
                                queue: s.queue(),
                                min_offset: s.min_offset(),
                                end_offset: s.end_offset(),
                                bytes: s.bytes(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Response::QueueStats(stats)
            }
            Opcode::BrokerStats => {
                let h = verify::<fb::BrokerStatsResponse>(frame)?;
                let mut shards: Vec<ShardStats> = h
                    .shards()
                    .map(|v| {
                        v.iter()
                            .map(|s| ShardStats {
                                shard: s.shard(),
                                written: s.written(),
                                durable: s.durable(),
                                visible: s.visible(),
                                fsyncs: s.fsyncs(),
                                appends: s.appends(),
                                unflushed_bytes: s.unflushed_bytes(),
                                unflushed_bytes_max: s.unflushed_bytes_max(),
                                flush_latency_us_total: s.flush_latency_us_total(),
                                connections: s.connections(),
                                poisoned: s.poisoned(),
                                replication: ReplicaStats::default(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                // Matched by index; an older broker sends no `replicas`, so the defaults stay,
                // and entries beyond the shards describe nothing and are ignored.
                if let Some(replicas) = h.replicas() {
                    for (s, r) in shards.iter_mut().zip(replicas.iter()) {
                        s.replication = ReplicaStats {
                            role: r.role(),
                            epoch: r.epoch(),
                            link: r.link(),
                            peer_received: r.peer_received(),
                            peer_durable: r.peer_durable(),
                            log_end: r.log_end(),
                            lag_bytes: r.lag_bytes(),
                            lag_ms: r.lag_ms(),
                            catchup_bytes_per_sec: r.catchup_bytes_per_sec(),
                            connects: r.connects(),
                        };
                    }
                }
                Response::BrokerStats(shards)
            }
            Opcode::Promote => {
                let h = verify::<fb::PromoteResponse>(frame)?;
                Response::Promoted { epoch: h.epoch() }
            }
            Opcode::ReplFollow => Response::ReplFollowing(ReplFollowResponse::from_header(frame)?),
            Opcode::ReplData | Opcode::ReplAck => {
                return Err(WireError::ReplicationStreamOnly {
                    request_id,
                    opcode: frame.opcode,
                })
            }
        })
    }
}

/// An error response: RESPONSE flag, `status = code`, empty header, `message` (cut to
/// [`MAX_ERROR_MESSAGE_BYTES`] on a character boundary) as the UTF-8 body. `opcode` is echoed
/// raw so an unknown opcode can be answered too.
pub fn error_frame(opcode: u16, request_id: u64, code: ErrorCode, message: &str) -> Frame {
    debug_assert!(code != ErrorCode::Ok, "an error frame needs an error code");
    let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Frame {
        opcode,
        flags: FrameFlags::RESPONSE,
        request_id,
        status: code.as_u16(),
        header: Bytes::new(),
        body: Bytes::copy_from_slice(&message.as_bytes()[..end]),
    }
}

/// The answer to a frame that failed to decode or interpret, if it can be answered: needs the
/// request id from an intact preamble. The caller closes the connection after sending it.
pub fn error_frame_for(opcode: u16, error: &WireError) -> Option<Frame> {
    let request_id = error.request_id()?;
    Some(error_frame(
        opcode,
        request_id,
        error.code(),
        &error.to_string(),
    ))
}

impl RemoteError {
    /// The broker's error in a response frame; `None` when its status is 0 (success).
    pub fn from_frame(frame: &Frame) -> Option<RemoteError> {
        if frame.status == 0 {
            return None;
        }
        Some(RemoteError {
            code: ErrorCode::from_u16(frame.status),
            message: String::from_utf8_lossy(&frame.body).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode_numbers_are_pinned() {
        let nums: Vec<u16> = Opcode::ALL.iter().map(|o| o.as_u16()).collect();
        assert_eq!(nums, [1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 20, 21, 22]);
        for o in Opcode::ALL {
            assert_eq!(Opcode::from_u16(o.as_u16()), Some(o));
        }
        for n in [0, 8, 9, 13, 19, 23, u16::MAX] {
            assert_eq!(Opcode::from_u16(n), None);
        }
    }

    #[test]
    fn produce_with_and_without_queue_round_trips() {
        for queue in [None, Some(0), Some(7)] {
            let req = Request::Produce(ProduceRequest {
                topic: "orders".into(),
                queue,
                producer_id: 42,
                producer_epoch: 3,
                base_sequence: 100,
                message_count: 5,
                timeout_ms: 3000,
            });
            let frame = req.to_frame(9, Bytes::from_static(b"batch"));
            assert_eq!(Request::from_frame(&frame).unwrap(), req);
            assert_eq!(&frame.body[..], b"batch");
        }
    }

    #[test]
    fn field_less_requests_accept_an_empty_header() {
        for req in [
            Request::Ping,
            Request::ListTopics,
            Request::BrokerInfo,
            Request::BrokerStats,
            Request::Promote,
        ] {
            let mut frame = req.to_frame(1, Bytes::new());
            frame.header = Bytes::new();
            assert_eq!(Request::from_frame(&frame).unwrap(), req);
        }
    }

    #[test]
    fn a_header_missing_a_required_field_is_a_bad_header() {
        // A GetRoute frame carrying a Ping header: the required `topic` is absent.
        let mut frame = Request::GetRoute { topic: "t".into() }.to_frame(5, Bytes::new());
        frame.header = Request::Ping.encode_header();
        let err = Request::from_frame(&frame).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::BadHeader {
                    request_id: 5,
                    opcode: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn error_response_becomes_a_remote_error() {
        let frame = error_frame(10, 77, ErrorCode::SystemBusy, "busy, try later");
        let err = Response::from_frame(Opcode::Produce, &frame).unwrap_err();
        let remote = err.remote().unwrap();
        assert_eq!(remote.code, ErrorCode::SystemBusy);
        assert_eq!(remote.message, "busy, try later");
        assert!(remote.is_retriable());
        assert_eq!(err.request_id(), Some(77));
    }

    #[test]
    fn error_message_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let frame = error_frame(1, 1, ErrorCode::Internal, &long);
        assert!(frame.body.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(std::str::from_utf8(&frame.body).is_ok());
    }

    #[test]
    fn a_header_that_fans_out_through_shared_offsets_is_rejected() {
        // 12 000 vector entries all pointing at one table: 48 KB on the wire, under
        // MAX_HEADER_BYTES, but 12 001 tables to the verifier.
        let mut fbb = FlatBufferBuilder::new();
        let name = fbb.create_string("t");
        let one = fb::TopicInfo::create(
            &mut fbb,
            &fb::TopicInfoArgs {
                name: Some(name),
                queues: 1,
            },
        );
        let topics = fbb.create_vector(&vec![one; 12_000]);
        let args = fb::ListTopicsResponseArgs {
            topics: Some(topics),
        };
        let root = fb::ListTopicsResponse::create(&mut fbb, &args);
        let header = finish(fbb, root);
        assert!(header.len() <= crate::protocol::limits::MAX_HEADER_BYTES as usize);
        let mut frame = Response::Topics(vec![]).to_frame(1, Bytes::new());
        frame.header = header;
        let err = Response::from_frame(Opcode::ListTopics, &frame).unwrap_err();
        assert!(matches!(err, WireError::BadHeader { .. }), "{err}");
    }

    #[test]
    fn the_largest_honest_topic_list_passes_the_verifier_limits() {
        let topics: Vec<TopicInfo> = (0..1_500)
            .map(|i| TopicInfo {
                name: format!("topic-{i:010}"),
                queues: 8,
            })
            .collect();
        let resp = Response::Topics(topics);
        let frame = resp.to_frame(1, Bytes::new());
        assert!(frame.header.len() <= crate::protocol::limits::MAX_HEADER_BYTES as usize);
        assert!(
            frame.header.len() > 48 * 1024,
            "test should fill most of the header limit"
        );
        assert_eq!(
            Response::from_frame(Opcode::ListTopics, &frame).unwrap(),
            resp
        );
    }

    #[test]
    fn a_response_with_another_opcode_is_rejected() {
        let frame = Response::Pong.to_frame(3, Bytes::new());
        assert!(matches!(
            Response::from_frame(Opcode::Fetch, &frame),
            Err(WireError::OpcodeMismatch {
                expected: 11,
                found: 1,
                ..
            })
        ));
    }
}
