//! The network side of a shard.
//!
//! # Layout
//! - [`listener`]: the accept loop of one shard's port.
//! - [`bounds`]: what one connection may make the broker hold (its byte budget, the
//!   reservation for each response) and the per-listener counters that show it.
//! - [`connection`]: one client connection: a short loop around the sans-io codec, pipelined
//!   requests under an in-flight budget, responses batched into one write.
//! - [`handlers`]: what each request does, including forwarding to the owning shard.
//! - [`error`]: `HandlerError`, the server's error type, and how each lower-layer error maps to
//!   a stable wire `ErrorCode`.

pub mod bounds;
pub mod connection;
pub mod error;
pub mod handlers;
pub mod listener;
