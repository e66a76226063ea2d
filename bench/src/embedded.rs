//! What the `groups` and `backlog` workloads share: an embedded broker on the first cores
//! (the same `[server]` section as every bench broker, [`runner::bench_server_config`]), the
//! payload that carries a message's id and send time, the tally that finds lost and duplicate
//! ids, and the split of this process' CPU time between the broker's shards and the load.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ringmq::client::{GroupConfig, GroupConsumer};
use ringmq::config::{Config, StorageConfig};
use ringmq::format::batch::Message;
use ringmq::protocol::ErrorCode;
use ringmq::server::Broker;
use ringmq::storage::config::SEGMENT_BYTES_MIN;
use ringmq::storage::FlushMode;
use serde::{Deserialize, Serialize};

use crate::machine::{self, CoreSplit};
use crate::runner;
use crate::workload::Mode;

/// Bytes of a payload the workloads read back: send time (µs since the run's base) and id.
pub const PAYLOAD_HEADER_BYTES: usize = 16;

/// The flags of the embedded broker both workloads start.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct BrokerArgs {
    /// sync-flush or async-flush: the embedded broker's flush mode.
    #[arg(long, visible_alias = "flush-mode", default_value = "sync-flush", value_parser = parse_flush_mode)]
    pub mode: Mode,
    /// Embedded broker: number of shards (cores 0..N-1 of this process' cores).
    #[arg(long, default_value_t = 1)]
    pub broker_cores: usize,
    /// Cores for the load threads (default: the cores the broker does not use).
    #[arg(long, value_name = "LIST")]
    pub load_cores: Option<String>,
    /// ASYNC_FLUSH flush interval.
    #[arg(long, default_value_t = 500)]
    pub flush_interval_ms: u64,
    /// CommitLog segment size in MiB.
    #[arg(long, default_value_t = 64)]
    pub segment_mib: u64,
    /// The temporary data dir is created in this directory (a real disk, not tmpfs) and
    /// removed afterwards.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub data_root: PathBuf,
}

fn parse_flush_mode(s: &str) -> Result<Mode, String> {
    match s.parse::<Mode>()? {
        m @ (Mode::SyncFlush | Mode::AsyncFlush) => Ok(m),
        m => Err(format!(
            "{m} needs a slave; this workload runs sync-flush or async-flush"
        )),
    }
}

impl BrokerArgs {
    pub fn problems(&self, out: &mut Vec<String>) {
        if self.broker_cores == 0 {
            out.push("--broker-cores must be at least 1".into());
        }
        if (self.segment_mib << 20) < SEGMENT_BYTES_MIN {
            out.push(format!(
                "--segment-mib must be at least {}",
                SEGMENT_BYTES_MIN.div_ceil(1 << 20)
            ));
        }
        if self.flush_interval_ms == 0 {
            out.push("--flush-interval-ms must be at least 1".into());
        }
    }
}

/// A broker in this process with its data dir; [`EmbeddedBroker::stop`] removes both.
pub struct EmbeddedBroker {
    broker: Broker,
    pub addr: String,
    pub split: CoreSplit,
    pub data_fs: String,
    dir: runner::TempDataDir,
}

impl EmbeddedBroker {
    pub fn start(args: &BrokerArgs, name: &str) -> Result<EmbeddedBroker, String> {
        Self::start_with(args, name, |_| {})
    }

    /// [`EmbeddedBroker::start`] with `tune` applied to the config last (a workload's own
    /// broker settings, e.g. the transactions' check-back timing).
    pub fn start_with(
        args: &BrokerArgs,
        name: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Result<EmbeddedBroker, String> {
        let allowed = machine::allowed_cores();
        let split = CoreSplit::plan(
            &allowed,
            Some(args.broker_cores),
            args.load_cores.as_deref(),
        )?;
        std::fs::create_dir_all(&args.data_root)
            .map_err(|e| format!("cannot create {}: {e}", args.data_root.display()))?;
        let root = args
            .data_root
            .canonicalize()
            .map_err(|e| format!("{}: {e}", args.data_root.display()))?;
        let dir = runner::fresh_dir(
            &root,
            &format!(".ringmq-bench-{}-{name}", std::process::id()),
        )?;
        let data_dir = dir.path().to_path_buf();
        let flush_mode: FlushMode = args.mode.flush_mode();
        let mut config = Config {
            server: runner::bench_server_config(&data_dir, "127.0.0.1", args.broker_cores),
            storage: StorageConfig {
                flush_mode,
                flush_interval_ms: args.flush_interval_ms,
                segment_bytes: args.segment_mib << 20,
                ..StorageConfig::default()
            },
            ..Config::default()
        };
        tune(&mut config);
        let broker = Broker::start(config)
            .map_err(|e| format!("cannot start the embedded {} broker: {e}", args.mode))?;
        Ok(EmbeddedBroker {
            addr: broker.address().to_string(),
            broker,
            split,
            data_fs: machine::fs_type(&root),
            dir,
        })
    }

    pub fn stop(self) {
        if let Err(e) = self.broker.stop() {
            eprintln!("warning: the embedded broker did not stop cleanly: {e}");
        }
        drop(self.dir);
    }
}

/// A message whose payload starts with its send time (µs since the run's base) and its id.
pub fn make_message(template: &[u8], sent_us: u64, id: u64) -> Message {
    let mut buf = BytesMut::with_capacity(template.len());
    buf.put_u64_le(sent_us);
    buf.put_u64_le(id);
    buf.extend_from_slice(&template[PAYLOAD_HEADER_BYTES..]);
    Message::new(buf.freeze())
}

/// (send time µs, id) of a payload made by [`make_message`]; `None` for anything else.
pub fn read_payload(payload: &Bytes) -> Option<(u64, u64)> {
    let h = payload.get(..PAYLOAD_HEADER_BYTES)?;
    let sent = u64::from_le_bytes(h[..8].try_into().ok()?);
    let id = u64::from_le_bytes(h[8..].try_into().ok()?);
    Some((sent, id))
}

/// An id names its producer and that producer's sequence number.
pub fn message_id(producer: usize, seq: u64) -> u64 {
    ((producer as u64) << 40) | seq
}

fn split_id(id: u64) -> (usize, u64) {
    ((id >> 40) as usize, id & ((1 << 40) - 1))
}

/// How often each id was consumed.
#[derive(Default)]
pub struct Tally {
    /// Per producer, per sequence number: deliveries (saturating).
    counts: Vec<Vec<u16>>,
    pub deliveries: u64,
    pub distinct: u64,
    /// Deliveries of an id already delivered.
    pub duplicates: u64,
    /// Payloads that carry no id of this run.
    pub foreign: u64,
}

impl Tally {
    /// Counts one delivery; true when it is the id's first.
    pub fn see(&mut self, id: u64) -> bool {
        let (p, seq) = split_id(id);
        if p > 4096 || seq > (1 << 32) {
            self.foreign += 1;
            return false;
        }
        if self.counts.len() <= p {
            self.counts.resize_with(p + 1, Vec::new);
        }
        let v = &mut self.counts[p];
        let seq = seq as usize;
        if v.len() <= seq {
            v.resize((seq + 1).max(v.len() * 2), 0);
        }
        self.deliveries += 1;
        v[seq] = v[seq].saturating_add(1);
        if v[seq] == 1 {
            self.distinct += 1;
            true
        } else {
            self.duplicates += 1;
            false
        }
    }

    /// Acked ids never consumed: producer `p` acked `sent[p]` sequence numbers except
    /// `failed[p]` (whose sends failed and may or may not be stored).
    pub fn lost(&self, sent: &[u64], failed: &[Vec<u64>]) -> u64 {
        let mut lost = 0;
        for (p, &n) in sent.iter().enumerate() {
            let counts = self.counts.get(p).map_or(&[][..], Vec::as_slice);
            let failed: std::collections::HashSet<u64> =
                failed.get(p).into_iter().flatten().copied().collect();
            lost += (0..n)
                .filter(|&s| !failed.contains(&s))
                .filter(|&s| !matches!(counts.get(s as usize), Some(&c) if c > 0))
                .count() as u64;
        }
        lost
    }
}

/// How long [`join_member`] retries a join the coordinator answers with GROUP_NOT_FOUND.
const JOIN_RETRY_FOR: Duration = Duration::from_secs(3);

/// Joins a group; returns the member and how many joins were refused with GROUP_NOT_FOUND
/// first. Under ASYNC_FLUSH the coordinator reads its group records back only once they are
/// flushed, so a join right after the group was created can be refused until the next flush;
/// the retries are reported as errors, not hidden.
pub fn join_member(addr: &str, config: GroupConfig) -> Result<(GroupConsumer, u32), String> {
    let until = Instant::now() + JOIN_RETRY_FOR;
    let mut retries = 0;
    loop {
        match GroupConsumer::join(addr, config.clone()) {
            Ok(m) => return Ok((m, retries)),
            Err(e) if e.code() == Some(ErrorCode::GroupNotFound) && Instant::now() < until => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("join: {e}")),
        }
    }
}

/// Writes `text` into `dir/name`, creating `dir`.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_short_payloads_are_refused() {
        let template = vec![0u8; 64];
        let m = make_message(&template, 1234, message_id(3, 77));
        let (sent, id) = read_payload(&m.payload).unwrap();
        assert_eq!((sent, split_id(id)), (1234, (3, 77)));
        assert_eq!(read_payload(&Bytes::from_static(b"short")), None);
    }

    #[test]
    fn tally_counts_duplicates_and_losses() {
        let mut t = Tally::default();
        assert!(t.see(message_id(0, 0)));
        assert!(!t.see(message_id(0, 0)));
        assert!(t.see(message_id(1, 2)));
        assert_eq!((t.distinct, t.duplicates), (2, 1));
        // Producer 0 acked 0..2 (1 is lost); producer 1 acked 0..3 but 0 failed: 1 is lost.
        assert_eq!(t.lost(&[2, 3], &[vec![], vec![0]]), 2);
    }
}
