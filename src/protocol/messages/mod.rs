//! Typed requests and responses: the opcode table, and the families of messages it maps.
//!
//! The `opcodes!` invocation below (machinery in `table.rs`) is the one place an opcode is
//! declared: its number, its log name, its [`Request`] and [`Response`] variants and the
//! FlatBuffers table each travels in (a frame's RESPONSE flag says which of the two).
//! [`Opcode`], both enums and every dispatch over them are generated from it. The payload types and the field mapping of each
//! table live in one file per family:
//!
//! | family | opcodes | file |
//! |---|---|---|
//! | admin | Ping 1, BrokerInfo 5, Promote 7 | [`admin`] |
//! | topics | CreateTopic 2, ListTopics 3, GetRoute 4, AlterTopic 8, DeleteTopic 9 | [`topics`] |
//! | stats | BrokerStats 6, QueueStats 12 | [`stats`] |
//! | produce | Produce 10 (body: a message batch) | [`produce`] |
//! | fetch | Fetch 11 (response body: stored batches) | [`fetch`] |
//! | replication | ReplFollow 20; stream only: ReplData 21, ReplAck 22 | [`replication`] |
//! | groups | JoinGroup 30, LeaveGroup 31, CommitOffsets 32, SendBack 33, CreateGroup 34, DescribeGroup 35 | [`groups`] |
//! | transactions | EndTransaction 40, CheckTransactions 41 (response body: half messages), ListTransactions 42 | [`transactions`] |
//!
//! A new request is a row in the table and its types and table mapping in its family's file
//! (a new family: one more file), plus its tables in `schema/ringmq.fbs`.
//!
//! A response with a non-zero status is an error response: empty header, UTF-8 message as body
//! (see [`error_frame`] and [`RemoteError::from_frame`]). Headers from the network are read with
//! the network limits (`header.rs`); a header that fails is a
//! [`WireError::BadHeader`], never a panic. Field-less tables (Ping, ListTopics, BrokerInfo,
//! BrokerStats, Promote requests and Pong) may also be sent as an empty header.
//!
//! ReplData and ReplAck belong to a replication connection (see [`replication`]) and are read
//! only there: [`Request::from_frame`] and [`Response::from_frame`] refuse them with
//! [`WireError::ReplicationStreamOnly`].

use bytes::Bytes;

use super::error::{ErrorCode, RemoteError, WireError};
use super::frame::{Frame, FrameFlags};
use super::limits::MAX_ERROR_MESSAGE_BYTES;

pub mod admin;
pub mod fetch;
pub mod groups;
pub mod produce;
pub mod replication;
pub mod stats;
mod table;
pub mod topics;
pub mod transactions;

pub use admin::BrokerInfo;
pub use fetch::{FetchHeader, FetchRequest};
pub use groups::{
    AssignedQueue, CommitOffsetsRequest, CommittedOffset, GroupDescription, GroupJoined,
    GroupQueueInfo, GroupSettings, JoinGroupRequest, MemberInfo, Membership, SendBackRequest,
    SentBack,
};
pub use produce::{Delay, Durability, ProduceAck, ProduceRequest};
pub use replication::{EpochEntry, ReplAck, ReplData, ReplFollowRequest, ReplFollowResponse};
pub use stats::{QueueStat, ReplicaStats, ShardStats};
pub use topics::{QueueRoute, RouteTable, TopicInfo};
pub use transactions::{
    CheckTransactionsRequest, EndTransactionRequest, OpenTransaction, Transaction,
    TransactionCheck, TransactionEnded, TransactionList, TransactionOutcome, TransactionState,
};

table::opcodes! {
    /// What a frame asks for. Numbers are stable; a retired opcode is never reused.
    pub enum Opcode;

    /// A request, as a client sends it and a broker handles it.
    ///
    /// `Promote` makes the broker that receives it a master and is answered with
    /// [`Response::Promoted`]. `ReplFollow` opens a replication connection and is answered with
    /// [`Response::ReplFollowing`] or an error (REPLICATION_REFUSED); see [`replication`].
    pub enum Request;

    /// A successful response. Errors travel as [`error_frame`]s instead.
    ///
    /// `Promoted` carries the epoch the broker entered as a master. `ReplFollowing` accepts a
    /// follower; the ReplData stream follows on the same connection.
    pub enum Response;

    1 => Ping "PING" {
        request: Ping = PingRequest,
        response: Pong = PongResponse,
    },
    2 => CreateTopic "CREATE_TOPIC" {
        request: CreateTopic { name: String, queues: u32 } = CreateTopicRequest,
        response: TopicCreated { name: String, queues: u32 } = TopicCreatedResponse,
    },
    3 => ListTopics "LIST_TOPICS" {
        request: ListTopics = ListTopicsRequest,
        response: Topics(Vec<TopicInfo>) = ListTopicsResponse,
    },
    4 => GetRoute "GET_ROUTE" {
        request: GetRoute { topic: String } = GetRouteRequest,
        response: Route(RouteTable) = RouteResponse,
    },
    5 => BrokerInfo "BROKER_INFO" {
        request: BrokerInfo = BrokerInfoRequest,
        response: BrokerInfo(BrokerInfo) = BrokerInfoResponse,
    },
    6 => BrokerStats "BROKER_STATS" {
        request: BrokerStats = BrokerStatsRequest,
        response: BrokerStats(Vec<ShardStats>) = BrokerStatsResponse,
    },
    /// Admin: turn this broker (a slave) into a master in a new epoch.
    7 => Promote "PROMOTE" {
        request: Promote = PromoteRequest,
        response: Promoted { epoch: u64 } = PromoteResponse,
    },
    /// Grow a topic's queue count (at shard 0, like CreateTopic).
    8 => AlterTopic "ALTER_TOPIC" {
        request: AlterTopic { name: String, queues: u32 } = AlterTopicRequest,
        response: TopicAltered { name: String, queues: u32 } = AlterTopicResponse,
    },
    /// Delete a topic (at shard 0, like CreateTopic).
    9 => DeleteTopic "DELETE_TOPIC" {
        request: DeleteTopic { name: String } = DeleteTopicRequest,
        response: TopicDeleted { name: String, queues: u32 } = DeleteTopicResponse,
    },
    /// The request body is the message batch.
    10 => Produce "PRODUCE" {
        request: Produce(ProduceRequest) = ProduceRequest,
        response: Produced(ProduceAck) = ProduceResponse,
    },
    /// The response body is the stored batches.
    11 => Fetch "FETCH" {
        request: Fetch(FetchRequest) = FetchRequest,
        response: Fetched(FetchHeader) = FetchResponse,
    },
    12 => QueueStats "QUEUE_STATS" {
        request: QueueStats { topic: String } = QueueStatsRequest,
        response: QueueStats(Vec<QueueStat>) = QueueStatsResponse,
    },
    /// Slave to master, the first frame of a replication connection.
    20 => ReplFollow "REPL_FOLLOW" {
        request: ReplFollow(ReplFollowRequest) = ReplFollowRequest,
        response: ReplFollowing(ReplFollowResponse) = ReplFollowResponse,
    },
    /// Master to slave on a replication connection: raw CommitLog bytes as the body.
    21 => ReplData "REPL_DATA",
    /// Slave to master on a replication connection: received and durable positions.
    22 => ReplAck "REPL_ACK",
    /// Join a consumer group, or heartbeat in it (with the member id the first join gave).
    30 => JoinGroup "JOIN_GROUP" {
        request: JoinGroup(JoinGroupRequest) = JoinGroupRequest,
        response: GroupJoined(GroupJoined) = JoinGroupResponse,
    },
    31 => LeaveGroup "LEAVE_GROUP" {
        request: LeaveGroup { group: String, member: String } = LeaveGroupRequest,
        response: GroupLeft { generation: u64 } = LeaveGroupResponse,
    },
    32 => CommitOffsets "COMMIT_OFFSETS" {
        request: CommitOffsets(CommitOffsetsRequest) = CommitOffsetsRequest,
        response: OffsetsCommitted { durability: Durability, epoch: u64 } = CommitOffsetsResponse,
    },
    /// A member gives back a message it could not process (retry after a delay, or the DLQ).
    33 => SendBack "SEND_BACK" {
        request: SendBack(SendBackRequest) = SendBackRequest,
        response: SentBack(SentBack) = SendBackResponse,
    },
    34 => CreateGroup "CREATE_GROUP" {
        request: CreateGroup(GroupSettings) = CreateGroupRequest,
        response: GroupCreated(GroupSettings) = CreateGroupResponse,
    },
    35 => DescribeGroup "DESCRIBE_GROUP" {
        request: DescribeGroup { group: String } = DescribeGroupRequest,
        response: GroupDescribed(GroupDescription) = DescribeGroupResponse,
    },
    /// Commit or roll back a half message (or answer a check-back), at its real queue's owner.
    40 => EndTransaction "END_TRANSACTION" {
        request: EndTransaction(EndTransactionRequest) = EndTransactionRequest,
        response: TransactionEnded(TransactionEnded) = EndTransactionResponse,
    },
    /// A producer-group member's long poll for check-backs on one shard; the response body
    /// holds the half messages.
    41 => CheckTransactions "CHECK_TRANSACTIONS" {
        request: CheckTransactions(CheckTransactionsRequest) = CheckTransactionsRequest,
        response: TransactionChecks(Vec<TransactionCheck>) = CheckTransactionsResponse,
    },
    42 => ListTransactions "LIST_TRANSACTIONS" {
        request: ListTransactions { shard: u32 } = ListTransactionsRequest,
        response: Transactions(TransactionList) = ListTransactionsResponse,
    },
}

impl Request {
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
        Request::decode(opcode, frame)
    }
}

impl Response {
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
        Response::decode(expected, frame)
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
    use flatbuffers::FlatBufferBuilder;

    use super::*;
    use crate::protocol::generated as fb;
    use crate::protocol::header::finish;

    #[test]
    fn opcode_numbers_are_pinned() {
        let nums: Vec<u16> = Opcode::ALL.iter().map(|o| o.as_u16()).collect();
        assert_eq!(
            nums,
            [
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 30, 31, 32, 33, 34, 35, 40, 41,
                42
            ]
        );
        for o in Opcode::ALL {
            assert_eq!(Opcode::from_u16(o.as_u16()), Some(o));
        }
        for n in [0, 13, 19, 23, 29, 36, 39, 43, u16::MAX] {
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
                known_epoch: 0,
                delay: None,
                transaction: None,
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
