//! `ringmq produce --transaction ...` (a rehearsal of the two phases and the check-back) and
//! `ringmq admin transactions`.

use std::collections::HashSet;
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmq::client::transaction::{CheckBack, TransactionConfig};
use ringmq::client::{Admin, QueueSelector, TransactionalProducer};
use ringmq::format::batch::Message;
use ringmq::protocol::TransactionOutcome;

/// An outcome as the command line names it.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Outcome {
    Commit,
    Rollback,
    Unknown,
}

impl From<Outcome> for TransactionOutcome {
    fn from(o: Outcome) -> TransactionOutcome {
        match o {
            Outcome::Commit => TransactionOutcome::Commit,
            Outcome::Rollback => TransactionOutcome::Rollback,
            Outcome::Unknown => TransactionOutcome::Unknown,
        }
    }
}

/// What `produce` needs for a transactional run.
pub struct TransactionRun<'a> {
    pub broker: &'a str,
    pub topic: &'a str,
    pub queue: Option<u32>,
    pub producer_group: &'a str,
    pub outcome: Outcome,
    pub check_answer: Outcome,
    pub check_wait: Duration,
    pub print_acks: bool,
}

/// Sends each stdin line as a half message and ends it as told; with `unknown`, stays and
/// answers check-backs with `check_answer` until every half it sent got a definite answer,
/// or `check_wait` passed.
pub fn produce(run: TransactionRun<'_>) -> Result<(), String> {
    // Our transactions not answered yet by our checker with commit or rollback.
    let waiting: Arc<Mutex<HashSet<String>>> = Arc::default();
    let answered_ours = Arc::new(AtomicU64::new(0));
    let checker = {
        let waiting = waiting.clone();
        let answered_ours = answered_ours.clone();
        let answer: TransactionOutcome = run.check_answer.into();
        Arc::new(move |c: &CheckBack| {
            eprintln!(
                "check-back transaction={} queue={} half_offset={} checks={} answer={}",
                c.transaction_id,
                c.queue,
                c.half_offset,
                c.checks,
                answer.as_str()
            );
            if answer != TransactionOutcome::Unknown
                && waiting
                    .lock()
                    .expect("waiting lock")
                    .remove(&c.transaction_id)
            {
                answered_ours.fetch_add(1, Ordering::Relaxed);
            }
            answer
        })
    };
    let producer = TransactionalProducer::start(
        TransactionConfig::new(run.broker, run.producer_group),
        checker,
    )
    .map_err(|e| e.to_string())?;
    let selector = match run.queue {
        Some(q) => QueueSelector::Queue(q),
        None => QueueSelector::RoundRobin,
    };
    let mut sent = 0u64;
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let line_no = i + 1;
        let message = Message::new(line.into_bytes());
        let result = producer
            .send(run.topic, selector, &[message], |half| {
                if run.outcome == Outcome::Unknown {
                    waiting
                        .lock()
                        .expect("waiting lock")
                        .insert(half.transaction_id.clone());
                }
                run.outcome.into()
            })
            .map_err(|e| format!("line {line_no}: {e}"))?;
        if run.print_acks {
            let h = &result.half;
            println!(
                "half line={line_no} queue={} half_offset={} level={} transaction={}",
                h.queue, h.half_offset, h.durability, h.transaction_id
            );
            if let Some(level) = result.durability {
                println!(
                    "end line={line_no} state={} offset={} level={level}",
                    result.state.as_str(),
                    result.offset.map_or("-".to_string(), |o| o.to_string())
                );
            }
        }
        sent += 1;
    }
    eprintln!(
        "sent {sent} transactional message(s), ended: {}",
        run.outcome_name()
    );
    if run.outcome != Outcome::Unknown {
        return Ok(());
    }
    // Let the check-backs resolve what was left open.
    let deadline = Instant::now() + run.check_wait;
    let ours = waiting.lock().expect("waiting lock").len() as u64;
    loop {
        let left = waiting.lock().expect("waiting lock").len();
        // Answered ones count once the end went out (answered_checks counts acked ends).
        if left == 0 && producer.answered_checks() >= answered_ours.load(Ordering::Relaxed) {
            eprintln!("all {ours} transaction(s) resolved by check-backs");
            return Ok(());
        }
        if Instant::now() >= deadline {
            if run.check_answer == Outcome::Unknown {
                eprintln!(
                    "{left} transaction(s) still open after {:?}: the broker checks back \
                     until transaction_check_max, then rolls them back",
                    run.check_wait
                );
                return Ok(());
            }
            return Err(format!(
                "{left} of {ours} transaction(s) were not checked back within {:?}",
                run.check_wait
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl TransactionRun<'_> {
    fn outcome_name(&self) -> &'static str {
        TransactionOutcome::from(self.outcome).as_str()
    }
}

/// `ringmq admin transactions`: one line per open transaction, then one per shard.
pub fn list(admin: &Admin) -> Result<(), String> {
    let lists = admin.transactions().map_err(|e| e.to_string())?;
    for (shard, l) in lists.iter().enumerate() {
        for o in &l.open {
            println!(
                "shard={shard} topic={} queue={} half_offset={} group={} transaction={} \
                 age_ms={} checks={} messages={}",
                o.topic,
                o.queue,
                o.half_offset,
                o.transaction.producer_group,
                o.transaction.id,
                o.age_ms,
                o.checks,
                o.messages
            );
        }
    }
    for (shard, l) in lists.iter().enumerate() {
        println!(
            "shard={shard} open={} listed={} discarded={}",
            l.open_total,
            l.open.len(),
            l.discarded
        );
    }
    Ok(())
}
