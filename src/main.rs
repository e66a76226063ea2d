//! `ringmq`: run a broker, or talk to one.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ringmq::client::Admin;

mod broker_args;
mod cli;

use broker_args::BrokerArgs;

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
        /// A broker address, or a comma-separated list: the first that answers is asked.
        #[arg(long, global = true, default_value = "127.0.0.1:10911")]
        broker: String,
        #[command(subcommand)]
        command: cli::AdminCommand,
    },
    /// Send one message per stdin line.
    Produce(cli::ProduceArgs),
    /// Print one message body per line.
    Consume(cli::ConsumeArgs),
    /// Check this host for a broker (`--check`): a table of settings, each OK, WARN or FAIL
    /// with why and what to run; exits non-zero when a broker would refuse to start. Takes
    /// the broker's flags (`--config`, `--data-dir`, ...).
    Tune(Box<cli::tune::TuneArgs>),
}

fn run_broker(args: BrokerArgs) -> Result<(), String> {
    let cluster = args.cluster_config()?;
    let config = args.into_config()?;
    match cluster {
        None => ringmq::server::run_until_signalled(config),
        Some(cluster) => {
            ringmq::cluster::run_until_signalled(config, cluster).map_err(|e| e.to_string())
        }
    }
}

fn ping(broker: &str, count: u32) -> Result<(), String> {
    let admin = Admin::connect(broker).map_err(|e| e.to_string())?;
    for _ in 0..count.max(1) {
        let rtt = admin.ping().map_err(|e| e.to_string())?;
        let peer = admin.connection().peer();
        println!("pong from {peer} in {} us", rtt.as_micros());
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
        Command::Tune(args) => cli::tune::tune(*args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
