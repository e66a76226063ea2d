//! `ringmq broker`'s flags: one args struct per config section, flattened into [`BrokerArgs`].
//!
//! Each struct is declared once by `section_args!`, which makes the clap struct (every flag
//! optional, so a flag not given leaves the `--config` file's value or the default) and its
//! `apply(&mut Section)` from the same list: a setting is named once here, never copied field
//! by field.

use std::path::{Path, PathBuf};

use clap::Args;

use ringmq::config::{
    Config, CoreSelection, MetricsListen, ReplicationConfig, ServerConfig, StorageConfig,
};
use ringmq::replication::{ReplicaAck, ReplicationMode, Role};
use ringmq::storage::{FetchVerify, FlushMode, RecoveryMode, SegmentPrepare, SyncFlushIo};

/// Declares a clap args struct for one config section and its `apply`. A setting is
/// `field: T`, the flag `--<field>` taking a `T` that replaces the section's field (of type
/// `T`, or `Option<T>`); under `flags` a setting is a bool that a flag can only turn on. The
/// types are single names so that clap's derive sees `Option<T>` as written.
macro_rules! section_args {
    (
        $(#[$struct_meta:meta])*
        $name:ident => $section:ty {
            $( $(#[$meta:meta])* $field:ident : $ty:ident, )*
        } flags {
            $( $(#[$flag_meta:meta])* $flag:ident, )*
        }
    ) => {
        $(#[$struct_meta])*
        #[derive(Args)]
        pub struct $name {
            $( #[arg(long)] $(#[$meta])* $field: Option<$ty>, )*
            $( #[arg(long)] $(#[$flag_meta])* $flag: bool, )*
        }

        impl $name {
            /// Overrides the settings given on the command line.
            pub fn apply(self, section: &mut $section) {
                $(
                    if let Some(v) = self.$field {
                        // `T` into a `T` field, or into an `Option<T>` one.
                        section.$field = v.into();
                    }
                )*
                $(
                    if self.$flag {
                        section.$flag = true;
                    }
                )*
            }
        }
    };
}

section_args! {
    /// `[server]` settings.
    ServerArgs => ServerConfig {
        /// Data directory [default: ./ringmq-data]
        data_dir: PathBuf,
        /// Address to bind [default: 127.0.0.1]
        listen_host: String,
        /// Host put into routes for clients [default: the listen host]
        advertised_host: String,
        /// Shard i listens on port+i [default: 10911]
        port: u16,
        /// `all`, a count, or a list like 0,1 (`1,` = core 1 alone) [default: all]
        cores: CoreSelection,
        /// In-flight requests per connection [default: 4096]
        max_inflight_requests_per_connection: u32,
        /// Bytes per connection held by requests in flight and responses not yet written (a
        /// client that does not read stops being read) [default: 67108864]
        max_inflight_bytes_per_connection: u64,
        /// Bytes all connections of a shard may make it hold together; past it a produce gets
        /// SYSTEM_BUSY (retriable) and other requests wait [default: 134217728]
        shard_inflight_bytes: u64,
        /// Close a connection that leaves a frame half-sent this long [default: 10000]
        partial_frame_timeout_ms: u64,
        /// io_uring registered memory per shard, 0 = glommio default [default: 0]
        io_memory_bytes: u64,
        /// Keep polling for completions this long after running out of work before parking the
        /// shard's thread, 0 = park at once [default: 0]
        spin_before_park_us: u64,
        /// Prometheus text endpoint (GET /metrics over HTTP, served by its own thread, never a
        /// shard): HOST:PORT, or `off` to serve none [default: 127.0.0.1:9400]
        metrics_listen: MetricsListen,
        /// Transactions: check back a half message with no end after this long [default: 6000]
        transaction_timeout_ms: u64,
        /// Transactions: repeat an unanswered check this often [default: 6000]
        transaction_check_interval_ms: u64,
        /// Transactions: checks before a half message is rolled back as discarded [default: 15]
        transaction_check_max: u32,
        /// Refuse (SYSTEM_BUSY) a produce that waited longer than this for the log, 0 = no
        /// bound [default: 1000]
        max_queue_wait_ms: u64,
        /// Refuse (SYSTEM_BUSY) produces while appended bytes lead durable ones by more than
        /// this, 0 = no bound [default: 268435456]
        max_flush_lag_bytes: u64,
    } flags {
        /// Run on a file system without O_DIRECT (tmpfs), with a loud warning
        allow_non_direct_io,
    }
}

section_args! {
    /// `[storage]` settings.
    StorageArgs => StorageConfig {
        /// sync_flush or async_flush [default: sync_flush]
        flush_mode: FlushMode,
        /// ASYNC_FLUSH interval [default: 500]
        flush_interval_ms: u64,
        /// ASYNC_FLUSH byte threshold, at least 4096 [default: 4194304]
        flush_bytes: u64,
        /// FLUSH_DISK_TIMEOUT deadline [default: 5000]
        flush_timeout_ms: u64,
        /// CommitLog segment size, a multiple of 4096 and at least 65536 [default: 1073741824]
        segment_bytes: u64,
        /// Bytes of each aligned CommitLog write, a multiple of 4096 [default: 1048576]
        write_buffer_bytes: u64,
        /// CommitLog writes (of up to write-buffer-bytes each) in flight before appends wait
        /// [default: 8]
        max_writes_in_flight: usize,
        /// Largest record a shard stores (header + topic + message batch), in bytes,
        /// 1024..=67108864; also capped by the segment size [default: 8388608]
        max_record_bytes: u64,
        /// Corrupt record before the durable checkpoint: strict (refuse to open) or skip-corrupt
        /// (quarantine it, keep the rest) [default: strict]
        recovery: RecoveryMode,
        /// Refuse produces (DISK_FULL) while the data dir's file system is used above this
        /// fraction, 0.05..=1.0 [default: 0.9]
        disk_reject_ratio: f64,
        /// Delete sealed segments last written more than this many hours ago, 0 = keep all
        /// [default: 72]
        retention_hours: u64,
        /// Delete the oldest sealed segments while the log takes more bytes than this, 0 = no
        /// bound [default: 0]
        retention_bytes: u64,
        /// Above this disk usage, delete expired segments at once [default: 0.75]
        disk_clean_ratio: f64,
        /// With --force-clean: above this disk usage, delete unexpired segments [default: 0.85]
        disk_force_clean_ratio: f64,
        /// Start from the index snapshot and check older records in the background (true), or
        /// scan and check the whole log before serving (false) [default: true]
        index_snapshot: bool,
        /// Pace of zeroing the next segment while the log is far from its end, bytes/s (faster
        /// as the active segment fills); 0 = full speed [default: 33554432]
        prepare_bytes_per_sec: u64,
        /// How a new segment is prepared: zero (write zeros), allocate (fallocate) or auto
        /// (zero under sync_flush, allocate under async_flush) [default: auto]
        segment_prepare: SegmentPrepare,
        /// Segments dropped by retention kept to be reused as new ones (no zeros to write);
        /// none above --disk-clean-ratio [default: 2]
        recycle_segments: u32,
        /// How a sync_flush cycle writes its tail and fdatasyncs: inline (plain syscalls on
        /// the shard's thread: fewer hand-offs, lower ack latency) or ring (io_uring: the
        /// shard serves other connections meanwhile) [default: inline]
        sync_flush_io: SyncFlushIo,
        /// Fetches check record CRCs: once (until every record of the log was checked once
        /// in this broker's life: at open, by the background check or as appended) or
        /// always (every record of every fetch); clients check them all anyway [default: once]
        fetch_verify: FetchVerify,
    } flags {
        /// Delete unexpired segments (unconsumed messages!) while the disk is used above
        /// --disk-force-clean-ratio; each deletion is logged with the queues it cut
        force_clean,
    }
}

section_args! {
    /// `[replication]` settings.
    ReplicationArgs => ReplicationConfig {
        /// master or slave [default: master]
        role: Role,
        /// Slave: the master's shard-0 address, HOST:PORT
        master: String,
        /// Master: the other broker of the pair; refuse to start if it is a newer master
        peer: String,
        /// async_master or sync_master [default: async_master]
        #[arg(long = "replication", value_name = "REPLICATION")]
        mode: ReplicationMode,
        /// SYNC_MASTER: received or durable [default: durable]
        replica_ack: ReplicaAck,
        /// SYNC_MASTER: FLUSH_SLAVE_TIMEOUT deadline [default: 3000]
        replica_timeout_ms: u64,
        /// Master: cap on catch-up reads for a slave that is behind, 0 = none [default: 67108864]
        replica_catchup_bytes_per_sec: u64,
        /// Node id, the low bits of the epochs this broker mints [default: random, kept in
        /// <data-dir>/node_id]
        node_id: u32,
    } flags {
        /// Master with --peer: take writes even if the peer does not answer at start (else the
        /// broker starts fenced, read-only, until it hears from the peer)
        force_master,
    }
}

/// Every config setting can be set here; flags override the `--config` file, which overrides
/// the defaults.
#[derive(Args)]
pub struct BrokerArgs {
    /// TOML config file: tables [server], [storage] and [replication] with the fields of
    /// `ringmq::config::{ServerConfig, StorageConfig, ReplicationConfig}` (the flags' names
    /// with `_`, except --replication, which is `mode` in [replication])
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    replication: ReplicationArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// A broker group on etcd (opt-in): without `--cluster` the broker runs alone or in a pair
/// configured by hand.
#[derive(Args)]
pub struct ClusterArgs {
    /// Join a broker group on etcd: `etcd=HOST:PORT[,HOST:PORT...]` (its client endpoints).
    /// The group elects its master and fails over by itself; --role, --master and --peer
    /// are decided by the group then
    #[arg(long, value_name = "etcd=HOST:PORT,...")]
    cluster: Option<String>,
    /// Name of the cluster in etcd (several can share one etcd)
    #[arg(long, default_value = "ringmq")]
    cluster_name: String,
    /// The broker group (a master and its slaves, same --cores); needed with --cluster
    #[arg(long)]
    group: Option<String>,
    /// This broker's name in its group, unique there; needed with --cluster
    #[arg(long)]
    node: Option<String>,
    /// TTL of this broker's etcd lease: a master acks for at most 3/4 of it after its last
    /// renewal, and a dead master is replaced about this long after it died
    #[arg(long, default_value_t = 3)]
    lease_ttl_secs: u64,
    /// A slave further behind its master than this may not take over
    #[arg(long, default_value_t = 4 << 20)]
    in_sync_lag_bytes: u64,
    /// A slave whose lag is older than this may not take over
    #[arg(long, default_value_t = 5000)]
    in_sync_max_ms: u64,
    /// Let a slave that is not in sync take over when no in-sync one can (under
    /// ASYNC_MASTER this may lose acknowledged messages)
    #[arg(long)]
    allow_unclean_election: bool,
}

impl ClusterArgs {
    /// The cluster settings, `None` without `--cluster`.
    pub fn cluster_config(&self) -> Result<Option<ringmq::cluster::ClusterConfig>, String> {
        let Some(spec) = &self.cluster else {
            if self.group.is_some() || self.node.is_some() {
                return Err(
                    "--group and --node are for a broker in a cluster: add --cluster \
                            etcd=HOST:PORT"
                        .into(),
                );
            }
            return Ok(None);
        };
        let list = spec
            .strip_prefix("etcd=")
            .ok_or_else(|| format!("--cluster {spec:?}: expected etcd=HOST:PORT[,HOST:PORT...]"))?;
        let need = |v: &Option<String>, flag: &str| {
            v.clone()
                .ok_or_else(|| format!("--cluster needs {flag} NAME"))
        };
        let config = ringmq::cluster::ClusterConfig {
            endpoints: ringmq::cluster::etcd::Etcd::parse_endpoints(list),
            cluster: self.cluster_name.clone(),
            group: need(&self.group, "--group")?,
            node: need(&self.node, "--node")?,
            lease_ttl: std::time::Duration::from_secs(self.lease_ttl_secs),
            in_sync_lag_bytes: self.in_sync_lag_bytes,
            in_sync_max_ms: self.in_sync_max_ms,
            allow_unclean_election: self.allow_unclean_election,
        };
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Some(config))
    }
}

impl BrokerArgs {
    /// `--config`, if given.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// `--data-dir`, if given (it overrides the file's `data_dir`).
    pub fn data_dir(&self) -> Option<&Path> {
        self.server.data_dir.as_deref()
    }

    /// With `--cluster`, the cluster settings.
    pub fn cluster_config(&self) -> Result<Option<ringmq::cluster::ClusterConfig>, String> {
        self.cluster.cluster_config()
    }

    /// The defaults, overridden by the `--config` file, overridden by the flags given.
    pub fn into_config(self) -> Result<Config, String> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        self.server.apply(&mut c.server);
        self.storage.apply(&mut c.storage);
        self.replication.apply(&mut c.replication);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    fn config(args: &[&str]) -> Config {
        let argv = std::iter::once("ringmq").chain(args.iter().copied());
        Cli::try_parse_from(argv)
            .expect("flags parse")
            .broker
            .into_config()
            .unwrap()
    }

    fn cluster(args: &[&str]) -> Result<Option<ringmq::cluster::ClusterConfig>, String> {
        let argv = std::iter::once("ringmq").chain(args.iter().copied());
        Cli::try_parse_from(argv)
            .expect("flags parse")
            .broker
            .cluster_config()
    }

    #[test]
    fn cluster_flags_need_each_other_and_say_what_is_missing() {
        assert_eq!(cluster(&[]).unwrap(), None);
        let c = cluster(&[
            "--cluster",
            "etcd=127.0.0.1:2379,127.0.0.2:2379",
            "--group",
            "g1",
            "--node",
            "a",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoints, ["127.0.0.1:2379", "127.0.0.2:2379"]);
        assert_eq!((c.cluster.as_str(), c.group.as_str()), ("ringmq", "g1"));
        assert_eq!(c.lease_ttl, std::time::Duration::from_secs(3));
        let e = cluster(&["--cluster", "etcd=127.0.0.1:2379", "--node", "a"]).unwrap_err();
        assert!(e.contains("--group"), "{e}");
        let e =
            cluster(&["--cluster", "127.0.0.1:2379", "--group", "g", "--node", "a"]).unwrap_err();
        assert!(e.contains("etcd=HOST:PORT"), "{e}");
        let e = cluster(&["--group", "g1"]).unwrap_err();
        assert!(e.contains("--cluster"), "{e}");
        let e = cluster(&[
            "--cluster",
            "etcd=127.0.0.1:2379",
            "--group",
            "a/b",
            "--node",
            "a",
        ])
        .unwrap_err();
        assert!(e.contains("without '/'"), "{e}");
    }

    #[test]
    fn no_flags_is_the_default_config() {
        assert_eq!(config(&[]), Config::default());
    }

    #[test]
    fn each_flag_lands_in_its_section() {
        let c = config(&[
            "--port",
            "0",
            "--allow-non-direct-io",
            "--advertised-host",
            "h",
            "--segment-bytes",
            "65536",
            "--write-buffer-bytes",
            "8192",
            "--max-writes-in-flight",
            "2",
            "--max-record-bytes",
            "4096",
            "--replication",
            "sync_master",
            "--force-master",
            "--node-id",
            "7",
            "--metrics-listen",
            "off",
        ]);
        assert_eq!(c.server.port, 0);
        assert!(c.server.allow_non_direct_io);
        assert_eq!(c.server.advertised_host.as_deref(), Some("h"));
        assert_eq!(c.storage.segment_bytes, 65536);
        assert_eq!(c.storage.write_buffer_bytes, 8192);
        assert_eq!(c.storage.max_writes_in_flight, 2);
        assert_eq!(c.storage.max_record_bytes, 4096);
        assert_eq!(c.replication.mode, ReplicationMode::SyncMaster);
        assert!(c.replication.force_master);
        assert_eq!(c.replication.node_id, Some(7));
        assert_eq!(c.server.metrics_listen, MetricsListen::Off);
        c.validate().unwrap();
    }

    #[test]
    fn flags_override_the_config_file_and_the_file_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "[server]\nport = 1\n[storage]\nmax_writes_in_flight = 3\nflush_bytes = 8192\n",
        )
        .unwrap();
        let c = config(&[
            "--config",
            path.to_str().unwrap(),
            "--max-writes-in-flight",
            "5",
        ]);
        assert_eq!(c.server.port, 1, "from the file");
        assert_eq!(c.storage.flush_bytes, 8192, "from the file");
        assert_eq!(c.storage.max_writes_in_flight, 5, "the flag wins");
        assert_eq!(
            c.storage.segment_bytes,
            StorageConfig::default().segment_bytes
        );
    }
}
