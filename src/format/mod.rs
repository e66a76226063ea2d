//! The byte formats RingMQ keeps and sends, pure: no I/O, no glommio, nothing from storage,
//! server, shard or client. The broker validates batches with it, storage encodes and parses
//! records with it, and the client and the bench read fetch responses with the same code.
//!
//! # Layout
//! - [`batch`]: the message batch, the body of a Produce request, stored as sent and returned
//!   by Fetch inside records. One parser ([`batch::BatchIter`], [`batch::validate_batch`]) and
//!   one encoder ([`batch::BatchBuilder`]).
//! - [`record`]: the CommitLog record: a 64-byte header, the topic, then a batch as its body.
//!   One parser ([`record::RecordView`], [`record::RecordIter`]) and one encoder
//!   ([`record::build_header`], [`record::encode_record`]).
//!
//! # How the two nest (all integers little-endian; full diagrams in each file)
//!
//! ```text
//!  record (CommitLog, fetch responses: records back to back)
//!  +---------------------------+----------------+--------------------------------------+
//!  | header, 64 bytes          | topic          | body = one message batch, as sent    |
//!  | magic, total_len, crc32,  | (topic_len)    | +---------+---------+-----+          |
//!  | queue, offsets, producer, |                | | message | message | ... |          |
//!  | log_position              |                | +---------+---------+-----+          |
//!  +---------------------------+----------------+--------------------------------------+
//!
//!  message (at least 24 bytes)
//!  +---------+-------------------+-------+-----+-----+-------+---------------+
//!  | len u32 | born_timestamp_ms | flags | key | tag | props | payload       |
//!  +---------+-------------------+-------+-----+-----+-------+---------------+
//! ```
//!
//! Bad input is an error value ([`batch::BatchError`], [`record::RecordError`]), never a panic.

pub mod batch;
pub mod record;
