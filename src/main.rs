//! `ringmq`: run a broker, or talk to one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use ringmq::client::Admin;
use ringmq::config::{Config, CoreSelection};
use ringmq::replication::{ReplicaAck, ReplicationMode, Role};
use ringmq::storage::{FlushMode, RecoveryMode};

mod cli;

#[derive(Parser)]
#[command(
    name = "ringmq",
    version,
    about = "RingMQ: a thread-per-core message broker with honest acks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the broker's flags does not matter.
#[derive(Subcommand)]
enum Command {
    /// Run a broker (one pinned shard per core) until SIGINT/SIGTERM.
    Broker(Box<BrokerArgs>),
    /// Check that a broker answers, and how fast.
    Ping {
        #[arg(long, default_value = "127.0.0.1:10911")]
        broker: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Topics, routes, broker info, queue statistics.
    Admin {
        #[arg(long, global = true, default_value = "127.0.0.1:10911")]
        broker: String,
        #[command(subcommand)]
        command: cli::AdminCommand,
    },
    /// Send one message per stdin line.
    Produce(cli::ProduceArgs),
    /// Print one message body per line.
    Consume(cli::ConsumeArgs),
}

/// Every config field can be set here; flags override the `--config` file, which overrides
/// the defaults.
#[derive(Args)]
struct BrokerArgs {
    /// TOML config file (fields as in `ringmq::config::Config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./ringmq-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to bind [default: 127.0.0.1]
    #[arg(long)]
    listen_host: Option<String>,
    /// Host put into routes for clients [default: the listen host]
    #[arg(long)]
    advertised_host: Option<String>,
    /// Shard i listens on port+i [default: 10911]
    #[arg(long)]
    port: Option<u16>,
    /// `all`, a count, or a list like 0,1 (`1,` = core 1 alone) [default: all]
    #[arg(long)]
    cores: Option<CoreSelection>,
    /// sync_flush or async_flush [default: sync_flush]
    #[arg(long)]
    flush_mode: Option<FlushMode>,
    /// ASYNC_FLUSH interval [default: 500]
    #[arg(long)]
    flush_interval_ms: Option<u64>,
    /// ASYNC_FLUSH byte threshold [default: 4194304]
    #[arg(long)]
    flush_bytes: Option<u64>,
    /// FLUSH_DISK_TIMEOUT deadline [default: 5000]
    #[arg(long)]
    flush_timeout_ms: Option<u64>,
    /// CommitLog segment size [default: 1073741824]
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// In-flight requests per connection [default: 4096]
    #[arg(long)]
    max_inflight_requests_per_connection: Option<u32>,
    /// Bytes per connection held by requests in flight and responses not yet written (a client
    /// that does not read stops being read) [default: 67108864]
    #[arg(long)]
    max_inflight_bytes_per_connection: Option<u64>,
    /// Close a connection that leaves a frame half-sent this long [default: 10000]
    #[arg(long)]
    partial_frame_timeout_ms: Option<u64>,
    /// Run on a file system without O_DIRECT (tmpfs), with a loud warning
    #[arg(long)]
    allow_non_direct_io: bool,
    /// io_uring registered memory per shard, 0 = glommio default [default: 0]
    #[arg(long)]
    io_memory_bytes: Option<u64>,
    /// master or slave [default: master]
    #[arg(long)]
    role: Option<Role>,
    /// Slave: the master's shard-0 address, HOST:PORT
    #[arg(long)]
    master: Option<String>,
    /// Master: the other broker of the pair; refuse to start if it is a newer master
    #[arg(long)]
    peer: Option<String>,
    /// async_master or sync_master [default: async_master]
    #[arg(long)]
    replication: Option<ReplicationMode>,
    /// SYNC_MASTER: received or durable [default: durable]
    #[arg(long)]
    replica_ack: Option<ReplicaAck>,
    /// SYNC_MASTER: FLUSH_SLAVE_TIMEOUT deadline [default: 3000]
    #[arg(long)]
    replica_timeout_ms: Option<u64>,
    /// Master: cap on catch-up reads for a slave that is behind, 0 = none [default: 67108864]
    #[arg(long)]
    replica_catchup_bytes_per_sec: Option<u64>,
    /// Master with --peer: take writes even if the peer does not answer at start (else the
    /// broker starts fenced, read-only, until it hears from the peer)
    #[arg(long)]
    force_master: bool,
    /// Node id, the low bits of the epochs this broker mints [default: random, kept in
    /// <data-dir>/node_id]
    #[arg(long)]
    node_id: Option<u32>,
    /// Corrupt record before the durable checkpoint: strict (refuse to open) or skip-corrupt
    /// (quarantine it, keep the rest) [default: strict]
    #[arg(long)]
    recovery: Option<RecoveryMode>,
}

impl BrokerArgs {
    fn into_config(self) -> Result<Config, String> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            data_dir,
            listen_host,
            port,
            cores,
            flush_mode,
            flush_interval_ms,
            flush_bytes,
            flush_timeout_ms,
            segment_bytes,
            max_inflight_requests_per_connection,
            max_inflight_bytes_per_connection,
            partial_frame_timeout_ms,
            io_memory_bytes,
            role,
            replication,
            replica_ack,
            replica_timeout_ms,
            replica_catchup_bytes_per_sec,
            recovery
        );
        if self.master.is_some() {
            c.master = self.master;
        }
        if self.peer.is_some() {
            c.peer = self.peer;
        }
        if self.advertised_host.is_some() {
            c.advertised_host = self.advertised_host;
        }
        if self.allow_non_direct_io {
            c.allow_non_direct_io = true;
        }
        if self.force_master {
            c.force_master = true;
        }
        if self.node_id.is_some() {
            c.node_id = self.node_id;
        }
        Ok(c)
    }
}

fn run_broker(args: BrokerArgs) -> Result<(), String> {
    ringmq::server::run_until_signalled(args.into_config()?)
}

fn ping(broker: &str, count: u32) -> Result<(), String> {
    let admin = Admin::connect(broker).map_err(|e| e.to_string())?;
    for _ in 0..count.max(1) {
        let rtt = admin.ping().map_err(|e| e.to_string())?;
        println!("pong from {broker} in {} us", rtt.as_micros());
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Broker(args) => run_broker(*args),
        Command::Ping { broker, count } => ping(&broker, count),
        Command::Admin { broker, command } => cli::admin(&broker, command),
        Command::Produce(args) => cli::produce(args),
        Command::Consume(args) => cli::consume(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
