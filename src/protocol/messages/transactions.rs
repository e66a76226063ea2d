//! The transactions family: EndTransaction (40), CheckTransactions (41, a long poll by which
//! a producer-group member takes check-backs) and ListTransactions (42, admin). A half
//! message itself is a Produce with [`Transaction`] set (see `produce.rs`).

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;
use crate::protocol::Durability;

/// The transaction a half message belongs to (a Produce's optional field).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transaction {
    pub producer_group: String,
    /// Unique per transaction, chosen by the producer; a half re-sent with the same id is
    /// a retry (answered with the first one's offsets).
    pub id: String,
}

/// What a producer (or its checker) says about a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionOutcome {
    /// Not decided yet: the broker asks again later.
    Unknown,
    Commit,
    Rollback,
}

/// Where a half message stands at the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionState {
    Open,
    Committed,
    RolledBack,
}

impl TransactionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionOutcome::Unknown => "unknown",
            TransactionOutcome::Commit => "commit",
            TransactionOutcome::Rollback => "rollback",
        }
    }

    fn to_wire(self) -> fb::TransactionOutcome {
        match self {
            TransactionOutcome::Unknown => fb::TransactionOutcome::Unknown,
            TransactionOutcome::Commit => fb::TransactionOutcome::Commit,
            TransactionOutcome::Rollback => fb::TransactionOutcome::Rollback,
        }
    }

    fn from_wire(o: fb::TransactionOutcome) -> Result<Self, String> {
        match o {
            fb::TransactionOutcome::Unknown => Ok(TransactionOutcome::Unknown),
            fb::TransactionOutcome::Commit => Ok(TransactionOutcome::Commit),
            fb::TransactionOutcome::Rollback => Ok(TransactionOutcome::Rollback),
            other => Err(format!("unknown transaction outcome {}", other.0)),
        }
    }
}

impl TransactionState {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionState::Open => "open",
            TransactionState::Committed => "committed",
            TransactionState::RolledBack => "rolled-back",
        }
    }

    fn to_wire(self) -> fb::TransactionState {
        match self {
            TransactionState::Open => fb::TransactionState::Open,
            TransactionState::Committed => fb::TransactionState::Committed,
            TransactionState::RolledBack => fb::TransactionState::RolledBack,
        }
    }

    fn from_wire(s: fb::TransactionState) -> Result<Self, String> {
        match s {
            fb::TransactionState::Open => Ok(TransactionState::Open),
            fb::TransactionState::Committed => Ok(TransactionState::Committed),
            fb::TransactionState::RolledBack => Ok(TransactionState::RolledBack),
            other => Err(format!("unknown transaction state {}", other.0)),
        }
    }
}

/// EndTransaction: sent to the owner of the half message's real queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndTransactionRequest {
    pub topic: String,
    pub queue: u32,
    /// The offset the half message's ack gave.
    pub half_offset: u64,
    pub transaction: Transaction,
    pub outcome: TransactionOutcome,
    /// An answer to a check-back rather than the producer's own end.
    pub from_check: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionEnded {
    pub state: TransactionState,
    /// Committed: the offset of the first message in its real queue.
    pub offset: u64,
    /// The transaction had been ended before; `state` is the first end's.
    pub duplicate: bool,
    pub durability: Durability,
    pub epoch: u64,
}

/// CheckTransactions: a member waits for check-backs of its group on one shard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckTransactionsRequest {
    pub producer_group: String,
    pub member: String,
    pub shard: u32,
    pub max_wait_ms: u32,
}

/// One check-back; its half message is the response body's next `batch_len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionCheck {
    pub topic: String,
    pub queue: u32,
    pub half_offset: u64,
    pub transaction_id: String,
    pub checks: u32,
    pub batch_len: u32,
}

/// An open transaction (ListTransactions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTransaction {
    pub topic: String,
    pub queue: u32,
    pub half_offset: u64,
    pub transaction: Transaction,
    pub age_ms: u64,
    pub checks: u32,
    pub messages: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransactionList {
    pub open: Vec<OpenTransaction>,
    /// Rolled back after the most check-backs since the broker started.
    pub discarded: u64,
    /// Open transactions on the shard; `open` lists the oldest [`MAX_LISTED`] of them.
    pub open_total: u64,
}

/// Most open transactions one ListTransactions answer lists (the header has a size limit).
pub const MAX_LISTED: usize = 1_000;

impl<'a> fb::EndTransactionRequest<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        e: &EndTransactionRequest,
    ) -> WIPOffset<Self> {
        let topic = fbb.create_string(&e.topic);
        let group = fbb.create_string(&e.transaction.producer_group);
        let id = fbb.create_string(&e.transaction.id);
        let args = fb::EndTransactionRequestArgs {
            topic: Some(topic),
            queue: e.queue,
            half_offset: e.half_offset,
            producer_group: Some(group),
            transaction_id: Some(id),
            outcome: e.outcome.to_wire(),
            from_check: e.from_check,
        };
        fb::EndTransactionRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<EndTransactionRequest, String> {
        Ok(EndTransactionRequest {
            topic: self.topic().to_owned(),
            queue: self.queue(),
            half_offset: self.half_offset(),
            transaction: Transaction {
                producer_group: self.producer_group().to_owned(),
                id: self.transaction_id().to_owned(),
            },
            outcome: TransactionOutcome::from_wire(self.outcome())?,
            from_check: self.from_check(),
        })
    }
}

impl<'a> fb::EndTransactionResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, e: &TransactionEnded) -> WIPOffset<Self> {
        let args = fb::EndTransactionResponseArgs {
            state: e.state.to_wire(),
            offset: e.offset,
            duplicate: e.duplicate,
            durability: e.durability.to_wire(),
            epoch: e.epoch,
        };
        fb::EndTransactionResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<TransactionEnded, String> {
        Ok(TransactionEnded {
            state: TransactionState::from_wire(self.state())?,
            offset: self.offset(),
            duplicate: self.duplicate(),
            durability: Durability::from_wire(self.durability()),
            epoch: self.epoch(),
        })
    }
}

impl<'a> fb::CheckTransactionsRequest<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        c: &CheckTransactionsRequest,
    ) -> WIPOffset<Self> {
        let group = fbb.create_string(&c.producer_group);
        let member = fbb.create_string(&c.member);
        let args = fb::CheckTransactionsRequestArgs {
            producer_group: Some(group),
            member: Some(member),
            shard: c.shard,
            max_wait_ms: c.max_wait_ms,
        };
        fb::CheckTransactionsRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<CheckTransactionsRequest, String> {
        Ok(CheckTransactionsRequest {
            producer_group: self.producer_group().to_owned(),
            member: self.member().to_owned(),
            shard: self.shard(),
            max_wait_ms: self.max_wait_ms(),
        })
    }
}

impl<'a> fb::CheckTransactionsResponse<'a> {
    pub(crate) fn encode(
        fbb: &mut FlatBufferBuilder<'a>,
        checks: &[TransactionCheck],
    ) -> WIPOffset<Self> {
        let items: Vec<_> = checks
            .iter()
            .map(|c| {
                let topic = fbb.create_string(&c.topic);
                let id = fbb.create_string(&c.transaction_id);
                let args = fb::TransactionCheckArgs {
                    topic: Some(topic),
                    queue: c.queue,
                    half_offset: c.half_offset,
                    transaction_id: Some(id),
                    checks: c.checks,
                    batch_len: c.batch_len,
                };
                fb::TransactionCheck::create(fbb, &args)
            })
            .collect();
        let checks = fbb.create_vector(&items);
        fb::CheckTransactionsResponse::create(
            fbb,
            &fb::CheckTransactionsResponseArgs {
                checks: Some(checks),
            },
        )
    }

    pub(crate) fn decode(self) -> Result<Vec<TransactionCheck>, String> {
        Ok(self
            .checks()
            .into_iter()
            .flatten()
            .map(|c| TransactionCheck {
                topic: c.topic().to_owned(),
                queue: c.queue(),
                half_offset: c.half_offset(),
                transaction_id: c.transaction_id().to_owned(),
                checks: c.checks(),
                batch_len: c.batch_len(),
            })
            .collect())
    }
}

impl<'a> fb::ListTransactionsRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, shard: &u32) -> WIPOffset<Self> {
        fb::ListTransactionsRequest::create(fbb, &fb::ListTransactionsRequestArgs { shard: *shard })
    }

    pub(crate) fn decode(self) -> Result<u32, String> {
        Ok(self.shard())
    }
}

impl<'a> fb::ListTransactionsResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, l: &TransactionList) -> WIPOffset<Self> {
        let items: Vec<_> = l
            .open
            .iter()
            .map(|o| {
                let topic = fbb.create_string(&o.topic);
                let group = fbb.create_string(&o.transaction.producer_group);
                let id = fbb.create_string(&o.transaction.id);
                let args = fb::OpenTransactionArgs {
                    topic: Some(topic),
                    queue: o.queue,
                    half_offset: o.half_offset,
                    producer_group: Some(group),
                    transaction_id: Some(id),
                    age_ms: o.age_ms,
                    checks: o.checks,
                    messages: o.messages,
                };
                fb::OpenTransaction::create(fbb, &args)
            })
            .collect();
        let open = fbb.create_vector(&items);
        let args = fb::ListTransactionsResponseArgs {
            open: Some(open),
            discarded: l.discarded,
            open_total: l.open_total,
        };
        fb::ListTransactionsResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<TransactionList, String> {
        Ok(TransactionList {
            open: self
                .open()
                .into_iter()
                .flatten()
                .map(|o| OpenTransaction {
                    topic: o.topic().to_owned(),
                    queue: o.queue(),
                    half_offset: o.half_offset(),
                    transaction: Transaction {
                        producer_group: o.producer_group().to_owned(),
                        id: o.transaction_id().to_owned(),
                    },
                    age_ms: o.age_ms(),
                    checks: o.checks(),
                    messages: o.messages(),
                })
                .collect(),
            discarded: self.discarded(),
            open_total: self.open_total(),
        })
    }
}
