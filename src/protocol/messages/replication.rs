//! The replication family: the ReplFollow handshake (20) and the two frames a replication
//! connection carries after it, ReplData (21) and ReplAck (22).
//!
//! ```text
//!  slave shard i                                          master shard i
//!    | -- ReplFollow request (20) ---------------------------> |  Request::ReplFollow
//!    | <------------------------- ReplFollow response (20) --- |  Response::ReplFollowing,
//!    |                                                         |  or an error frame
//!    | <--------------------------- ReplData (21, ONEWAY) ---- |  header + raw CommitLog bytes
//!    | -- ReplAck (22, ONEWAY) ------------------------------> |
//!    |                          ...                            |
//! ```
//!
//! # Contract
//! - The handshake is an ordinary request and response, so [`Request`](super::Request) and
//!   [`Response`](super::Response) encode it (through the opcode table); its header types live
//!   here with the rest of the conversation.
//! - After the handshake the connection carries only [`ReplData`] (master to slave) and
//!   [`ReplAck`] (slave to master), both ONEWAY: acks are not answers to particular data frames,
//!   they report positions. These are read with [`ReplData::from_frame`] and
//!   [`ReplAck::from_frame`]; `Request::from_frame` and `Response::from_frame` refuse their
//!   opcodes with [`WireError::ReplicationStreamOnly`], so a client cannot slip one into an
//!   ordinary connection.
//! - A ReplData body is raw CommitLog bytes starting at `position`; an empty body is a
//!   heartbeat that still carries `master_end` and the master's clock. A sender cuts the log
//!   into bodies of at most [`MAX_BODY_BYTES`](crate::protocol::MAX_BODY_BYTES).
//! - Either side may end the stream with an [`error_frame`](super::error_frame) (say
//!   REPLICATION_REFUSED once the master is fenced); `from_frame` turns it into
//!   [`WireError::Remote`] whatever opcode it carries.
//! - Positions are raw byte positions into the shard's CommitLog; the replication layer wraps
//!   them in its typed positions. Whether an epoch history is well ordered is also its
//!   business: this layer only bounds its length ([`MAX_EPOCH_ENTRIES`]).

use std::mem::size_of;

use bytes::Bytes;
use flatbuffers::{FlatBufferBuilder, Vector, WIPOffset};

use super::Opcode;
use crate::protocol::error::{RemoteError, WireError};
use crate::protocol::frame::{Frame, FrameFlags};
use crate::protocol::generated as fb;
use crate::protocol::header::{finish, verify};
use crate::protocol::limits::{MAX_EPOCH_ENTRIES, MAX_HEADER_BYTES};

// A full epoch history must leave most of a header for the rest of the handshake (see
// MAX_EPOCH_ENTRIES): at 16 bytes an entry, a quarter of the header limit at most.
const _: () = assert!(size_of::<fb::EpochEntry>() == 16);
const _: () =
    assert!(MAX_EPOCH_ENTRIES * size_of::<fb::EpochEntry>() <= MAX_HEADER_BYTES as usize / 4);

/// One step of a shard's log history: `epoch` began at CommitLog byte `start`. Histories are
/// listed oldest first, and an epoch ends where the next begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    pub epoch: u64,
    pub start: u64,
}

/// Header of a ReplFollow request: the first frame a slave shard sends to its master shard.
/// The master compares the layout (`shards`, `segment_bytes`) and the histories to decide where
/// the streams diverged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplFollowRequest {
    /// The follower's shard; it follows the master's shard of the same index.
    pub shard: u32,
    /// The follower's shard count; must equal the master's.
    pub shards: u32,
    /// The follower's CommitLog segment size; must equal the master's.
    pub segment_bytes: u64,
    /// One past the last byte of the follower's CommitLog.
    pub log_end: u64,
    /// The follower's epoch history, oldest first, at most [`MAX_EPOCH_ENTRIES`].
    pub epochs: Vec<EpochEntry>,
    /// One past the last byte the follower has made durable (`<= log_end`): the master
    /// credits the follower with this much durable, never with `log_end`.
    pub log_durable: u64,
    /// The follower's node id (the low bits of the epochs it mints); 0 = not sent.
    pub node_id: u32,
}

/// Header of a ReplFollow response: where streaming starts and the master's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplFollowResponse {
    /// The position of the first ReplData; the follower truncates its log here before
    /// appending.
    pub start: u64,
    /// One past the last byte of the master's CommitLog when it answered.
    pub master_end: u64,
    /// Whether the master waits for the follower's durable position (SYNC_MASTER/durable), so
    /// acks must report fdatasync progress promptly.
    pub want_durable: bool,
    /// The master's epoch history, oldest first, at most [`MAX_EPOCH_ENTRIES`].
    pub epochs: Vec<EpochEntry>,
    /// The follower drops its whole log and starts an empty one at `start`: what it lacks
    /// (or diverged on) lies below the oldest segment the master keeps.
    pub reset: bool,
}

/// Header of a ReplData frame, master to slave. The frame body is the CommitLog bytes
/// `position..position + body.len()`; an empty body is a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplData {
    pub position: u64,
    /// One past the last byte of the master's CommitLog when it sent the frame, so the slave
    /// knows its lag in bytes.
    pub master_end: u64,
    /// The master's wall clock (ms since the Unix epoch) when it sent the frame, so the slave
    /// knows its lag in time.
    pub master_time_ms: u64,
    /// The master's confirmed position (RocketMQ 5's confirmOffset): what the master's own
    /// consumers may see. The slave serves reads only below it (and its own durable mark).
    pub confirmed: u64,
}

/// Header of a ReplAck frame, slave to master. Positions only grow; `durable <= received`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplAck {
    /// One past the last byte the slave has appended.
    pub received: u64,
    /// One past the last byte the slave has made durable.
    pub durable: u64,
}

/// A ONEWAY frame of the replication stream.
fn stream_frame(opcode: Opcode, request_id: u64, header: Bytes, body: Bytes) -> Frame {
    Frame {
        opcode: opcode.as_u16(),
        flags: FrameFlags::ONEWAY,
        request_id,
        status: 0,
        header,
        body,
    }
}

/// Checks that `frame` is a stream frame of kind `expected`. An error frame comes first,
/// whatever its opcode: it is the peer's reason for ending the stream and must not be hidden
/// behind an opcode mismatch.
fn check_stream_frame(frame: &Frame, expected: Opcode) -> Result<(), WireError> {
    let request_id = frame.request_id;
    if frame.flags.is_response() {
        if let Some(error) = RemoteError::from_frame(frame) {
            return Err(WireError::Remote { request_id, error });
        }
    }
    if frame.opcode != expected.as_u16() {
        return Err(WireError::OpcodeMismatch {
            request_id,
            expected: expected.as_u16(),
            found: frame.opcode,
        });
    }
    // ONEWAY is what `to_frame` sets but is not required; a RESPONSE has nothing to answer.
    if frame.flags.is_response() {
        return Err(WireError::WrongDirection {
            request_id,
            expected: "replication stream",
        });
    }
    Ok(())
}

impl ReplData {
    /// A frame with flags ONEWAY, opcode ReplData, this header, and `body` (at most
    /// [`MAX_BODY_BYTES`](crate::protocol::MAX_BODY_BYTES), empty for a heartbeat) as the body.
    pub fn to_frame(&self, request_id: u64, body: Bytes) -> Frame {
        let mut fbb = FlatBufferBuilder::with_capacity(64);
        let args = fb::ReplDataArgs {
            position: self.position,
            master_end: self.master_end,
            master_time_ms: self.master_time_ms,
            confirmed: self.confirmed,
        };
        let root = fb::ReplData::create(&mut fbb, &args);
        stream_frame(Opcode::ReplData, request_id, finish(fbb, root), body)
    }

    /// Reads the header of a ReplData frame; the records stay in `frame.body`.
    pub fn from_frame(frame: &Frame) -> Result<ReplData, WireError> {
        check_stream_frame(frame, Opcode::ReplData)?;
        let h = verify::<fb::ReplData>(frame)?;
        Ok(ReplData {
            position: h.position(),
            master_end: h.master_end(),
            master_time_ms: h.master_time_ms(),
            confirmed: h.confirmed(),
        })
    }
}

impl ReplAck {
    /// A frame with flags ONEWAY, opcode ReplAck, this header and no body.
    pub fn to_frame(&self, request_id: u64) -> Frame {
        debug_assert!(self.durable <= self.received, "durable beyond received");
        let mut fbb = FlatBufferBuilder::with_capacity(48);
        let args = fb::ReplAckArgs {
            received: self.received,
            durable: self.durable,
        };
        let root = fb::ReplAck::create(&mut fbb, &args);
        stream_frame(Opcode::ReplAck, request_id, finish(fbb, root), Bytes::new())
    }

    /// Reads the header of a ReplAck frame. `durable <= received` is not checked here: a peer
    /// breaking it is the replication layer's to judge and report.
    pub fn from_frame(frame: &Frame) -> Result<ReplAck, WireError> {
        check_stream_frame(frame, Opcode::ReplAck)?;
        let h = verify::<fb::ReplAck>(frame)?;
        Ok(ReplAck {
            received: h.received(),
            durable: h.durable(),
        })
    }
}

/// Writes an epoch history as a vector of structs.
fn write_epochs<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    epochs: &[EpochEntry],
) -> WIPOffset<Vector<'a, fb::EpochEntry>> {
    debug_assert!(
        epochs.len() <= MAX_EPOCH_ENTRIES,
        "an epoch history of {} entries would be refused by the peer",
        epochs.len()
    );
    let items: Vec<fb::EpochEntry> = epochs
        .iter()
        .map(|e| fb::EpochEntry::new(e.epoch, e.start))
        .collect();
    fbb.create_vector(&items)
}

/// Reads an epoch history, refusing one longer than [`MAX_EPOCH_ENTRIES`] before copying it.
/// Absent reads as empty (a follower that has never been written to).
fn read_epochs(epochs: Option<Vector<'_, fb::EpochEntry>>) -> Result<Vec<EpochEntry>, String> {
    let Some(epochs) = epochs else {
        return Ok(Vec::new());
    };
    if epochs.len() > MAX_EPOCH_ENTRIES {
        return Err(format!(
            "epoch history of {} entries, at most {MAX_EPOCH_ENTRIES} allowed",
            epochs.len()
        ));
    }
    Ok(epochs
        .iter()
        .map(|e| EpochEntry {
            epoch: e.epoch(),
            start: e.start(),
        })
        .collect())
}

impl<'a> fb::ReplFollowRequest<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        f: &ReplFollowRequest,
    ) -> WIPOffset<Self> {
        let epochs = write_epochs(fbb, &f.epochs);
        let args = fb::ReplFollowRequestArgs {
            shard: f.shard,
            shards: f.shards,
            segment_bytes: f.segment_bytes,
            log_end: f.log_end,
            epochs: Some(epochs),
            log_durable: f.log_durable,
            node_id: f.node_id,
        };
        fb::ReplFollowRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<ReplFollowRequest, String> {
        Ok(ReplFollowRequest {
            shard: self.shard(),
            shards: self.shards(),
            segment_bytes: self.segment_bytes(),
            log_end: self.log_end(),
            epochs: read_epochs(self.epochs())?,
            log_durable: self.log_durable(),
            node_id: self.node_id(),
        })
    }
}

impl<'a> fb::ReplFollowResponse<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        f: &ReplFollowResponse,
    ) -> WIPOffset<Self> {
        let epochs = write_epochs(fbb, &f.epochs);
        let args = fb::ReplFollowResponseArgs {
            start: f.start,
            master_end: f.master_end,
            want_durable: f.want_durable,
            epochs: Some(epochs),
            reset: f.reset,
        };
        fb::ReplFollowResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<ReplFollowResponse, String> {
        Ok(ReplFollowResponse {
            start: self.start(),
            master_end: self.master_end(),
            want_durable: self.want_durable(),
            epochs: read_epochs(self.epochs())?,
            reset: self.reset(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{error_frame, ErrorCode, Request};

    #[test]
    fn a_heartbeat_is_a_data_frame_with_an_empty_body() {
        let hb = ReplData {
            position: 4096,
            master_end: 4096,
            master_time_ms: 1_700_000_000_000,
            confirmed: 2048,
        };
        let frame = hb.to_frame(3, Bytes::new());
        assert!(frame.flags.is_oneway());
        assert_eq!(frame.opcode, Opcode::ReplData.as_u16());
        assert_eq!(ReplData::from_frame(&frame).unwrap(), hb);
        assert!(frame.body.is_empty());
    }

    #[test]
    fn an_ack_is_not_read_as_data() {
        let frame = ReplAck {
            received: 10,
            durable: 5,
        }
        .to_frame(1);
        assert_eq!(
            ReplData::from_frame(&frame),
            Err(WireError::OpcodeMismatch {
                request_id: 1,
                expected: Opcode::ReplData.as_u16(),
                found: Opcode::ReplAck.as_u16(),
            })
        );
    }

    #[test]
    fn an_error_frame_ends_the_stream_with_the_peers_reason() {
        let frame = error_frame(
            Opcode::ReplFollow.as_u16(),
            9,
            ErrorCode::ReplicationRefused,
            "fenced: follower is at epoch 4",
        );
        let err = ReplAck::from_frame(&frame).unwrap_err();
        let remote = err.remote().expect("the peer's error");
        assert_eq!(remote.code, ErrorCode::ReplicationRefused);
        assert!(!remote.is_retriable());
    }

    #[test]
    fn a_successful_response_is_not_a_stream_frame() {
        let mut frame = ReplAck {
            received: 1,
            durable: 1,
        }
        .to_frame(2);
        frame.flags = FrameFlags::RESPONSE;
        assert!(matches!(
            ReplAck::from_frame(&frame),
            Err(WireError::WrongDirection { .. })
        ));
    }

    #[test]
    fn an_epoch_history_over_the_limit_is_refused() {
        let mut fbb = FlatBufferBuilder::new();
        let items = vec![fb::EpochEntry::new(1, 0); MAX_EPOCH_ENTRIES + 1];
        let epochs = fbb.create_vector(&items);
        let args = fb::ReplFollowRequestArgs {
            epochs: Some(epochs),
            ..Default::default()
        };
        let root = fb::ReplFollowRequest::create(&mut fbb, &args);
        let frame = Frame {
            opcode: Opcode::ReplFollow.as_u16(),
            flags: FrameFlags::EMPTY,
            request_id: 4,
            status: 0,
            header: finish(fbb, root),
            body: Bytes::new(),
        };
        let err = Request::from_frame(&frame).unwrap_err();
        assert!(
            matches!(err, WireError::BadHeader { request_id: 4, .. }),
            "{err}"
        );
    }
}
