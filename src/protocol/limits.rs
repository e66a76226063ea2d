//! Named limits of the wire protocol. Each is checked before anything is allocated or waited
//! for: a peer can make us hold at most one preamble's worth of bytes before we know whether
//! its frame is acceptable.

use flatbuffers::VerifierOptions;

/// Fixed size of the frame preamble, in bytes.
pub const PREAMBLE_BYTES: usize = 32;

/// Largest FlatBuffers header accepted. Headers carry metadata only (topic names, offsets, a
/// route table, the broker's config); the largest honest one, a ListTopics or BrokerInfo
/// response, stays well under this. The bound keeps header verification cheap and means a
/// header can never be the reason a connection buffers megabytes.
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Largest frame body accepted: a produce batch or a fetch response. It bounds the read buffer
/// of every connection (connections × this is the worst case a broker must survive) and is 4×
/// RocketMQ's default `maxMessageSize`, so large batches still fit.
pub const MAX_BODY_BYTES: u32 = 16 * 1024 * 1024;

/// Most bytes of records one fetch returns, whatever its `max_bytes` asks (a larger ask is
/// capped, not refused). Every fetch in flight is charged this much against its connection's
/// in-flight budget until its response is written, so the cap is what bounds a client that
/// sends fetches and never reads the answers. 8 MiB is 3 ms of the disk's sequential read
/// rate, enough to keep a consumer streaming, half of [`MAX_BODY_BYTES`], and as large as the
/// largest record the store accepts by default, so the "at least one whole record" rule of a
/// fetch never makes a response larger than this.
pub const MAX_FETCH_BYTES: u32 = 8 * 1024 * 1024;

/// Most a half-received frame makes the decode buffer reserve ahead of the bytes that have
/// arrived: the reservation grows with the frame (at most this much, or as much again as has
/// arrived, whichever is larger), never to the announced length up front. So a peer that
/// announces 16 MiB and sends 40 bytes costs kilobytes, not 16 MiB; large frames still fill a
/// buffer in a logarithmic number of reallocations.
pub const PARTIAL_FRAME_RESERVE_BYTES: usize = 64 * 1024;

/// Largest whole frame: preamble, header and body at their limits.
pub const MAX_FRAME_BYTES: usize =
    PREAMBLE_BYTES + MAX_HEADER_BYTES as usize + MAX_BODY_BYTES as usize;

/// Largest number of messages in one produce batch. Each message gets its own queue offset
/// and index work; the bound keeps a single batch's indexing bounded (a 16 MiB body of minimal
/// 24-byte messages would otherwise be ~700 000 messages).
pub const MAX_BATCH_MESSAGES: u32 = 65_536;

/// Longest topic name, in bytes: RocketMQ's `TOPIC_MAX_LENGTH`. A topic name is a directory
/// name (`consumequeue/<topic>/`) and travels in every record header, so the bound is one
/// rule for the wire, the topic table and storage. It leaves 120 bytes for the group in the
/// internal `%RETRY%<group>` and `%DLQ%<group>` topics that consumer groups will create.
pub const MAX_TOPIC_NAME_BYTES: usize = 127;

/// The one topic-name rule, applied by the topic table (creates, and the table read at start)
/// and by storage (every append): 1 to [`MAX_TOPIC_NAME_BYTES`] bytes of ASCII letters, digits
/// and `_ - . %`, and not `.` or `..`. The `%` is for RocketMQ-style internal names
/// (`%RETRY%<group>`, `%DLQ%<group>`). RocketMQ's `|` is not allowed: it has no use here and a
/// topic name is a directory name an operator types in a shell. `Err` says why, for the
/// refusal sent to the client.
pub fn validate_topic_name(name: &str) -> Result<(), &'static str> {
    const _: () = assert!(MAX_TOPIC_NAME_BYTES == 127, "update the message below");
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_TOPIC_NAME_BYTES {
        return Err("it is longer than 127 bytes");
    }
    if name == "." || name == ".." {
        return Err("it is a directory alias");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'%'))
    {
        return Err("only letters, digits and _ - . % are allowed");
    }
    Ok(())
}

/// Longest consumer-group name: what is left of a topic name after `%RETRY%`.
pub const MAX_GROUP_NAME_BYTES: usize = MAX_TOPIC_NAME_BYTES - "%RETRY%".len();

/// The consumer-group name rule: 1 to [`MAX_GROUP_NAME_BYTES`] bytes of ASCII letters, digits
/// and `_ - .`, so that `%RETRY%<group>` and `%DLQ%<group>` are valid topic names and no group
/// can be named like an internal topic (no `%`). `Err` says why.
pub fn validate_group_name(name: &str) -> Result<(), &'static str> {
    const _: () = assert!(MAX_GROUP_NAME_BYTES == 120, "update the message below");
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_GROUP_NAME_BYTES {
        return Err("it is longer than 120 bytes");
    }
    if name == "." || name == ".." {
        return Err("it is a directory alias");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("only letters, digits and _ - . are allowed");
    }
    Ok(())
}

/// Batches of one queue an idempotent producer may have sent and not yet seen acknowledged,
/// and so the batches per producer and queue the broker remembers for de-duplication. Shared
/// by both sides so that every batch a producer may retry is still in the broker's window: a
/// retry of any of them gets its original offsets. 128 batches of the client's default 64 KiB
/// are 8 MiB in flight per queue, far more than one queue's pipeline needs on one disk; the
/// broker's cost is 128 × 32 bytes = 4 KiB per producer and queue.
pub const PRODUCER_WINDOW_BATCHES: usize = 128;

/// Most entries in an epoch history (ReplFollow request and response). A shard gains one entry
/// per promotion, so a thousand is decades of failovers; at 16 bytes each the history stays at
/// 16 KiB, a quarter of [`MAX_HEADER_BYTES`], leaving room for the rest of the header. Checked
/// before the entries are copied out of the header.
pub const MAX_EPOCH_ENTRIES: usize = 1024;

/// Longest error message put in an error response body. Error text is for humans; cutting it
/// keeps a pathological error (say, one quoting user input) from producing a large frame.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4 * 1024;

/// Deepest table nesting in any header. The deepest schema path is root → vector → table, so 3
/// would do; 8 leaves room for additive schema changes without a new release.
pub const MAX_HEADER_DEPTH: usize = 8;

/// Most tables in one header: one per entry of the longest list (topics, routes) plus the root.
/// A 64 KiB header cannot honestly hold more than a few thousand tables.
pub const MAX_HEADER_TABLES: usize = 8 * 1024;

/// Verifier options for every header read from the network. The apparent size counts shared
/// vtables once per table that uses them, so it is allowed to exceed the header length, but
/// only by a small factor: this stops a header of a few KiB that fans out into gigabytes of
/// "apparent" data through shared offsets.
pub const HEADER_VERIFIER: VerifierOptions = VerifierOptions {
    max_depth: MAX_HEADER_DEPTH,
    max_tables: MAX_HEADER_TABLES,
    max_apparent_size: 4 * MAX_HEADER_BYTES as usize,
    ignore_missing_null_terminator: false,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_one_rule() {
        let longest = "t".repeat(MAX_TOPIC_NAME_BYTES);
        let group = "g".repeat(MAX_TOPIC_NAME_BYTES - "%RETRY%".len());
        for ok in ["orders", "a.b-c_d", "%DLQ%g1", longest.as_str()] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_topic_name(&format!("%RETRY%{group}")), Ok(()));
        assert_eq!(validate_topic_name(&format!("%DLQ%{group}")), Ok(()));
        let too_long = "t".repeat(MAX_TOPIC_NAME_BYTES + 1);
        for bad in ["", ".", "..", "a|b", "a b", "a/b", "é", too_long.as_str()] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
