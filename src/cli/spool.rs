//! `ringmq produce --spool DIR`: sync sends that fall back to a local spool when the broker
//! cannot ack them, and re-send what an earlier run spooled before anything else.

use std::io::{BufRead, Write};
use std::path::Path;

use ringmq::client::{Producer, ProducerConfig, QueueSelector, SendOutcome, SpoolConfig};
use ringmq::format::batch::Message;

use super::ProduceArgs;

pub fn produce(args: &ProduceArgs, mut config: ProducerConfig, dir: &Path) -> Result<(), String> {
    let mut spool = SpoolConfig::new(dir);
    if let Some(n) = args.spool_max_bytes {
        spool.max_bytes = n;
    }
    config.spool = Some(spool);
    let producer = Producer::with_config(config).map_err(|e| e.to_string())?;
    // What an earlier run left goes first; new lines would go to the spool behind it anyway.
    let earlier = producer.spool_pending();
    if earlier > 0 {
        // The background drain may have started first: count what every drain did.
        match producer.drain_spool().map(|_| producer.spool_drained()) {
            Ok(r) => eprintln!(
                "produce: re-sent {} spooled entr(ies) of an earlier run ({} already stored)",
                r.acked_entries, r.duplicates
            ),
            Err(e) => eprintln!(
                "produce: {} spooled entr(ies) of an earlier run not re-sent yet: {e}",
                producer.spool_pending()
            ),
        }
    }
    let mut out = std::io::stdout().lock();
    let (mut acked, mut spooled) = (0u64, 0u64);
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let line_no = i as u64 + 1;
        let selector = match (args.queue, args.key_by_line) {
            (Some(q), _) => QueueSelector::Queue(q),
            (None, true) => QueueSelector::KeyHash(line.as_bytes()),
            (None, false) => QueueSelector::RoundRobin,
        };
        let mut message = Message::new(line.clone().into_bytes());
        if args.key_by_line {
            message = message.with_key(line.clone().into_bytes());
        }
        match producer.send_or_spool(&args.topic, selector, &message) {
            Ok(SendOutcome::Acked(r)) => {
                acked += 1;
                if args.print_acks {
                    let _ = writeln!(
                        out,
                        "ack line={line_no} queue={} offset={} level={} epoch={}",
                        r.queue, r.offset, r.durability, r.epoch
                    );
                }
            }
            Ok(SendOutcome::Spooled(r)) => {
                spooled += 1;
                if args.print_acks {
                    let _ = writeln!(out, "spooled line={line_no} entry={}", r.entry);
                }
            }
            Err(e) => {
                let _ = out.flush();
                eprintln!("produce: acked={acked} spooled={spooled} (then failed)");
                return Err(format!("line {line_no}: {e}"));
            }
        }
        if args.print_acks {
            let _ = out.flush();
        }
    }
    let _ = out.flush();
    // One more try, so a broker that came back during the run gets what was spooled.
    if producer.spool_pending() > 0 {
        if let Err(e) = producer.drain_spool() {
            log::info!("spool not drained: {e}");
        }
    }
    eprintln!(
        "produce: acked={acked} spooled={spooled} spool_pending={} ({})",
        producer.spool_pending(),
        dir.display()
    );
    Ok(())
}
