//! The produce family: Produce (10). The request's body is the message batch (see
//! [`crate::format::batch`]), kept by storage without re-encoding; the response is the ack.

use std::fmt;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;
use crate::protocol::Transaction;

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
    /// The newest master epoch the client has seen acking (0: none): a client's report that
    /// a newer master exists (see `replication::state::Replication::on_client_epoch`).
    pub known_epoch: u64,
    /// Delayed delivery; `None`: visible as soon as acked. Delayed batches are not
    /// de-duplicated (send them with producer id 0).
    pub delay: Option<Delay>,
    /// A half message of this transaction: stored, invisible until EndTransaction commits it.
    pub transaction: Option<Transaction>,
}

/// When a delayed batch is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// RocketMQ's delay level 1..=18 (1s 5s 10s 30s 1m 2m ... 2h).
    Level(u32),
    /// At this wall-clock time, Unix ms.
    At(u64),
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
    /// A delayed batch: when it will be delivered (Unix ms); `base_offset` is then its place
    /// in the broker's schedule. 0: stored in its queue.
    pub deliver_at_ms: u64,
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

    pub(crate) fn to_wire(self) -> fb::Durability {
        match self {
            Durability::Unknown => fb::Durability::Unknown,
            Durability::Memory => fb::Durability::Memory,
            Durability::Disk => fb::Durability::Disk,
            Durability::ReplicaReceived => fb::Durability::ReplicaReceived,
            Durability::ReplicaDurable => fb::Durability::ReplicaDurable,
        }
    }

    /// A value this build does not know (from a newer broker) reads as `Unknown`.
    pub(crate) fn from_wire(d: fb::Durability) -> Durability {
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

impl<'a> fb::ProduceRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, p: &ProduceRequest) -> WIPOffset<Self> {
        let topic = fbb.create_string(&p.topic);
        let (group, id) = match &p.transaction {
            Some(t) => (
                Some(fbb.create_string(&t.producer_group)),
                Some(fbb.create_string(&t.id)),
            ),
            None => (None, None),
        };
        let args = fb::ProduceRequestArgs {
            topic: Some(topic),
            queue: p.queue,
            producer_id: p.producer_id,
            producer_epoch: p.producer_epoch,
            base_sequence: p.base_sequence,
            message_count: p.message_count,
            timeout_ms: p.timeout_ms,
            known_epoch: p.known_epoch,
            delay_level: match p.delay {
                Some(Delay::Level(l)) => l,
                _ => 0,
            },
            deliver_at_ms: match p.delay {
                Some(Delay::At(t)) => t,
                _ => 0,
            },
            producer_group: group,
            transaction_id: id,
        };
        fb::ProduceRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<ProduceRequest, String> {
        Ok(ProduceRequest {
            topic: self.topic().to_owned(),
            queue: self.queue(),
            producer_id: self.producer_id(),
            producer_epoch: self.producer_epoch(),
            base_sequence: self.base_sequence(),
            message_count: self.message_count(),
            timeout_ms: self.timeout_ms(),
            known_epoch: self.known_epoch(),
            delay: match (self.delay_level(), self.deliver_at_ms()) {
                (0, 0) => None,
                (0, at) => Some(Delay::At(at)),
                (level, 0) => Some(Delay::Level(level)),
                (level, at) => {
                    return Err(format!(
                        "delay_level {level} and deliver_at_ms {at} both set; one at most"
                    ))
                }
            },
            transaction: match (self.producer_group(), self.transaction_id()) {
                (None | Some(""), None | Some("")) => None,
                (Some(group), Some(id)) if !group.is_empty() && !id.is_empty() => {
                    Some(Transaction {
                        producer_group: group.to_owned(),
                        id: id.to_owned(),
                    })
                }
                _ => {
                    return Err(
                        "a half message needs both producer_group and transaction_id".into(),
                    )
                }
            },
        })
    }
}

impl<'a> fb::ProduceResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, ack: &ProduceAck) -> WIPOffset<Self> {
        let args = fb::ProduceResponseArgs {
            queue: ack.queue,
            base_offset: ack.base_offset,
            count: ack.count,
            duplicate: ack.duplicate,
            durability: ack.durability.to_wire(),
            epoch: ack.epoch,
            deliver_at_ms: ack.deliver_at_ms,
        };
        fb::ProduceResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<ProduceAck, String> {
        Ok(ProduceAck {
            queue: self.queue(),
            base_offset: self.base_offset(),
            count: self.count(),
            duplicate: self.duplicate(),
            durability: Durability::from_wire(self.durability()),
            epoch: self.epoch(),
            deliver_at_ms: self.deliver_at_ms(),
        })
    }
}
