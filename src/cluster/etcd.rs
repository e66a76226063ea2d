//! A small blocking etcd v3 client: JSON over etcd's gRPC gateway (`/v3/...`), one HTTP/1.1
//! POST per call on a fresh `TcpStream`, no async runtime, no protoc.
//!
//! It runs on a broker's control thread or in the CLI, never on a shard executor: a call
//! blocks for up to two timeouts per endpoint (connect, then the exchange).
//!
//! # Endpoints and failover
//! A call starts at the endpoint that answered last and tries each endpoint at most once. It
//! moves on when an endpoint cannot be reached, times out, or answers that it cannot serve
//! now (HTTP 503, gRPC `Unavailable`: "no leader", "leader changed", "request timed out";
//! "raft proposal dropped").
//! Every request carries the `hasleader` metadata, so a member cut off from its cluster says
//! "no leader" at once instead of holding the request until etcd's own timeout. Any other
//! error is etcd's answer and is returned as [`EtcdError::Refused`] without trying further.
//!
//! # Retries and the three transactions
//! A request that reached an endpoint before it failed may have been applied there; the next
//! endpoint then sees its effect. The transactions are written so a retry is harmless:
//! [`Etcd::create_if_absent`] retried after its key was created under the caller's lease with
//! the caller's value reports the creation as its own (a lease is unique to its grantor);
//! [`Etcd::put_if_guard`] is a put and may simply repeat; [`Etcd::delete_if_created_at`]
//! retried after it deleted reports `false`, which for a resigning master means the same: the
//! key is no longer its.
//!
//! # Wire details (etcd 3.4 gateway)
//! Keys and values are base64 (standard alphabet, padded); int64 fields are JSON strings;
//! fields at their zero value are left out (an absent `TTL` is 0, an absent `succeeded` is
//! false). The keepalive answer is a stream: `{"result":{...}}` in a chunked body. Errors are
//! `{"error":"..","message":"..","code":N}` with an HTTP error status, or
//! `{"error":{"grpc_code":N,"http_code":N,"message":".."}}` inside a stream.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// The largest response body accepted. Our biggest answer is a prefix read of a cluster's
/// registrations (kilobytes); the cap bounds what a broken or hostile endpoint can make a
/// control thread buffer.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// The largest status line plus headers accepted (etcd sends about 300 bytes).
const MAX_HEAD_BYTES: usize = 64 << 10;

/// The longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE_BYTES: usize = 1024;

/// gRPC status `Unavailable`: the member cannot serve now, another one may.
const GRPC_UNAVAILABLE: i64 = 14;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (each tried once); `detail` names each endpoint's failure.
    #[error("etcd unreachable ({endpoints}): {detail}")]
    Unreachable { endpoints: String, detail: String },
    /// An endpoint answered with an HTTP error or a gRPC error body ({"error":..,"code":..}).
    #[error("etcd {endpoint}: {detail}")]
    Refused { endpoint: String, detail: String },
    /// An answer we could not parse.
    #[error("etcd {endpoint}: unexpected answer: {detail}")]
    Protocol { endpoint: String, detail: String },
    #[error("etcd endpoints: {0}")]
    BadEndpoints(String),
}

/// One key as etcd keeps it. `lease` is 0 for a key without a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub lease: u64,
}

/// A blocking etcd v3 client over a fixed list of endpoints. Cheap to share between threads
/// (`&self` everywhere); holds no connection between calls.
#[derive(Debug)]
pub struct Etcd {
    /// `host:port`, in the order given.
    endpoints: Vec<String>,
    /// Connect timeout, and separately the time the whole exchange after it may take.
    timeout: Duration,
    /// The endpoint that answered last: the next call starts there.
    last: AtomicUsize,
}

/// A successful exchange: the answer's JSON (a stream's first `result`), who gave it, and
/// whether an earlier endpoint may already have applied the same request.
struct Answer {
    json: Value,
    endpoint: String,
    maybe_applied_before: bool,
}

impl Answer {
    fn protocol(&self, detail: impl Into<String>) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoint.clone(),
            detail: detail.into(),
        }
    }

    /// `header.revision`, the store's revision after this request.
    fn revision(&self) -> Result<u64, EtcdError> {
        int(&self.json["header"], "revision").map_err(|e| self.protocol(e))
    }

    /// `succeeded` of a txn answer (absent when false).
    fn succeeded(&self) -> Result<bool, EtcdError> {
        match &self.json["succeeded"] {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            other => Err(self.protocol(format!("`succeeded` is {other}"))),
        }
    }

    /// The `kvs` of a range answer (absent when none).
    fn kvs(&self, range: &Value) -> Result<Vec<KeyValue>, EtcdError> {
        match &range["kvs"] {
            Value::Null => Ok(Vec::new()),
            Value::Array(kvs) => kvs
                .iter()
                .map(|kv| key_value(kv).map_err(|e| self.protocol(e)))
                .collect(),
            other => Err(self.protocol(format!("`kvs` is {other}"))),
        }
    }
}

/// Why one endpoint did not give an answer.
enum Attempt {
    /// Try the next endpoint. `sent`: the whole request reached this one, so it may have
    /// been applied.
    Next { detail: String, sent: bool },
    /// An answer that ends the call.
    Stop(EtcdError),
}

impl Etcd {
    /// Endpoints as `host:port` (each item may itself be a comma-separated list); no I/O.
    /// An `http://` prefix (and a trailing `/`) is accepted and stripped; `https://` is
    /// refused, as this client speaks no TLS. Rejects an empty list, an empty item, an item
    /// without a port, and a zero timeout.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        if timeout.is_zero() {
            return Err(EtcdError::BadEndpoints(
                "the timeout must be more than zero".into(),
            ));
        }
        let mut parsed = Vec::new();
        for item in endpoints.iter().flat_map(|e| Self::parse_endpoints(e)) {
            parsed.push(endpoint(&item).map_err(EtcdError::BadEndpoints)?);
        }
        if parsed.is_empty() {
            return Err(EtcdError::BadEndpoints("no endpoint given".into()));
        }
        Ok(Etcd {
            endpoints: parsed,
            timeout,
            last: AtomicUsize::new(0),
        })
    }

    /// `"h1:p1, h2:p2"` → `["h1:p1", "h2:p2"]`: split on `,`, each item trimmed. Empty items
    /// are kept, so [`Etcd::new`] can refuse them.
    pub fn parse_endpoints(list: &str) -> Vec<String> {
        list.split(',').map(|s| s.trim().to_string()).collect()
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint that answered last (the first one before any call): where the next call
    /// starts. For logs and for tests that kill the member in use.
    pub fn last_endpoint(&self) -> &str {
        &self.endpoints[self.last.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    /// Grants a lease of `ttl_secs` (etcd raises it to its minimum TTL); returns its id.
    pub fn grant_lease(&self, ttl_secs: u64) -> Result<u64, EtcdError> {
        let a = self.call("/v3/lease/grant", &json!({ "TTL": ttl_secs }))?;
        match int(&a.json, "ID") {
            Ok(0) => Err(a.protocol("no lease ID in the grant")),
            Ok(id) => Ok(id),
            Err(e) => Err(a.protocol(e)),
        }
    }

    /// Renews `lease` once: `Some(seconds left)`, or `None` when the lease is gone (expired
    /// or revoked) and cannot be renewed any more.
    pub fn keep_alive(&self, lease: u64) -> Result<Option<u64>, EtcdError> {
        let a = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        match int(&a.json, "TTL") {
            Ok(0) => Ok(None),
            Ok(ttl) => Ok(Some(ttl)),
            Err(e) => Err(a.protocol(e)),
        }
    }

    /// Seconds `lease` has left and was granted with, `None` if it is gone (etcd says TTL -1).
    pub fn time_to_live(&self, lease: u64) -> Result<Option<(u64, u64)>, EtcdError> {
        let a = self.call("/v3/lease/timetolive", &json!({ "ID": lease.to_string() }))?;
        if matches!(&a.json["TTL"], Value::String(s) if s == "-1")
            || a.json["TTL"].as_i64() == Some(-1)
        {
            return Ok(None);
        }
        let left = int(&a.json, "TTL").map_err(|e| a.protocol(e))?;
        let granted = int(&a.json, "grantedTTL").map_err(|e| a.protocol(e))?;
        Ok(Some((left, granted)))
    }

    /// Revokes `lease`, deleting every key attached to it. A lease already gone is `Ok`.
    pub fn revoke_lease(&self, lease: u64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { detail, .. }) if detail.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts `key` (attached to `lease` if given); returns the revision after the put.
    pub fn put(&self, key: &str, value: &[u8], lease: Option<u64>) -> Result<u64, EtcdError> {
        self.call("/v3/kv/put", &put_request(key, value, lease))?
            .revision()
    }

    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let a = self.call("/v3/kv/range", &json!({ "key": encode(key.as_bytes()) }))?;
        Ok(a.kvs(&a.json)?.into_iter().next())
    }

    /// Every key that starts with `prefix`, sorted by key (bytewise).
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        // An empty prefix is every key: from "\0" to the end ("\0" as range_end).
        let key = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        let request = json!({
            "key": encode(&key),
            "range_end": encode(&prefix_end(prefix.as_bytes())),
        });
        let a = self.call("/v3/kv/range", &request)?;
        let mut kvs = a.kvs(&a.json)?;
        kvs.sort_by(|x, y| x.key.cmp(&y.key));
        Ok(kvs)
    }

    /// Txn: create `key` only if absent. `Ok(Ok(kv as created, with its create_revision))`
    /// or `Ok(Err(the existing kv))`. See the module doc for a retry after an ambiguous
    /// failure.
    pub fn create_if_absent(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<u64>,
    ) -> Result<Result<KeyValue, KeyValue>, EtcdError> {
        let request = json!({
            "compare": [create_revision_is(key, 0)],
            "success": [{ "request_put": put_request(key, value, lease) }],
            "failure": [{ "request_range": { "key": encode(key.as_bytes()) } }],
        });
        let a = self.call("/v3/kv/txn", &request)?;
        if a.succeeded()? {
            let revision = a.revision()?;
            return Ok(Ok(KeyValue {
                key: key.to_string(),
                value: value.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                lease: lease.unwrap_or(0),
            }));
        }
        let range = &a.json["responses"][0]["response_range"];
        let Some(existing) = a.kvs(range)?.into_iter().next() else {
            return Err(a.protocol("a failed create-if-absent txn without the existing key"));
        };
        // Our own earlier attempt, applied by an endpoint that then failed to answer: our
        // lease is ours alone, so a key under it with our value is the one we created.
        let ours = lease.is_some_and(|l| l != 0 && existing.lease == l) && existing.value == value;
        if a.maybe_applied_before && ours {
            return Ok(Ok(existing));
        }
        Ok(Err(existing))
    }

    /// Txn: put `key` only while `guard` still exists with this create_revision (a master
    /// writing under its election key). `Ok(false)` when the guard is gone or was re-created
    /// (and for a `guard_create_revision` of 0, which no existing key has).
    pub fn put_if_guard(
        &self,
        guard: &str,
        guard_create_revision: u64,
        key: &str,
        value: &[u8],
        lease: Option<u64>,
    ) -> Result<bool, EtcdError> {
        if guard_create_revision == 0 {
            return Ok(false);
        }
        let request = json!({
            "compare": [create_revision_is(guard, guard_create_revision)],
            "success": [{ "request_put": put_request(key, value, lease) }],
        });
        self.call("/v3/kv/txn", &request)?.succeeded()
    }

    /// Txn: delete `key` only if its create_revision is this (resigning an election).
    /// `Ok(false)` if it was not (or is gone, or `create_revision` is 0).
    pub fn delete_if_created_at(&self, key: &str, create_revision: u64) -> Result<bool, EtcdError> {
        if create_revision == 0 {
            return Ok(false);
        }
        let request = json!({
            "compare": [create_revision_is(key, create_revision)],
            "success": [{ "request_delete_range": { "key": encode(key.as_bytes()) } }],
        });
        self.call("/v3/kv/txn", &request)?.succeeded()
    }

    /// POSTs `body` to `path`, endpoint after endpoint (see the module doc).
    fn call(&self, path: &str, body: &Value) -> Result<Answer, EtcdError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let start = self.last.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        let mut maybe_applied_before = false;
        for k in 0..n {
            let i = (start + k) % n;
            let endpoint = &self.endpoints[i];
            match self.attempt(endpoint, path, &body) {
                Ok(json) => {
                    self.last.store(i, Ordering::Relaxed);
                    return Ok(Answer {
                        json,
                        endpoint: endpoint.clone(),
                        maybe_applied_before,
                    });
                }
                Err(Attempt::Next { detail, sent }) => {
                    failures.push(format!("{endpoint}: {detail}"));
                    maybe_applied_before |= sent;
                }
                Err(Attempt::Stop(e)) => {
                    self.last.store(i, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(","),
            detail: failures.join("; "),
        })
    }

    /// Connects to `endpoint` and sends one POST of `body` to `path`.
    fn send(&self, endpoint: &str, path: &str, body: &str) -> Result<TcpStream, String> {
        let addrs = endpoint
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve: {e}"))?;
        let mut stream = None;
        let mut connect_error = format!("{endpoint} resolves to no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) if addr.to_string() == endpoint => connect_error = format!("connect: {e}"),
                Err(e) => connect_error = format!("connect {addr}: {e}"),
            }
        }
        let mut stream = stream.ok_or(connect_error)?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
             Grpc-Metadata-hasleader: true\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| stream.write_all(request.as_bytes()))
            .map_err(|e| format!("send: {e}"))?;
        Ok(stream)
    }

    /// Opens a watch on `key` from now on: at the endpoint that answered last, else the next
    /// ones. etcd's gateway answers a watch with a chunked body that never ends, one JSON
    /// message per event batch; read them with [`KeyWatch::next`].
    pub fn watch(&self, key: &str) -> Result<KeyWatch, EtcdError> {
        let body = json!({ "create_request": { "key": encode(key.as_bytes()) } }).to_string();
        self.open_watch(&body)
    }

    /// Like [`Etcd::watch`], on every key that starts with `prefix`.
    pub fn watch_prefix(&self, prefix: &str) -> Result<KeyWatch, EtcdError> {
        let body = json!({ "create_request": {
            "key": encode(prefix.as_bytes()),
            "range_end": encode(&prefix_end(prefix.as_bytes())),
        } })
        .to_string();
        self.open_watch(&body)
    }

    fn open_watch(&self, body: &str) -> Result<KeyWatch, EtcdError> {
        let n = self.endpoints.len();
        let start = self.last.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for k in 0..n {
            let endpoint = &self.endpoints[(start + k) % n];
            match self.send(endpoint, "/v3/watch", body) {
                Ok(stream) => {
                    return Ok(KeyWatch {
                        stream,
                        endpoint: endpoint.clone(),
                        raw: Vec::new(),
                        data: Vec::new(),
                        in_body: false,
                    })
                }
                Err(detail) => failures.push(format!("{endpoint}: {detail}")),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(","),
            detail: failures.join("; "),
        })
    }

    /// One request to one endpoint.
    fn attempt(&self, endpoint: &str, path: &str, body: &str) -> Result<Value, Attempt> {
        let next = |detail: String, sent: bool| Attempt::Next { detail, sent };
        let mut stream = self
            .send(endpoint, path, body)
            .map_err(|detail| next(detail, false))?;
        let deadline = Instant::now() + self.timeout;

        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        let response = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(next(format!("no answer within {:?}", self.timeout), true));
            }
            let read = stream
                .set_read_timeout(Some(left))
                .and_then(|()| stream.read(&mut chunk));
            let eof = match read {
                Ok(0) => true,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(next(format!("no answer within {:?}", self.timeout), true));
                }
                Err(e) => return Err(next(format!("receive: {e}"), true)),
            };
            match parse_response(&buf, eof) {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(detail) => {
                    return Err(Attempt::Stop(EtcdError::Protocol {
                        endpoint: endpoint.to_string(),
                        detail,
                    }))
                }
            }
        };
        interpret(endpoint, response)
    }
}

/// What one message of a watch said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchNews {
    /// The watch is in place: every change from now on comes as [`WatchNews::Changed`].
    Created,
    /// The key was put or deleted (one or more events).
    Changed,
    /// A message without events (a progress notification).
    Progress,
}

/// An open watch on one key: one HTTP connection whose answer does not end.
pub struct KeyWatch {
    stream: TcpStream,
    endpoint: String,
    /// Bytes received and not yet taken apart (the head, then chunks).
    raw: Vec<u8>,
    /// Chunk data not yet parsed as messages.
    data: Vec<u8>,
    /// The head was read and said 200 and chunked.
    in_body: bool,
}

impl KeyWatch {
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn broken(&self, detail: impl Into<String>) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoint.clone(),
            detail: detail.into(),
        }
    }

    /// The next message, waiting up to `wait` for it: `Ok(None)` when none came in time. An
    /// error ends the watch (the connection closed, etcd cancelled the watch or answered
    /// with an error, or sent what does not parse): open a new one.
    pub fn next(&mut self, wait: Duration) -> Result<Option<WatchNews>, EtcdError> {
        let deadline = Instant::now() + wait;
        let mut chunk = vec![0u8; 16 << 10];
        loop {
            if let Some(news) = self.parsed()? {
                return Ok(Some(news));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let read = self
                .stream
                .set_read_timeout(Some(left))
                .and_then(|()| self.stream.read(&mut chunk));
            match read {
                Ok(0) => return Err(self.broken("the watch connection closed")),
                Ok(n) => {
                    if self.raw.len() + n > MAX_BODY_BYTES {
                        return Err(self.broken("a watch message over the size limit"));
                    }
                    self.raw.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(self.broken(format!("receive: {e}"))),
            }
        }
    }

    /// A complete message from what was received, if there is one.
    fn parsed(&mut self) -> Result<Option<WatchNews>, EtcdError> {
        if !self.in_body {
            let Some(head) = parse_head(&self.raw, false).map_err(|e| self.broken(e))? else {
                return Ok(None);
            };
            if head.status != 200 || !head.chunked {
                let body = String::from_utf8_lossy(&self.raw[head.len..]).into_owned();
                return Err(self.broken(format!(
                    "the watch was answered with HTTP {}: {}",
                    head.status,
                    excerpt(body.as_bytes())
                )));
            }
            self.raw.drain(..head.len);
            self.in_body = true;
        }
        if take_chunks(&mut self.raw, &mut self.data).map_err(|e| self.broken(e))? {
            return Err(self.broken("etcd ended the watch"));
        }
        let mut messages = serde_json::Deserializer::from_slice(&self.data).into_iter::<Value>();
        let message = match messages.next() {
            None => return Ok(None),
            Some(Err(e)) if e.is_eof() => return Ok(None),
            Some(Err(e)) => return Err(self.broken(format!("a watch message: {e}"))),
            Some(Ok(m)) => m,
        };
        let used = messages.byte_offset();
        self.data.drain(..used);
        watch_news(&message).map_err(|e| self.broken(e)).map(Some)
    }
}

/// What a watch message says, or the error or cancellation it carries.
fn watch_news(message: &Value) -> Result<WatchNews, String> {
    if let Value::Object(o) = message {
        if o.contains_key("error") {
            let (code, text) = grpc_error(o);
            return Err(format!(
                "the watch failed: {text}{}",
                code.map_or(String::new(), |c| format!(" (code {c})"))
            ));
        }
    }
    let result = &message["result"];
    if !result.is_object() {
        return Err(format!("a watch message without a result: {message}"));
    }
    if result["canceled"].as_bool() == Some(true) {
        return Err(format!(
            "etcd cancelled the watch: {}",
            result["cancel_reason"]
                .as_str()
                .unwrap_or("no reason given")
        ));
    }
    if result["created"].as_bool() == Some(true) {
        return Ok(WatchNews::Created);
    }
    match &result["events"] {
        Value::Array(events) if !events.is_empty() => Ok(WatchNews::Changed),
        _ => Ok(WatchNews::Progress),
    }
}

/// Moves the data of every complete chunk at the start of `raw` to `out`. `Ok(true)` once
/// the last (empty) chunk came: the body ended.
fn take_chunks(raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<bool, String> {
    loop {
        let Some(line_end) = find(&raw[..raw.len().min(MAX_CHUNK_LINE_BYTES + 2)], b"\r\n") else {
            if raw.len() > MAX_CHUNK_LINE_BYTES {
                return Err("a chunk line too long".into());
            }
            return Ok(false);
        };
        let size = chunk_size(&raw[..line_end], MAX_BODY_BYTES)?;
        if size == 0 {
            return Ok(true);
        }
        let start = line_end + 2;
        if raw.len() < start + size + 2 {
            return Ok(false);
        }
        if &raw[start + size..start + size + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".into());
        }
        if out.len() + size > MAX_BODY_BYTES {
            return Err("watch data over the size limit".into());
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw.drain(..start + size + 2);
    }
}

/// `item` as `host:port`, or why not.
fn endpoint(item: &str) -> Result<String, String> {
    if item.is_empty() {
        return Err("an empty endpoint (expected host:port)".into());
    }
    let lower = item.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(format!(
            "{item}: https is not supported (this client speaks plain HTTP to etcd); \
             use http://host:port or host:port"
        ));
    }
    let rest = if lower.starts_with("http://") {
        &item["http://".len()..]
    } else if item.contains("://") {
        return Err(format!("{item}: only http:// endpoints are supported"));
    } else {
        item
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{item}: no port (expected host:port)"));
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{item}: no host (expected host:port)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(format!("{host}:{port}")),
        _ => Err(format!("{item}: bad port `{port}` (expected host:port)")),
    }
}

fn put_request(key: &str, value: &[u8], lease: Option<u64>) -> Value {
    let mut put = Map::new();
    put.insert("key".into(), encode(key.as_bytes()).into());
    put.insert("value".into(), encode(value).into());
    if let Some(l) = lease.filter(|l| *l != 0) {
        put.insert("lease".into(), l.to_string().into());
    }
    Value::Object(put)
}

/// A txn compare: `key`'s create_revision equals `revision` (0: the key does not exist).
fn create_revision_is(key: &str, revision: u64) -> Value {
    json!({
        "key": encode(key.as_bytes()),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": revision.to_string(),
    })
}

/// The range end that makes `[prefix, end)` every key starting with `prefix`: the prefix
/// with its last byte below 0xff incremented and what follows it dropped; "\0" (to the end
/// of the key space) when there is no such byte.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An int64 field (a JSON string, or a number); absent is 0.
fn int(object: &Value, field: &str) -> Result<u64, String> {
    match &object[field] {
        Value::Null => Ok(0),
        Value::String(s) => s
            .parse()
            .map_err(|_| format!("`{field}` is not a non-negative integer: {s:?}")),
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("`{field}` is not a non-negative integer: {n}")),
        other => Err(format!("`{field}` is {other}")),
    }
}

fn key_value(kv: &Value) -> Result<KeyValue, String> {
    let bytes = |field: &str| -> Result<Vec<u8>, String> {
        match &kv[field] {
            Value::Null => Ok(Vec::new()),
            Value::String(s) => decode(s).map_err(|e| format!("`{field}`: {e}")),
            other => Err(format!("`{field}` is {other}")),
        }
    };
    let key = String::from_utf8(bytes("key")?).map_err(|_| "a key that is not UTF-8")?;
    Ok(KeyValue {
        key,
        value: bytes("value")?,
        create_revision: int(kv, "create_revision")?,
        mod_revision: int(kv, "mod_revision")?,
        lease: int(kv, "lease")?,
    })
}

/// The answer's JSON (a stream's first `result`), or why the call moves on or stops.
fn interpret(endpoint: &str, response: HttpResponse) -> Result<Value, Attempt> {
    let protocol = |detail: String| {
        Attempt::Stop(EtcdError::Protocol {
            endpoint: endpoint.to_string(),
            detail,
        })
    };
    // A stream body holds one JSON message after another; we ask for one answer.
    let json = serde_json::Deserializer::from_slice(&response.body)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok);
    let error = match &json {
        Some(Value::Object(o)) if o.contains_key("error") => Some(grpc_error(o)),
        _ => None,
    };
    let detail = match (response.status, json, error) {
        (200, Some(Value::Object(mut o)), None) => {
            return match o.remove("result") {
                Some(r @ Value::Object(_)) => Ok(r),
                Some(other) => Err(protocol(format!("`result` is {other}"))),
                None => Ok(Value::Object(o)),
            };
        }
        (200, _, None) => {
            return Err(protocol(format!(
                "HTTP 200 with {}",
                excerpt(&response.body)
            )))
        }
        (status, _, Some((code, message))) => {
            let code = code.map_or(String::new(), |c| format!(" (code {c})"));
            (status, format!("HTTP {status}: {message}{code}"))
        }
        (status, _, None) => (
            status,
            format!("HTTP {status}: {}", excerpt(&response.body)),
        ),
    };
    let (status, detail) = detail;
    let unavailable = status == 503
        || detail.contains(&format!("(code {GRPC_UNAVAILABLE})"))
        || detail.contains("no leader")
        || detail.contains("leader changed")
        // Raft drops a proposal on a member between leaders (code 2, Unknown).
        || detail.contains("proposal dropped");
    if unavailable {
        Err(Attempt::Next { detail, sent: true })
    } else {
        Err(Attempt::Stop(EtcdError::Refused {
            endpoint: endpoint.to_string(),
            detail,
        }))
    }
}

/// (gRPC code, message) of an error body: `{"error":"..","message":"..","code":N}` or a
/// stream's `{"error":{"grpc_code":N,"message":".."}}`.
fn grpc_error(o: &Map<String, Value>) -> (Option<i64>, String) {
    fn text(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    match &o["error"] {
        Value::Object(inner) => (
            inner.get("grpc_code").and_then(Value::as_i64),
            text(inner.get("message"))
                .unwrap_or("an error without a message")
                .to_string(),
        ),
        err => (
            o.get("code").and_then(Value::as_i64),
            text(o.get("message"))
                .or(text(Some(err)))
                .unwrap_or("an error without a message")
                .to_string(),
        ),
    }
}

/// The start of a body, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let text = text.trim();
    if text.is_empty() {
        "an empty body".into()
    } else {
        format!("{text:?}")
    }
}

#[derive(Debug, PartialEq, Eq)]
struct HttpResponse {
    status: u16,
    body: Vec<u8>,
}

/// Parses an HTTP/1.1 response from what was read so far: `Ok(None)` while more is needed,
/// an error for a malformed or oversized one. `eof`: the peer closed, nothing more comes.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>, String> {
    let need_more = |what: &str| {
        if eof {
            Err(format!("the connection closed {what}"))
        } else {
            Ok(None)
        }
    };
    let Some(Head {
        status,
        chunked,
        length,
        len: head_len,
    }) = parse_head(buf, eof)?
    else {
        return Ok(None);
    };
    let body = &buf[head_len..];
    let body = if chunked {
        match dechunk(body, eof)? {
            Some(b) => b,
            None => return Ok(None),
        }
    } else if let Some(n) = length {
        if body.len() < n {
            return need_more(&format!("after {} of {n} body bytes", body.len()));
        }
        body[..n].to_vec()
    } else if body.len() > MAX_BODY_BYTES {
        return Err(format!("a body over {MAX_BODY_BYTES} bytes"));
    } else if eof {
        body.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse { status, body }))
}

/// An HTTP/1.1 response's status line and headers.
struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
    /// Bytes of the head, with the empty line that ends it.
    len: usize,
}

/// The head of a response from what was read so far: `Ok(None)` while more is needed.
fn parse_head(buf: &[u8], eof: bool) -> Result<Option<Head>, String> {
    let Some(head_end) = find(&buf[..buf.len().min(MAX_HEAD_BYTES)], b"\r\n\r\n") else {
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(format!("headers longer than {MAX_HEAD_BYTES} bytes"));
        }
        if !eof {
            return Ok(None);
        }
        return Err(format!(
            "the connection closed {}",
            if buf.is_empty() {
                "without an answer"
            } else {
                "inside the headers"
            }
        ));
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "headers that are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(s))) if v.starts_with("HTTP/1.") && (200..600).contains(&s) => s,
        _ => {
            return Err(format!(
                "a bad status line {:?}",
                excerpt(status_line.as_bytes())
            ))
        }
    };
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("a bad header line {}", excerpt(line.as_bytes())));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("a bad Content-Length {value:?}"))?;
            if n > MAX_BODY_BYTES {
                return Err(format!("a body of {n} bytes (at most {MAX_BODY_BYTES})"));
            }
            length = Some(n);
        }
    }
    Ok(Some(Head {
        status,
        chunked,
        length,
        len: head_end + 4,
    }))
}

/// The size a chunk-size line announces (extensions after `;` ignored), at most `room`.
fn chunk_size(line: &[u8], room: usize) -> Result<usize, String> {
    let size_text = line.split(|b| *b == b';').next().unwrap_or_default();
    let size_text = std::str::from_utf8(size_text).unwrap_or("?").trim();
    if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("a bad chunk size {}", excerpt(line)));
    }
    usize::from_str_radix(size_text, 16)
        .ok()
        .filter(|s| *s <= room)
        .ok_or_else(|| format!("a chunked body over {MAX_BODY_BYTES} bytes"))
}

/// The data of a complete chunked body, `None` while more is needed.
fn dechunk(body: &[u8], eof: bool) -> Result<Option<Vec<u8>>, String> {
    let need_more = || {
        if eof {
            Err("the connection closed inside the chunked body".to_string())
        } else {
            Ok(None)
        }
    };
    let line_at = |pos: usize| -> Result<Option<&[u8]>, String> {
        let rest = &body[pos..];
        match find(&rest[..rest.len().min(MAX_CHUNK_LINE_BYTES + 2)], b"\r\n") {
            Some(end) => Ok(Some(&rest[..end])),
            None if rest.len() > MAX_CHUNK_LINE_BYTES => Err("a chunk line too long".into()),
            None => Ok(None),
        }
    };
    let mut chunks = Vec::new();
    let mut total = 0usize;
    let mut pos = 0;
    loop {
        let Some(line) = line_at(pos)? else {
            return need_more();
        };
        let size = chunk_size(line, MAX_BODY_BYTES - total)?;
        pos += line.len() + 2;
        if size == 0 {
            // Trailers (etcd sends one on errors), up to the empty line.
            loop {
                match line_at(pos)? {
                    Some([]) => break,
                    Some(trailer) => pos += trailer.len() + 2,
                    None if eof => break,
                    None => return Ok(None),
                }
            }
            let mut data = Vec::with_capacity(total);
            for (start, len) in chunks {
                data.extend_from_slice(&body[start..start + len]);
            }
            return Ok(Some(data));
        }
        if body.len() < pos + size + 2 {
            return need_more();
        }
        if &body[pos + size..pos + size + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".into());
        }
        chunks.push((pos, size));
        total += size;
        pos += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64, standard alphabet, padded (how etcd's gateway writes bytes).
fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of [`encode`]; refuses a length not a multiple of 4, a foreign character,
/// and padding anywhere but at the end.
fn decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "base64 of length {} (not a multiple of 4)",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let groups = bytes.len() / 4;
    for (g, group) in bytes.chunks(4).enumerate() {
        let pad = group.iter().rev().take_while(|b| **b == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return Err("misplaced base64 padding".into());
        }
        let mut n = 0u32;
        for &c in &group[..4 - pad] {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return Err(format!("a character {:?} that is not base64", c as char)),
            };
            n = (n << 6) | u32::from(v);
        }
        n <<= 6 * pad as u32;
        let produced = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&produced[..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{take_chunks, watch_news, WatchNews};

    #[test]
    fn a_watch_stream_is_taken_apart_chunk_by_chunk_and_message_by_message() {
        let mut raw = b"1b\r\n{\"result\":{\"created\":true}}\r\n5\r\n{\"res\r\n".to_vec();
        let mut data = Vec::new();
        assert_eq!(take_chunks(&mut raw, &mut data), Ok(false));
        assert_eq!(data, b"{\"result\":{\"created\":true}}{\"res");
        assert!(raw.is_empty());
        raw.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(take_chunks(&mut raw, &mut data), Ok(true));
        let mut bad = b"zz\r\n".to_vec();
        assert!(take_chunks(&mut bad, &mut data).is_err());

        let m = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(
            watch_news(&m(r#"{"result":{"created":true}}"#)),
            Ok(WatchNews::Created)
        );
        assert_eq!(
            watch_news(&m(r#"{"result":{"events":[{"type":"DELETE"}]}}"#)),
            Ok(WatchNews::Changed)
        );
        assert_eq!(
            watch_news(&m(r#"{"result":{"header":{}}}"#)),
            Ok(WatchNews::Progress)
        );
        for bad in [
            r#"{"result":{"canceled":true,"cancel_reason":"compacted"}}"#,
            r#"{"error":{"grpc_code":14,"message":"no leader"}}"#,
            r#"[]"#,
        ] {
            assert!(watch_news(&m(bad)).is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors_both_ways() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, coded) in vectors {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        for len in 0..all.len() {
            assert_eq!(decode(&encode(&all[..len])).unwrap(), &all[..len]);
        }
        assert_eq!(encode(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn base64_refuses_bad_input_without_panicking() {
        for bad in [
            "Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "====", "Zm9", "é===", "Zg=a",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn endpoints_are_host_port_with_an_optional_http_prefix() {
        let t = Duration::from_secs(1);
        let e = Etcd::new(
            &[
                "http://a:1, b:2".into(),
                "[::1]:3".into(),
                "http://c:4/".into(),
            ],
            t,
        )
        .unwrap();
        assert_eq!(e.endpoints(), ["a:1", "b:2", "[::1]:3", "c:4"]);
        assert_eq!(e.last_endpoint(), "a:1");
        assert_eq!(Etcd::parse_endpoints(" a:1 ,b:2"), ["a:1", "b:2"]);
        for bad in [
            "",
            "a",
            "a:",
            ":1",
            "a:x",
            "a:0",
            "a:70000",
            "a:1,,b:2",
            "ftp://a:1",
        ] {
            let err = Etcd::new(&[bad.to_string()], t).unwrap_err();
            assert!(matches!(err, EtcdError::BadEndpoints(_)), "{bad:?}: {err}");
        }
        let err = Etcd::new(&["https://a:1".into()], t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("https is not supported"), "{err}");
        assert!(Etcd::new(&[], t).is_err());
        assert!(Etcd::new(&["a:1".into()], Duration::ZERO).is_err());
    }

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    fn response(head: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 200 OK\r\n{head}\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn a_content_length_body_is_complete_only_at_its_length() {
        let r = response("Content-Length: 4\r\n", b"{}  extra");
        let done = parse_response(&r, false).unwrap().unwrap();
        assert_eq!((done.status, done.body.as_slice()), (200, &b"{}  "[..]));
        let short = response("Content-Length: 10\r\n", b"{}");
        assert_eq!(parse_response(&short, false), Ok(None));
        assert!(parse_response(&short, true).is_err());
    }

    #[test]
    fn a_chunked_body_with_trailers_is_joined() {
        let body = b"3\r\n{\"a\r\n5;x=y\r\n\":1}\n\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n";
        let r = response("Transfer-Encoding: chunked\r\n", body);
        let done = parse_response(&r, false).unwrap().unwrap();
        assert_eq!(done.body, b"{\"a\":1}\n");
        // Every cut short of the end needs more, or fails at EOF; none panics.
        let head_len = r.len() - body.len();
        let trailer_start = r.len() - b"Grpc-Trailer-Content-Type: application/grpc\r\n\r\n".len();
        for cut in 0..r.len() {
            assert_eq!(parse_response(&r[..cut], false), Ok(None), "cut at {cut}");
            let at_eof = parse_response(&r[..cut], true);
            if cut < trailer_start {
                assert!(
                    at_eof.is_err(),
                    "cut at {cut} (head {head_len}): {at_eof:?}"
                );
            }
        }
    }

    #[test]
    fn bad_and_huge_answers_are_errors_not_panics() {
        let bad: Vec<Vec<u8>> = vec![
            b"garbage\r\n\r\n".to_vec(),
            b"HTTP/1.1 abc OK\r\n\r\n".to_vec(),
            b"HTTP/1.1 99 Low\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\n\xff\xfe: x\r\n\r\n".to_vec(),
            response("Content-Length: -1\r\n", b""),
            response("Content-Length: 99999999999999999999999\r\n", b""),
            response(&format!("Content-Length: {}\r\n", MAX_BODY_BYTES + 1), b""),
            response("Transfer-Encoding: chunked\r\n", b"zz\r\n"),
            response("Transfer-Encoding: chunked\r\n", b"\r\n"),
            response("Transfer-Encoding: chunked\r\n", b"+1\r\nx\r\n0\r\n\r\n"),
            response(
                "Transfer-Encoding: chunked\r\n",
                b"ffffffffffffffffffff\r\n",
            ),
            response("Transfer-Encoding: chunked\r\n", b"1000001\r\n"),
            response("Transfer-Encoding: chunked\r\n", b"2\r\nabcd\r\n"),
            response("Transfer-Encoding: chunked\r\n", &[b'1'; 2000]),
            [
                b"HTTP/1.1 200 OK\r\nX: ".to_vec(),
                vec![b'x'; MAX_HEAD_BYTES],
            ]
            .concat(),
        ];
        for r in &bad {
            assert!(
                parse_response(r, false).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(&r[..r.len().min(80)])
            );
        }
        assert!(parse_response(b"", true).is_err());
        assert!(parse_response(b"HTTP/1.1 200", true).is_err());
        // Without a length, the body runs to EOF, but never past the cap.
        let open = response("", b"{}");
        assert_eq!(parse_response(&open, false), Ok(None));
        assert_eq!(parse_response(&open, true).unwrap().unwrap().body, b"{}");
        let huge = response("", &vec![b' '; MAX_BODY_BYTES + 1]);
        assert!(parse_response(&huge, false).is_err());
    }

    fn answer(status: u16, body: &str) -> Result<Value, Attempt> {
        interpret(
            "e:1",
            HttpResponse {
                status,
                body: body.as_bytes().to_vec(),
            },
        )
    }

    #[test]
    fn answers_are_results_refusals_or_a_reason_to_move_on() {
        assert_eq!(answer(200, r#"{"a":"1"}"#).ok(), Some(json!({"a":"1"})));
        let stream = "{\"result\":{\"TTL\":\"3\"}}\n{\"result\":{}}\n";
        assert_eq!(answer(200, stream).ok(), Some(json!({"TTL":"3"})));
        let refused = r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        match answer(404, refused) {
            Err(Attempt::Stop(EtcdError::Refused { detail, .. })) => {
                assert!(
                    detail.contains("lease not found") && detail.contains("code 5"),
                    "{detail}"
                )
            }
            _ => panic!("not refused"),
        }
        for unavailable in [
            (503, r#"{"error":"etcdserver: no leader","code":14}"#),
            (503, "Service Unavailable"),
            (
                200,
                r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}"#,
            ),
            (500, r#"{"error":"etcdserver: leader changed","code":2}"#),
        ] {
            assert!(
                matches!(
                    answer(unavailable.0, unavailable.1),
                    Err(Attempt::Next { sent: true, .. })
                ),
                "{unavailable:?}"
            );
        }
        for garbage in ["", "{", "[1]", "null", r#"{"result":3}"#, "\u{0}\u{1}"] {
            assert!(
                matches!(
                    answer(200, garbage),
                    Err(Attempt::Stop(EtcdError::Protocol { .. }))
                ),
                "{garbage:?}"
            );
        }
        assert!(matches!(
            answer(404, "Not Found\n"),
            Err(Attempt::Stop(EtcdError::Refused { .. }))
        ));
    }

    #[test]
    fn key_values_decode_with_absent_fields_as_zero_and_refuse_bad_ones() {
        let kv =
            key_value(&json!({"key":"Zm9v","create_revision":"2","mod_revision":"3"})).unwrap();
        assert_eq!(
            kv,
            KeyValue {
                key: "foo".into(),
                value: Vec::new(),
                create_revision: 2,
                mod_revision: 3,
                lease: 0
            }
        );
        for bad in [
            json!({"key":"Zm9"}),
            json!({"key":"/w=="}),
            json!({"key":"Zm9v","lease":"-1"}),
            json!({"key":"Zm9v","version":"1","mod_revision":true}),
            json!({"key":7}),
        ] {
            assert!(key_value(&bad).is_err(), "{bad}");
        }
        assert_eq!(int(&json!({"n": 5}), "n"), Ok(5));
        assert!(int(&json!({"n": "99999999999999999999"}), "n").is_err());
    }
}
