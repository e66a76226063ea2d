//! `ringmq-bench`: load generator and flush-mode comparison for RingMQ.

use clap::{Parser, Subcommand};

mod storage;

#[derive(Parser)]
#[command(name = "ringmq-bench", about = "RingMQ benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Storage engine alone: raw disk floor vs SYNC_FLUSH / ASYNC_FLUSH appends.
    Storage(storage::StorageArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Storage(args) => storage::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
