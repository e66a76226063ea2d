//! The client-side subcommands of `ringmq`: admin, produce, consume; the consumer-group ones
//! in [`groups`], the transactional ones in [`transactions`], `produce --spool` in [`spool`];
//! the host checker in [`tune`].

pub mod cluster;
pub mod groups;
pub mod spool;
pub mod transactions;
pub mod tune;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Subcommand};

use ringmq::client::{
    Admin, Consumer, Producer, ProducerConfig, QueueSelector, SendResult, StartFrom,
};
use ringmq::format::batch::Message;
use ringmq::protocol::Delay;
use ringmq::storage::{RecoveryMode, ShardStore, StorageConfig};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create or list topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Which shard and address serve each queue of a topic.
    Route { topic: String },
    /// Broker version, shards, flush mode, replication and effective config.
    Info,
    /// Per-queue offsets and bytes of a topic.
    QueueStats { topic: String },
    /// Consumer groups: create, describe.
    Group {
        #[command(subcommand)]
        command: groups::GroupCommand,
    },
    /// A consumer group's dead-letter queue: show, redrive.
    Dlq {
        #[command(subcommand)]
        command: groups::DlqCommand,
    },
    /// Open transactions (half messages without an end) of every shard, with their age and
    /// check-backs: `shard=<s> topic=<t> queue=<q> half_offset=<o> group=<g> transaction=<id>
    /// age_ms=<a> checks=<c> messages=<m>`, then `shard=<s> open=<n> listed=<n>
    /// discarded=<n>` per shard (discarded: rolled back after the most check-backs since start;
    /// their messages are in `%TXN_DISCARDED%<group>`).
    Transactions,
    /// Make the broker (a slave) a master; prints `promoted: epoch <N>`.
    Promote,
    /// Replication state of every shard, one line each in a stable key=value format:
    /// `shard=<i> role=<master|slave> epoch=<e> link=<none|connecting|streaming>
    /// peer_received=<n> peer_durable=<n> log_end=<n> lag_bytes=<n> lag_ms=<n> catchup_bps=<n>
    /// connects=<n>`.
    Replication,
    /// A broker cluster on etcd, read from etcd (no broker needed): each group's master with
    /// its term and lease, the in-sync set, and every member: `group=<g> master=<node>
    /// addr=<a> term=<t> lease=<id> lease_ttl=<left>/<granted>s in_sync=<n,..>` then `  member=<node> addr=<a>
    /// role=<r> epoch=<e> log_end=<n> following=<a> streaming=<bool> lag_bytes=<n>
    /// lag_ms=<n> updated_ms_ago=<n>` per member.
    /// Then `topic=<t> queues=<n> groups=<g,..>` per cluster topic.
    Cluster {
        /// etcd client endpoints `HOST:PORT[,...]` (an `etcd=` prefix is accepted)
        #[arg(long)]
        etcd: String,
        #[arg(long, default_value = "ringmq")]
        cluster_name: String,
        #[command(subcommand)]
        command: Option<cluster::ClusterCommand>,
    },
    /// Offline (the broker must be stopped): open every shard of a data directory with
    /// `recovery = skip-corrupt`, quarantining each corrupt record before the durable
    /// checkpoint (its bytes go to `<shard>/quarantine/<position>.bin`, a gap record takes its
    /// place, every valid record after it is kept), then close. Prints one line per shard.
    Repair {
        /// The broker's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The broker's TOML config (for its storage settings) [default: built-in defaults,
        /// with the segment size read from the files]
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TopicCommand {
    /// Create a topic (idempotent for the same queue count).
    Create {
        name: String,
        #[arg(long, default_value_t = 8)]
        queues: u32,
    },
    /// List topics.
    List,
    /// Grow a topic's queue count (never shrinks: messages in the queues past a smaller count
    /// would be unreachable). The new queues spread over the shards; a slave follows.
    Alter {
        name: String,
        #[arg(long)]
        queues: u32,
    },
    /// Delete a topic: producers and consumers get TOPIC_NOT_FOUND at once; its messages stay
    /// in the log until retention drops them, and its name cannot be used again meanwhile.
    /// A slave follows.
    Delete { name: String },
}

/// How `produce` sends.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendMode {
    /// Wait for each message's ack before sending the next.
    Sync,
    /// Pipelined and batched; acks arrive as they come.
    Async,
    /// No acks at all.
    Oneway,
}

#[derive(Args)]
pub struct ProduceArgs {
    /// A broker address, or a comma-separated list of brokers (a master and its slave:
    /// `HOST:PORT,HOST:PORT`). With a list, the producer uses the first that answers and
    /// fails over to the next when one is lost or is no longer the master (NOT_MASTER),
    /// sending again there what was not acked, without duplicates.
    #[arg(long, default_value = "127.0.0.1:10911")]
    pub broker: String,
    #[arg(long)]
    pub topic: String,
    #[arg(long, value_enum, default_value = "sync")]
    pub mode: SendMode,
    /// Use each line as its message key (same line, same queue) instead of round robin.
    #[arg(long)]
    pub key_by_line: bool,
    /// Send every message to this queue.
    #[arg(long)]
    pub queue: Option<u32>,
    /// Print `ack line=<N> queue=<Q> offset=<O> level=<L> epoch=<E>` for every acknowledged
    /// message (N counts input lines from 1; L is where the bytes were when acked: memory,
    /// disk, replica-received or replica-durable). Stable format, one line per ack, in ack
    /// order; new fields are only ever appended.
    #[arg(long)]
    pub print_acks: bool,
    /// Rounds of re-sending a queue's unacknowledged batches after retriable errors (lost
    /// connection, broker restart, busy), counted since the queue's last ack. Default: the
    /// library's (10, about 11 s of backoff: enough to ride through a broker restart).
    #[arg(long)]
    pub retries: Option<u32>,
    /// Delayed delivery: each message becomes visible after this delay level (1-18: 1s 5s
    /// 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h). Sync sends, not de-duplicated.
    #[arg(long, conflicts_with = "delay_ms")]
    pub delay_level: Option<u32>,
    /// Delayed delivery: each message becomes visible this many milliseconds after it is sent
    /// (at most 3 days). Sync sends, not de-duplicated.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Transactional rehearsal: send each line as a half message (stored, invisible) and end
    /// it with this outcome; `unknown` sends no end, stays connected and answers the broker's
    /// check-backs with --check-answer. With --print-acks, prints `half line=<N> queue=<Q>
    /// half_offset=<O> level=<L> transaction=<ID>` and `end line=<N> state=<S> offset=<O>
    /// level=<L>`.
    #[arg(long, value_enum, conflicts_with_all = ["delay_level", "delay_ms", "key_by_line"])]
    pub transaction: Option<transactions::Outcome>,
    /// With --transaction unknown: the answer to each check-back.
    #[arg(long, value_enum, default_value = "unknown", requires = "transaction")]
    pub check_answer: transactions::Outcome,
    /// A local spool directory: a line the broker cannot ack within the retries (no broker,
    /// no route yet, DISK_FULL, SYSTEM_BUSY ...) is appended to an fsync'd file there and
    /// counted as spooled; a run with the same DIR first re-sends what an earlier run
    /// spooled, exactly once (same producer id and sequences). Works with no broker up at
    /// all. Exits 0 when every line was acked or spooled; prints `produce: acked=N
    /// spooled=M spool_pending=P` on stderr, and with --print-acks also `spooled line=<N>
    /// entry=<E>` for each spooled line. Sync sends only.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["transaction", "delay_level", "delay_ms"])]
    pub spool: Option<PathBuf>,
    /// With --spool: the bound on the spool's files; past it a line fails with a "spool
    /// is full" error naming the size and DIR [default: 268435456 (256 MiB)]
    #[arg(long, value_name = "N", requires = "spool")]
    pub spool_max_bytes: Option<u64>,
    /// The producer group of --transaction (check-backs go to any live member of it).
    #[arg(long, default_value = "ringmq-cli", requires = "transaction")]
    pub producer_group: String,
    /// With --transaction unknown: how long to stay for check-backs (ms) [default: 60000]
    #[arg(long, default_value_t = 60_000, requires = "transaction")]
    pub check_wait_ms: u64,
}

#[derive(Args)]
pub struct ConsumeArgs {
    /// A broker address, or a comma-separated list of brokers (a master and its slave:
    /// `HOST:PORT,HOST:PORT`). With a list, the consumer uses the first that answers and
    /// fails over to the next when one is lost, going on from the same offsets.
    #[arg(long, default_value = "127.0.0.1:10911")]
    pub broker: String,
    #[arg(long)]
    pub topic: String,
    /// Only this queue (default: every queue of the topic).
    #[arg(long)]
    pub queue: Option<u32>,
    /// `beginning`, `end`, or an offset (applies to every queue read).
    #[arg(long, default_value = "beginning")]
    pub from: StartFrom,
    /// Stop once every queue read is at its end, instead of waiting for more.
    #[arg(long)]
    pub exit_at_end: bool,
    /// Prefix each body with `<queue> <offset>` and a tab.
    #[arg(long)]
    pub print_offsets: bool,
    /// Consume as a member of this consumer group: the group assigns the queues and starts
    /// where it committed last; what is printed is committed (`--from` does not apply).
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: give every message back (nack) after printing it, to rehearse retries:
    /// each comes back after its delay, and after the group's max_reconsume_times it goes to
    /// the dead-letter queue.
    #[arg(long, requires = "group")]
    pub reject: bool,
    /// With --reject: the delay level (1-18: 1s 5s 10s 30s 1m ... 2h); 0: 3 + the number of
    /// earlier failures.
    #[arg(long, default_value_t = 0, requires = "reject")]
    pub reject_level: u32,
    /// With --group: the member's session timeout.
    #[arg(long, requires = "group")]
    pub session_timeout_ms: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `-` for an empty field: a broker with no master, or one that predates the field, sends "".
fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn admin(broker: &str, command: AdminCommand) -> Result<(), String> {
    if let AdminCommand::Repair { data_dir, config } = &command {
        // Offline: works on the files, talks to no broker.
        return repair(data_dir, config.as_deref());
    }
    if let AdminCommand::Cluster {
        etcd,
        cluster_name,
        command,
    } = &command
    {
        // From etcd: the brokers may be down.
        return match command {
            None => cluster::show(etcd, cluster_name),
            Some(c) => cluster::run(etcd, cluster_name, c),
        };
    }
    let admin = Admin::connect(broker).map_err(|e| e.to_string())?;
    let e = |e: ringmq::client::ClientError| e.to_string();
    match command {
        AdminCommand::Topic {
            command: TopicCommand::Create { name, queues },
        } => {
            admin.create_topic(&name, queues).map_err(e)?;
            println!("topic {name} ready with {queues} queue(s)");
        }
        AdminCommand::Topic {
            command: TopicCommand::Alter { name, queues },
        } => {
            admin.alter_topic(&name, queues).map_err(e)?;
            println!("topic {name} now has {queues} queue(s)");
        }
        AdminCommand::Topic {
            command: TopicCommand::Delete { name },
        } => match admin.delete_topic(&name).map_err(e)? {
            0 => println!("topic {name} was already deleted"),
            queues => {
                println!("topic {name} deleted ({queues} queue(s)); its messages go with retention")
            }
        },
        AdminCommand::Topic {
            command: TopicCommand::List,
        } => {
            let topics = admin.list_topics().map_err(e)?;
            println!("{:<40} {:>6}", "TOPIC", "QUEUES");
            for t in topics {
                println!("{:<40} {:>6}", t.name, t.queues);
            }
        }
        AdminCommand::Route { topic } => {
            let route = admin.route(&topic).map_err(e)?;
            println!("{:>5} {:>5}  ADDRESS", "QUEUE", "SHARD");
            for q in route.queues {
                println!("{:>5} {:>5}  {}", q.queue, q.shard, q.address);
            }
        }
        AdminCommand::Info => {
            let info = admin.broker_info().map_err(e)?;
            println!("version     {}", info.version);
            println!("shards      {}", info.shards);
            println!("flush mode  {}", info.flush_mode);
            println!("role        {}", info.role);
            println!("epoch       {}", info.epoch);
            println!("master      {}", or_dash(&info.master_address));
            println!("replication {}", or_dash(&info.replication));
            println!("-- effective config --\n{}", info.config_toml);
        }
        AdminCommand::Group { command } => groups::group(&admin, command)?,
        AdminCommand::Dlq { command } => groups::dlq(&admin, command)?,
        AdminCommand::QueueStats { topic } => {
            let stats = admin.queue_stats(&topic).map_err(e)?;
            println!(
                "{:>5} {:>14} {:>14} {:>14}",
                "QUEUE", "MIN_OFFSET", "END_OFFSET", "BYTES"
            );
            for s in stats {
                println!(
                    "{:>5} {:>14} {:>14} {:>14}",
                    s.queue, s.min_offset, s.end_offset, s.bytes
                );
            }
        }
        AdminCommand::Transactions => transactions::list(&admin)?,
        AdminCommand::Cluster { .. } => unreachable!("answered from etcd above"),
        AdminCommand::Promote => {
            let epoch = admin.promote().map_err(e)?;
            println!("promoted: epoch {epoch}");
        }
        AdminCommand::Replication => {
            for s in admin.broker_stats().map_err(e)? {
                let r = s.replication;
                println!(
                    "shard={} role={} epoch={} link={} peer_received={} peer_durable={} \
                     log_end={} lag_bytes={} lag_ms={} catchup_bps={} connects={}",
                    s.shard,
                    r.role_name(),
                    r.epoch,
                    r.link_name(),
                    r.peer_received,
                    r.peer_durable,
                    r.log_end,
                    r.lag_bytes,
                    r.lag_ms,
                    r.catchup_bytes_per_sec,
                    r.connects
                );
            }
        }
        AdminCommand::Repair { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

pub fn produce(args: ProduceArgs) -> Result<(), String> {
    if let Some(outcome) = args.transaction {
        return transactions::produce(transactions::TransactionRun {
            broker: &args.broker,
            topic: &args.topic,
            queue: args.queue,
            producer_group: &args.producer_group,
            outcome,
            check_answer: args.check_answer,
            check_wait: Duration::from_millis(args.check_wait_ms),
            print_acks: args.print_acks,
        });
    }
    let mut config = ProducerConfig::new(&args.broker);
    if let Some(retries) = args.retries {
        config.retries = retries;
    }
    if let Some(dir) = &args.spool {
        if args.mode != SendMode::Sync {
            return Err("--spool sends sync only (drop --mode)".into());
        }
        return spool::produce(&args, config, dir);
    }
    let producer = Producer::with_config(config).map_err(|e| e.to_string())?;
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let print_ack = |out: &Mutex<std::io::Stdout>, line: u64, r: &SendResult| {
        let mut out = out.lock().expect("stdout lock");
        let _ = writeln!(
            out,
            "ack line={line} queue={} offset={} level={} epoch={}",
            r.queue, r.offset, r.durability, r.epoch
        );
    };
    let stdin = std::io::stdin();
    let mut sent = 0u64;
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let line_no = i as u64 + 1;
        let message = Message::new(line.clone().into_bytes());
        let selector = match (args.queue, args.key_by_line) {
            (Some(q), _) => QueueSelector::Queue(q),
            (None, true) => QueueSelector::KeyHash(line.as_bytes()),
            (None, false) => QueueSelector::RoundRobin,
        };
        let message = if args.key_by_line {
            message.with_key(line.clone().into_bytes())
        } else {
            message
        };
        let delay = match (args.delay_level, args.delay_ms) {
            (Some(level), _) => Some(Delay::Level(level)),
            (None, Some(ms)) => Some(Delay::At(now_ms() + ms)),
            (None, None) => None,
        };
        if let Some(delay) = delay {
            let r = producer
                .send_delayed(&args.topic, selector, &message, delay)
                .map_err(|e| format!("line {line_no}: {e}"))?;
            if args.print_acks {
                print_ack(&stdout, line_no, &r);
            }
            sent += 1;
            continue;
        }
        match args.mode {
            SendMode::Sync => match producer.send(&args.topic, selector, &message) {
                Ok(r) => {
                    if args.print_acks {
                        print_ack(&stdout, line_no, &r);
                    }
                }
                Err(e) => return Err(format!("line {line_no}: {e}")),
            },
            SendMode::Oneway => producer
                .send_oneway(&args.topic, selector, &message)
                .map_err(|e| format!("line {line_no}: {e}"))?,
            SendMode::Async => {
                let out = stdout.clone();
                let failed = failed.clone();
                let print = args.print_acks;
                producer
                    .send_async(&args.topic, selector, &message, move |r| match r {
                        Ok(r) if print => print_ack(&out, line_no, &r),
                        Ok(_) => {}
                        Err(e) => {
                            failed
                                .lock()
                                .expect("failed lock")
                                .get_or_insert(format!("line {line_no}: {e}"));
                        }
                    })
                    .map_err(|e| format!("line {line_no}: {e}"))?;
            }
        }
        sent += 1;
    }
    producer.flush();
    let _ = stdout.lock().expect("stdout lock").flush();
    if let Some(e) = failed.lock().expect("failed lock").take() {
        return Err(e);
    }
    eprintln!("sent {sent} message(s)");
    Ok(())
}

pub fn consume(args: ConsumeArgs) -> Result<(), String> {
    if let Some(group) = args.group {
        if args.queue.is_some() {
            return Err(
                "--queue and --group do not go together: the group assigns the queues".into(),
            );
        }
        return groups::consume(groups::GroupConsume {
            broker: args.broker,
            topic: args.topic,
            group,
            exit_at_end: args.exit_at_end,
            print_offsets: args.print_offsets,
            reject: args.reject,
            reject_level: args.reject_level,
            session_timeout_ms: args.session_timeout_ms,
        });
    }
    let e = |e: ringmq::client::ClientError| e.to_string();
    let consumer = Consumer::connect(&args.broker).map_err(e)?;
    let route = consumer.route(&args.topic).map_err(e)?;
    let queues: Vec<u32> = match args.queue {
        Some(q) => vec![q],
        None => route.queues.iter().map(|r| r.queue).collect(),
    };
    let mut offsets = Vec::with_capacity(queues.len());
    for q in &queues {
        offsets.push(consumer.resolve(&args.topic, *q, args.from).map_err(e)?);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Rounds of one fetch per queue, all in flight at once; a single queue long-polls,
    // several poll briefly (a round ends when its slowest fetch does).
    let wait = if args.exit_at_end {
        Duration::ZERO
    } else if queues.len() == 1 {
        Duration::from_millis(1000)
    } else {
        Duration::from_millis(50)
    };
    loop {
        let mut all_at_end = true;
        let round: Vec<(u32, u64)> = queues.iter().copied().zip(offsets.clone()).collect();
        let fetched = consumer.fetch_all(&args.topic, &round, wait);
        for (i, f) in fetched.into_iter().enumerate() {
            let f = f.map_err(e)?;
            for m in &f.messages {
                if args.print_offsets {
                    let _ = write!(out, "{} {}\t", m.queue, m.offset);
                }
                let _ = out.write_all(&m.payload);
                let _ = out.write_all(b"\n");
            }
            offsets[i] = f.next_offset;
            if offsets[i] < f.end_offset {
                all_at_end = false;
            }
        }
        let _ = out.flush();
        if args.exit_at_end && all_at_end {
            return Ok(());
        }
    }
}

/// `ringmq admin repair`: opens every `shard-<n>` of `data_dir` with `recovery = skip-corrupt`
/// on this thread's own executor, then closes it.
pub fn repair(data_dir: &Path, config: Option<&Path>) -> Result<(), String> {
    let mut storage = match config {
        Some(p) => {
            ringmq::config::Config::from_file(p)
                .map_err(|e| e.to_string())?
                .storage
        }
        None => StorageConfig::default(),
    };
    storage.recovery = RecoveryMode::SkipCorrupt;
    let entries = std::fs::read_dir(data_dir)
        .map_err(|e| format!("cannot read data dir {}: {e}", data_dir.display()))?;
    let mut shards: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("shard-")?.parse().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(format!(
            "no shard-<n> directories in {}: is this a RingMQ data dir?",
            data_dir.display()
        ));
    }
    for (_, dir) in shards {
        let mut cfg = storage.clone();
        if config.is_none() {
            // Without the broker's config, keep the segment size the files have.
            if let Some(len) = first_segment_bytes(&dir.join("commitlog")) {
                cfg.segment_bytes = len;
            }
        }
        let d = dir.clone();
        let report = glommio::LocalExecutorBuilder::default()
            .name("repair")
            .spawn(move || async move {
                let (store, report) = ShardStore::open(&d, cfg).await.map_err(|e| e.to_string())?;
                store.close().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(report)
            })
            .map_err(|e| format!("cannot start an executor: {e}"))?
            .join()
            .map_err(|e| format!("repair of {} failed: {e}", dir.display()))??;
        println!(
            "{}: quarantined={} durable_bytes_lost={} end={} ({report})",
            dir.display(),
            report.quarantined.len(),
            report.durable_bytes_lost,
            report.end_position
        );
        for q in &report.quarantined {
            let lost = q.lost.as_ref().map_or(String::new(), |(t, qid, o, n)| {
                format!(" queue={t}/{qid} offsets={o}..{}", o + u64::from(*n))
            });
            println!(
                "  quarantined position={} bytes={} file={}{lost}",
                q.position,
                q.bytes,
                q.file.display()
            );
        }
    }
    Ok(())
}

/// Length of the lowest-numbered segment file in `log_dir`, if any.
fn first_segment_bytes(log_dir: &Path) -> Option<u64> {
    let mut names: Vec<String> = std::fs::read_dir(log_dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    names.sort();
    std::fs::metadata(log_dir.join(names.first()?))
        .ok()
        .map(|m| m.len())
}
