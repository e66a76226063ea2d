//! The consumer-group subcommands: `consume --group`, `admin group`, `admin dlq`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;

use ringmq::client::{
    Admin, ClientError, Consumer, GroupConfig, GroupConsumer, Producer, QueueSelector,
};
use ringmq::format::batch::Message;
use ringmq::protocol::CommittedOffset;

/// What `consume --group` was asked (from `ConsumeArgs`).
pub struct GroupConsume {
    pub broker: String,
    pub topic: String,
    pub group: String,
    pub exit_at_end: bool,
    pub print_offsets: bool,
    pub reject: bool,
    pub reject_level: u32,
    pub session_timeout_ms: Option<u64>,
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a consumer group or change its settings (a member's first join also creates
    /// one, with the defaults: 16 retries, 15 minutes to consume a message).
    Create {
        group: String,
        /// Failures after which a message goes to the group's dead-letter queue `%DLQ%<group>`.
        #[arg(long, default_value_t = 16)]
        max_reconsume_times: u32,
        /// A delivered message not acked within this long is given back for a retry.
        #[arg(long)]
        consume_timeout_ms: Option<u32>,
    },
    /// Settings, generation, members, and per queue: holder, committed offset, lag in
    /// messages and in time; then the depth of the retry and dead-letter topics.
    Describe { group: String },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// The group's dead-letter messages, one line each: `queue=<q> offset=<o>
    /// origin=<topic>/<queue>/<offset> failures=<n> error=<text>` and a tab, then the body.
    Show { group: String },
    /// Publish each dead-letter message not yet redriven to its original topic and queue (once:
    /// the redrive cursor is the group's committed offset of its dead-letter queue).
    Redrive { group: String },
}

fn e(e: ClientError) -> String {
    e.to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ringmq consume --group`: joins the group, prints bodies, commits what it printed.
pub fn consume(args: GroupConsume) -> Result<(), String> {
    let mut config = GroupConfig::new(&args.group, &[args.topic.as_str()]);
    if let Some(ms) = args.session_timeout_ms {
        config.session_timeout = Duration::from_millis(ms);
    }
    let consumer = GroupConsumer::join(&args.broker, config).map_err(e)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|err| format!("cannot handle signal {signal}: {err}"))?;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut rejected = 0u64;
    let mut empty_polls = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let messages = consumer.poll(Duration::from_millis(300)).map_err(e)?;
        if messages.is_empty() {
            empty_polls += 1;
            // Two empty polls in a row: every queue had a chance to answer.
            if args.exit_at_end && empty_polls >= 2 && consumer.at_end() {
                break;
            }
            continue;
        }
        empty_polls = 0;
        for m in &messages {
            if args.print_offsets {
                let _ = write!(out, "{} {}\t", m.queue, m.offset);
            }
            let _ = out.write_all(&m.payload);
            let _ = out.write_all(b"\n");
        }
        // Printed before it is acked, so a crash re-prints rather than loses.
        out.flush().map_err(|err| format!("stdout: {err}"))?;
        for m in &messages {
            if args.reject {
                consumer
                    .nack(
                        m,
                        args.reject_level,
                        "rejected by `ringmq consume --reject`",
                    )
                    .map_err(e)?;
                rejected += 1;
            } else {
                consumer.ack(m);
            }
            printed += 1;
        }
        consumer.commit().map_err(e)?;
    }
    consumer.close().map_err(e)?;
    eprintln!("printed {printed} message(s), rejected {rejected}");
    Ok(())
}

pub fn group(admin: &Admin, command: GroupCommand) -> Result<(), String> {
    match command {
        GroupCommand::Create {
            group,
            max_reconsume_times,
            consume_timeout_ms,
        } => {
            let g = admin
                .create_group(&group, max_reconsume_times, consume_timeout_ms.unwrap_or(0))
                .map_err(e)?;
            println!(
                "group {} max_reconsume_times={} consume_timeout_ms={}",
                g.group, g.max_reconsume_times, g.consume_timeout_ms
            );
            Ok(())
        }
        GroupCommand::Describe { group } => describe(admin, &group),
    }
}

fn describe(admin: &Admin, group: &str) -> Result<(), String> {
    let d = admin.describe_group(group).map_err(e)?;
    println!(
        "group {} generation={} max_reconsume_times={} consume_timeout_ms={} members={}",
        d.settings.group,
        d.generation,
        d.settings.max_reconsume_times,
        d.settings.consume_timeout_ms,
        d.members.len()
    );
    for m in &d.members {
        println!(
            "member {} queues={} idle_ms={} topics={}",
            m.member,
            m.queues,
            m.idle_ms,
            m.topics.join(",")
        );
    }
    let consumer = Consumer::connect(admin.connection().peer()).map_err(e)?;
    let mut stats = std::collections::HashMap::new();
    let now = now_ms();
    for q in &d.queues {
        if q.topic.starts_with("%DLQ%") {
            continue; // the redrive cursor, shown with the dead-letter depth below
        }
        if !stats.contains_key(&q.topic) {
            stats.insert(q.topic.clone(), admin.queue_stats(&q.topic).map_err(e)?);
        }
        let st = stats[&q.topic].iter().find(|s| s.queue == q.queue);
        let (min, end) = st.map_or((0, 0), |s| (s.min_offset, s.end_offset));
        let from = q.committed.unwrap_or(min).max(min);
        let lag = end.saturating_sub(from);
        // Lag in time: how long the oldest unconsumed message has waited.
        let lag_ms = if lag == 0 {
            0
        } else {
            consumer
                .fetch(&q.topic, q.queue, from, Duration::ZERO)
                .ok()
                .and_then(|f| {
                    f.messages
                        .first()
                        .map(|m| now.saturating_sub(m.store_timestamp_ms))
                })
                .unwrap_or(0)
        };
        println!(
            "queue {}/{} member={} committed={} end={end} lag={lag} lag_ms={lag_ms}",
            q.topic,
            q.queue,
            if q.member.is_empty() { "-" } else { &q.member },
            q.committed.map_or("-".to_string(), |c| c.to_string()),
        );
    }
    let depth = |topic: &str, cursor: &dyn Fn(u32) -> Option<u64>| -> Result<u64, String> {
        Ok(admin
            .queue_stats(topic)
            .map_err(e)?
            .iter()
            .map(|s| s.end_offset - cursor(s.queue).unwrap_or(s.min_offset).max(s.min_offset))
            .sum())
    };
    let committed = |topic: String| {
        let queues = d.queues.clone();
        move |queue: u32| {
            queues
                .iter()
                .find(|q| q.topic == topic && q.queue == queue)
                .and_then(|q| q.committed)
        }
    };
    let retry = format!("%RETRY%{group}");
    let dlq = format!("%DLQ%{group}");
    println!(
        "retry_depth={} dlq_depth={}",
        depth(&retry, &committed(retry.clone()))?,
        depth(&dlq, &committed(dlq.clone()))?
    );
    Ok(())
}

/// Every message of `topic` from `from(queue)` (default the oldest) to its end, by queue.
fn read_all(
    consumer: &Consumer,
    admin: &Admin,
    topic: &str,
    from: &dyn Fn(u32) -> Option<u64>,
) -> Result<Vec<(u32, u64, Vec<ringmq::client::ConsumedMessage>)>, String> {
    let mut out = Vec::new();
    for s in admin.queue_stats(topic).map_err(e)? {
        let mut offset = from(s.queue).unwrap_or(s.min_offset).max(s.min_offset);
        let mut messages = Vec::new();
        while offset < s.end_offset {
            let f = consumer
                .fetch(topic, s.queue, offset, Duration::ZERO)
                .map_err(e)?;
            messages.extend(f.messages.into_iter().filter(|m| m.offset < s.end_offset));
            if f.next_offset <= offset {
                break;
            }
            offset = f.next_offset;
        }
        out.push((s.queue, s.end_offset, messages));
    }
    Ok(out)
}

fn prop<'a>(m: &'a ringmq::client::ConsumedMessage, name: &str) -> &'a str {
    m.properties
        .iter()
        .find(|(k, _)| k.as_ref() == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .unwrap_or("")
}

pub fn dlq(admin: &Admin, command: DlqCommand) -> Result<(), String> {
    let group = match &command {
        DlqCommand::Show { group } | DlqCommand::Redrive { group } => group.clone(),
    };
    let topic = format!("%DLQ%{group}");
    let consumer = Consumer::connect(admin.connection().peer()).map_err(e)?;
    match command {
        DlqCommand::Show { .. } => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for (queue, _, messages) in read_all(&consumer, admin, &topic, &|_| None)? {
                for m in messages {
                    let _ = write!(
                        out,
                        "queue={queue} offset={} origin={}/{}/{} failures={} error={}\t",
                        m.offset,
                        prop(&m, "%ORIGIN_TOPIC"),
                        prop(&m, "%ORIGIN_QUEUE"),
                        prop(&m, "%ORIGIN_OFFSET"),
                        prop(&m, "%RECONSUME"),
                        prop(&m, "%ERROR").replace(['\t', '\n'], " "),
                    );
                    let _ = out.write_all(&m.payload);
                    let _ = out.write_all(b"\n");
                }
            }
            Ok(())
        }
        DlqCommand::Redrive { .. } => {
            let d = admin.describe_group(&group).map_err(e)?;
            let cursor = |queue: u32| {
                d.queues
                    .iter()
                    .find(|q| q.topic == topic && q.queue == queue)
                    .and_then(|q| q.committed)
            };
            let producer = Producer::connect(admin.connection().peer()).map_err(e)?;
            let mut redriven = 0u64;
            for (queue, end, messages) in read_all(&consumer, admin, &topic, &cursor)? {
                for m in &messages {
                    let origin_topic = prop(m, "%ORIGIN_TOPIC");
                    let origin_queue: u32 = prop(m, "%ORIGIN_QUEUE").parse().unwrap_or(0);
                    let mut out = Message::new(m.payload.clone());
                    out.key = m.key.clone();
                    out.tag = m.tag.clone();
                    out.born_timestamp_ms = m.born_timestamp_ms;
                    // The broker's bookkeeping stays behind: a redriven message starts over.
                    out.properties = m
                        .properties
                        .iter()
                        .filter(|(k, _)| !k.starts_with(b"%"))
                        .cloned()
                        .collect();
                    producer
                        .send(origin_topic, QueueSelector::Queue(origin_queue), &out)
                        .map_err(e)?;
                    redriven += 1;
                }
                if end > cursor(queue).unwrap_or(0) && !messages.is_empty() {
                    admin
                        .commit_offsets(
                            &group,
                            vec![CommittedOffset {
                                topic: topic.clone(),
                                queue,
                                offset: end,
                            }],
                        )
                        .map_err(e)?;
                }
            }
            println!("redriven {redriven} message(s) of {topic}");
            Ok(())
        }
    }
}
