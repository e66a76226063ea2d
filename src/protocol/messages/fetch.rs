//! The fetch family: Fetch (11). The response's body is the concatenation of stored batches,
//! exactly as the CommitLog holds them.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::protocol::generated as fb;
use crate::protocol::Membership;

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
    /// A group member's fetch: refused unless the member holds the queue in this generation.
    pub group: Option<Membership>,
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

impl<'a> fb::FetchRequest<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, f: &FetchRequest) -> WIPOffset<Self> {
        let topic = fbb.create_string(&f.topic);
        let (group, member) = match &f.group {
            Some(m) => (
                Some(fbb.create_string(&m.group)),
                Some(fbb.create_string(&m.member)),
            ),
            None => (None, None),
        };
        let args = fb::FetchRequestArgs {
            topic: Some(topic),
            queue: f.queue,
            offset: f.offset,
            max_bytes: f.max_bytes,
            max_wait_ms: f.max_wait_ms,
            group,
            member,
            generation: f.group.as_ref().map_or(0, |m| m.generation),
        };
        fb::FetchRequest::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<FetchRequest, String> {
        Ok(FetchRequest {
            topic: self.topic().to_owned(),
            queue: self.queue(),
            offset: self.offset(),
            max_bytes: self.max_bytes(),
            max_wait_ms: self.max_wait_ms(),
            group: self.group().map(|group| Membership {
                group: group.to_owned(),
                member: self.member().unwrap_or_default().to_owned(),
                generation: self.generation(),
            }),
        })
    }
}

impl<'a> fb::FetchResponse<'a> {
    pub(crate) fn encode(fbb: &mut FlatBufferBuilder<'a>, h: &FetchHeader) -> WIPOffset<Self> {
        let args = fb::FetchResponseArgs {
            queue: h.queue,
            next_offset: h.next_offset,
            min_offset: h.min_offset,
            end_offset: h.end_offset,
        };
        fb::FetchResponse::create(fbb, &args)
    }

    pub(crate) fn decode(self) -> Result<FetchHeader, String> {
        Ok(FetchHeader {
            queue: self.queue(),
            next_offset: self.next_offset(),
            min_offset: self.min_offset(),
            end_offset: self.end_offset(),
        })
    }
}
