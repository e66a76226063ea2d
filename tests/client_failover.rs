//! Clients that follow a failover by themselves: a SYNC_MASTER master and its slave as broker
//! processes on loopback, clients given both ("master,slave"), the master SIGKILLed mid-stream
//! and the slave promoted by hand (`Admin::promote`). The producer must finish with every send
//! acked and nothing stored twice (its re-sends keep their producer id, epoch and sequence, and
//! the promoted slave rebuilt the producer table from the replicated log); the consumer must go
//! on from its offsets on the new master with no gap and no repeat.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmq::client::{Admin, ClientError, Consumer, Producer, ProducerConfig, QueueSelector};
use ringmq::format::batch::Message;

use common::process::BrokerProcess;
use common::watchdog;

/// A SYNC_MASTER master (durable replica acks) and its slave, one shard each on cores of
/// their own, the slave caught up. The master's peer answers nothing (the slave dials the
/// master), so it is forced to start as master.
/// Both brokers issue their SYNC_FLUSH cycles through io_uring (`--sync-flush-io ring`): the
/// drill needs batches stored on the slave and not yet acked when the master freezes, and
/// inline cycles (the default) ack sooner: one CI run (debug build) of two found none in 8
/// runs, where a local release run finds one in the first. The window is timing, not a
/// setting: a drill that holds the acks back itself would not depend on it (not built).
fn start_pair(mdir: &std::path::Path, sdir: &std::path::Path) -> (BrokerProcess, BrokerProcess) {
    let master = BrokerProcess::start(
        mdir,
        "0,",
        &[
            "--replication",
            "sync_master",
            "--replica-ack",
            "durable",
            "--peer",
            "127.0.0.1:1",
            "--force-master",
            "--sync-flush-io",
            "ring",
        ],
    );
    let slave_core = if common::available_cores() > 1 {
        "1,"
    } else {
        "0,"
    };
    let slave = BrokerProcess::start(
        sdir,
        slave_core,
        &[
            "--role",
            "slave",
            "--master",
            master.addr(),
            "--sync-flush-io",
            "ring",
        ],
    );
    common::wait_caught_up(
        &Admin::connect(master.addr()).unwrap(),
        Duration::from_secs(20),
    );
    (master, slave)
}

/// Every message of `topic` on `addr`, per queue in offset order: (offset, payload).
fn read_topic(addr: &str, topic: &str, queues: u32) -> BTreeMap<u32, Vec<(u64, String)>> {
    let mut out: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    let consumer = Consumer::connect(addr).unwrap();
    for (q, offset, payload) in common::read_all(&consumer, topic, queues) {
        out.entry(q)
            .or_default()
            .push((offset, String::from_utf8(payload).unwrap()));
    }
    out
}

/// The number in a payload `prefix-N`.
fn number(payload: &str) -> usize {
    payload
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("payload {payload:?}"))
}

/// What a send heard, if anything yet.
type Answer = Option<Result<Ack, ClientError>>;

/// One ack the producer heard: when, and from which master epoch.
struct Ack {
    at: Instant,
    queue: u32,
    offset: u64,
    epoch: u64,
    /// The broker had stored it before: a re-send the new master de-duplicated.
    duplicate: bool,
}

#[test]
fn a_pipelined_producer_given_master_and_slave_follows_a_failover_without_loss_or_duplicates() {
    /// Runs of the drill, at most, until one had a re-send the new master had stored already.
    const RUNS: usize = 8;
    let _watchdog = watchdog(Duration::from_secs(240));
    for run in 1..=RUNS {
        let duplicates = producer_drill(MasterEnd::Killed);
        if duplicates > 0 {
            return;
        }
        // The freeze came while no batch was stored on the slave and not yet acked: correct,
        // but the de-duplication was not put to the test.
        eprintln!("run {run}: no re-send was a duplicate; again");
    }
    panic!("{RUNS} runs and no re-send was ever a duplicate: the drill does not test idempotence");
}

/// A master that stops taking bytes and never resets its connections (a cable pulled, a
/// frozen host) must not hold a pipelined producer: its writes fill the socket buffers and
/// block, and only closing the connection (the request timeout presumes the broker dead)
/// frees them, so the producer can fail over to the promoted slave.
#[test]
fn a_pipelined_producer_fails_over_from_a_master_that_stops_taking_bytes() {
    let _watchdog = watchdog(Duration::from_secs(240));
    producer_drill(MasterEnd::Silent);
}

/// A new producer given a list whose first broker is a frozen master (it takes the
/// connection and the request, and never answers) reaches the promoted slave: the route it
/// asks the frozen one for times out, and the timeout fails it over to the next broker of the
/// list (it failed the send instead once, in a CI run of the drill above).
#[test]
fn a_producer_whose_first_broker_is_frozen_asks_the_next_one() {
    let _watchdog = watchdog(Duration::from_secs(120));
    let (mdir, sdir) = (common::data_dir(), common::data_dir());
    let (mut master, slave) = start_pair(mdir.path(), sdir.path());
    Admin::connect(master.addr())
        .unwrap()
        .create_topic("z", 2)
        .unwrap();
    common::wait_caught_up(
        &Admin::connect(master.addr()).unwrap(),
        Duration::from_secs(20),
    );
    master.freeze();
    Admin::connect(slave.addr())
        .unwrap()
        .promote()
        .expect("promote");
    let mut config = ProducerConfig::new(format!("{},{}", master.addr(), slave.addr()));
    config.request_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let producer = Producer::with_config(config).expect("a producer");
    let r = producer
        .send("z", QueueSelector::Queue(0), &Message::new(b"z-1".to_vec()))
        .expect("sent to the promoted slave");
    eprintln!(
        "acked at offset {} by epoch {} after {:?}",
        r.offset,
        r.epoch,
        started.elapsed()
    );
    drop(producer);
    drop(master);
}

/// How the drill's master goes.
#[derive(Clone, Copy, PartialEq)]
enum MasterEnd {
    /// Frozen, then SIGKILLed: its connections are reset at once.
    Killed,
    /// Frozen (SIGSTOP) to the end: its kernel keeps the connections open and takes bytes
    /// until the socket buffers are full, then nothing; it never answers or resets.
    Silent,
}

/// One producer drill (see the tests above); returns how many acks were of re-sends the new
/// master had stored already.
fn producer_drill(end: MasterEnd) -> usize {
    const KILL_AFTER: usize = 1_000;
    const QUEUES: u32 = 4;
    const BURST: usize = 150;
    // A silent master gets 16 KiB messages, and many after it went silent: the batches
    // written to it are then several times the loopback socket buffers (a few MiB), so the
    // producer's writes do block.
    let (pad, total) = match end {
        MasterEnd::Killed => ("m".to_string(), 3_000),
        MasterEnd::Silent => ("x".repeat(16 << 10), 8_000),
    };
    let (mdir, sdir) = (common::data_dir(), common::data_dir());
    let (mut master, slave) = start_pair(mdir.path(), sdir.path());
    Admin::connect(master.addr())
        .unwrap()
        .create_topic("f", QUEUES)
        .unwrap();
    common::wait_caught_up(
        &Admin::connect(master.addr()).unwrap(),
        Duration::from_secs(20),
    );
    let old_epoch = Admin::connect(master.addr())
        .unwrap()
        .broker_info()
        .unwrap()
        .epoch;
    let slave_addr = slave.addr().to_string();

    let list = format!("{},{}", master.addr(), slave.addr());
    let results: Arc<Mutex<Vec<Answer>>> = Arc::new(Mutex::new((0..total).map(|_| None).collect()));
    let acked = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (results, acked, sent) = (results.clone(), acked.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut config = ProducerConfig::new(list);
            if end == MasterEnd::Silent {
                // Only the request timeout tells a silent master from a slow one.
                config.request_timeout = Duration::from_secs(2);
            }
            let producer = Producer::with_config(config).unwrap();
            for i in 0..total {
                let (results, acked) = (results.clone(), acked.clone());
                producer
                    .send_async(
                        "f",
                        QueueSelector::RoundRobin,
                        &Message::new(format!("{pad}-{i}").into_bytes()),
                        move |r| {
                            let r = r.map(|r| Ack {
                                at: Instant::now(),
                                queue: r.queue,
                                offset: r.offset,
                                epoch: r.epoch,
                                duplicate: r.duplicate,
                            });
                            if r.is_ok() {
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            results.lock().unwrap()[i] = Some(r);
                        },
                    )
                    .expect("send_async");
                sent.fetch_add(1, Ordering::Relaxed);
                // Bursts: many batches in flight when the master dies, some of them stored on
                // the slave but not yet acked (the ones a re-send must not store twice).
                if i % BURST == BURST - 1 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            producer.flush();
        })
    };

    // The kill comes after KILL_AFTER acks, in a burst: with sends in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < KILL_AFTER
        || sent.load(Ordering::Relaxed) < acked.load(Ordering::Relaxed) + BURST / 2
    {
        assert!(
            Instant::now() < deadline,
            "the first {KILL_AFTER} acks never came"
        );
        std::hint::spin_loop();
    }
    // Past the linger: the burst's batches are at the master, on their way to the slave.
    std::thread::sleep(Duration::from_millis(3));
    let acked_at_kill = acked.load(Ordering::Relaxed);
    let sent_at_kill = sent.load(Ordering::Relaxed);
    // Frozen first, then killed: what it had sent its slave by then is stored there, and the
    // acks for it never leave, so the producer re-sends batches the new master already has.
    let killed_at = Instant::now();
    master.freeze();
    let frozen = match end {
        MasterEnd::Killed => {
            std::thread::sleep(Duration::from_millis(20));
            master.kill9();
            None
        }
        MasterEnd::Silent => Some(master),
    };
    let new_epoch = Admin::connect(&slave_addr)
        .unwrap()
        .promote()
        .expect("promote");
    let promoted_after = killed_at.elapsed();
    assert!(new_epoch > old_epoch, "{new_epoch} after {old_epoch}");
    // A producer blocked in a write to the silent master would wait for TCP to give up on
    // it (many minutes): the drill gives it a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sender.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the producer is stuck: {} of {total} sent, {} acked, 60 s after the master went silent",
            sent.load(Ordering::Relaxed),
            acked.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sender.join().expect("the producer thread");
    drop(frozen);

    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut acks = Vec::with_capacity(total);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Some(Ok(a)) => acks.push(a),
            Some(Err(e)) => panic!("message {i} failed: {e}"),
            None => panic!("message {i} was never answered"),
        }
    }
    let first_new = acks
        .iter()
        .filter(|a| a.epoch == new_epoch)
        .map(|a| a.at)
        .min()
        .expect("acks from the new master");
    let failover = first_new.saturating_duration_since(killed_at);
    let from_new = acks.iter().filter(|a| a.epoch == new_epoch).count();
    let duplicates = acks.iter().filter(|a| a.duplicate).count();
    eprintln!(
        "{} the master after {acked_at_kill} acks ({sent_at_kill} sent); promoted {promoted_after:?} later; \
         first ack from the new master (epoch {new_epoch}) {failover:?} after the kill; \
         {from_new} of {total} acked by it, {duplicates} of them re-sends it de-duplicated",
        match end {
            MasterEnd::Killed => "killed",
            MasterEnd::Silent => "silenced",
        }
    );

    // Every acked message is on the new master exactly once, where its ack said, and each
    // queue holds its messages in send order.
    let stored = read_topic(&slave_addr, "f", QUEUES);
    let mut seen: HashMap<usize, (u32, u64)> = HashMap::new();
    for (q, messages) in &stored {
        let mut last = None;
        for (offset, payload) in messages {
            let n = number(payload);
            if let Some((q0, o0)) = seen.insert(n, (*q, *offset)) {
                panic!("message {n} stored twice: {q0}/{o0} and {q}/{offset}");
            }
            assert!(
                last.map_or(true, |l| l < n),
                "queue {q} out of order: {n} at offset {offset} after {last:?}"
            );
            last = Some(n);
        }
    }
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(
            seen.get(&i),
            Some(&(a.queue, a.offset)),
            "message {i} acked at {}/{}",
            a.queue,
            a.offset
        );
    }
    assert_eq!(seen.len(), total, "stored messages that were never sent");
    duplicates
}

#[test]
fn a_consumer_given_master_and_slave_reads_on_across_a_failover_with_no_gap_or_repeat() {
    const BEFORE: usize = 2_000;
    const AFTER: usize = 500;
    const QUEUES: u32 = 2;
    let _watchdog = watchdog(Duration::from_secs(120));
    let (mdir, sdir) = (common::data_dir(), common::data_dir());
    let (master, slave) = start_pair(mdir.path(), sdir.path());
    Admin::connect(master.addr())
        .unwrap()
        .create_topic("c", QUEUES)
        .unwrap();
    let list = format!("{},{}", master.addr(), slave.addr());
    {
        let producer = Producer::connect(master.addr()).unwrap();
        for i in 0..BEFORE {
            producer
                .send_batch(
                    "c",
                    QueueSelector::Queue(i as u32 % QUEUES),
                    &[Message::new(format!("c-{i}").into_bytes())],
                )
                .unwrap();
        }
    }

    // Reads slowly (small fetches, a pause after each), so it is mid-stream at the kill.
    let read = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (list, read, stop) = (list.clone(), read.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut consumer = Consumer::connect(&list).unwrap();
            consumer.max_bytes = 2048;
            let mut offsets = vec![0u64; QUEUES as usize];
            let mut got: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
            while read.load(Ordering::Relaxed) < BEFORE + AFTER && !stop.load(Ordering::Relaxed) {
                for q in 0..QUEUES {
                    let f = consumer
                        .fetch("c", q, offsets[q as usize], Duration::from_millis(50))
                        .unwrap_or_else(|e| panic!("fetch of queue {q}: {e}"));
                    for m in f.messages {
                        let payload = String::from_utf8(m.payload.to_vec()).unwrap();
                        got.entry(q).or_default().push((m.offset, payload));
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    offsets[q as usize] = f.next_offset;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            got
        })
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    while read.load(Ordering::Relaxed) < BEFORE / 3 {
        assert!(Instant::now() < deadline, "the consumer never got going");
        std::thread::sleep(Duration::from_millis(1));
    }
    let read_at_kill = read.load(Ordering::Relaxed);
    master.kill9();
    Admin::connect(slave.addr())
        .unwrap()
        .promote()
        .expect("promote");
    // More messages, taken by the new master.
    {
        let producer = Producer::connect(&list).unwrap();
        for i in BEFORE..BEFORE + AFTER {
            producer
                .send_batch(
                    "c",
                    QueueSelector::Queue(i as u32 % QUEUES),
                    &[Message::new(format!("c-{i}").into_bytes())],
                )
                .unwrap();
        }
    }
    // A consumer that skipped a message would wait for it for ever: it gets 20 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while read.load(Ordering::Relaxed) < BEFORE + AFTER && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let got = reader.join().expect("the consumer thread");
    eprintln!("the master was killed after the consumer read {read_at_kill} of {BEFORE}");
    assert!(
        read_at_kill < BEFORE,
        "the consumer had read everything before the kill"
    );
    let stored = read_topic(slave.addr(), "c", QUEUES);
    for q in 0..QUEUES {
        let (got, stored) = (&got[&q], &stored[&q]);
        for (i, (offset, _)) in got.iter().enumerate() {
            assert_eq!(*offset, i as u64, "queue {q}: a gap or a repeat at {i}");
        }
        assert_eq!(got, stored, "queue {q}: what was read is what is stored");
    }
    let total: usize = got.values().map(Vec::len).sum();
    assert_eq!(total, BEFORE + AFTER);
}
