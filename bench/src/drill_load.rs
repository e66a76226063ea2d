//! The drills' load: pipelined producers sending numbered messages (see
//! [`drill::payload`]) until stopped, recording every ack and every failed send with the
//! moment it arrived. `drill kill` and `drill partition` audit what it recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringmq::client::{ClientError, Producer, ProducerConfig, QueueSelector, SendResult};
use ringmq::format::batch::Message;

use crate::drill::{self, DrillArgs, TOPIC};

/// An ack as it arrived: the message id, what the broker said, when.
pub struct RecordedAck {
    pub id: u64,
    pub result: SendResult,
    pub at: Instant,
}

/// How the load's producers behave.
pub struct LoadOptions {
    /// Client request timeout (no retries: every failure is recorded as the broker gave it).
    pub request_timeout: Duration,
    /// Whether a producer stops at its first refused send (a dead broker) or waits briefly
    /// and goes on (a broker that will answer again).
    pub stop_on_refused_send: bool,
    /// Turns a failure into the status the audit counts.
    pub classify: fn(&ClientError) -> String,
}

/// Producers sending until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<RecordedAck>>>,
    failures: Arc<Mutex<Vec<(String, Instant)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        args: &DrillArgs,
        addr: &str,
        round: u32,
        options: LoadOptions,
    ) -> Result<Load, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for p in 0..args.producers {
            let mut cfg = ProducerConfig::new(addr);
            cfg.retries = 0;
            cfg.request_timeout = options.request_timeout;
            let producer =
                Producer::with_config(cfg).map_err(|e| format!("producer {p} at {addr}: {e}"))?;
            let (stop, acks, failures) = (stop.clone(), acks.clone(), failures.clone());
            let (len, classify, stop_on_refused) = (
                args.message_bytes as usize,
                options.classify,
                options.stop_on_refused_send,
            );
            threads.push(std::thread::spawn(move || {
                let mut seq: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Ids are unique across rounds and producers: round | producer | sequence.
                    let id = (u64::from(round) << 48) | (u64::from(p) << 40) | seq;
                    seq += 1;
                    let (acks_cb, failures_cb) = (acks.clone(), failures.clone());
                    let sent = producer.send_async(
                        TOPIC,
                        QueueSelector::RoundRobin,
                        &Message::new(drill::payload(id, len)),
                        move |r| match r {
                            Ok(result) => acks_cb.lock().unwrap().push(RecordedAck {
                                id,
                                result,
                                at: Instant::now(),
                            }),
                            Err(e) => failures_cb
                                .lock()
                                .unwrap()
                                .push((classify(&e), Instant::now())),
                        },
                    );
                    if let Err(e) = sent {
                        failures
                            .lock()
                            .unwrap()
                            .push((classify(&e), Instant::now()));
                        if stop_on_refused {
                            break;
                        }
                        // Not a status of one send but of the producer: do not spin on it.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                producer.flush();
            }));
        }
        Ok(Load {
            stop,
            acks,
            failures,
            threads,
        })
    }

    pub fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    pub fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }

    pub fn wait_first_ack(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while self.acked() == 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "no ack within {within:?} of starting the load ({} sends failed)",
                    self.failed()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops the producers (each flushes what it has in flight) and returns what was recorded.
    pub fn finish(self) -> (Vec<RecordedAck>, Vec<(String, Instant)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let acks = std::mem::take(&mut *self.acks.lock().unwrap());
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (acks, failures)
    }
}
