#!/usr/bin/env bash
# How much does a slave catching up a backlog hurt the master's produce latency?
#
#   tuning/catchup-experiment.sh [CAP_BYTES_PER_SEC]     (default 67108864; 0 = no cap)
#
# 1. A master (core 0, SYNC_FLUSH) gets a backlog of ~6.5 GB (400k x 16 KiB, async sends).
# 2. Baseline: open-loop probe, 2000 msgs/s of 1 KiB SYNC sends for 8 s, load on core 1.
# 3. An empty slave (core 1) starts; the same probe runs while it catches up.
# The slave's log is on /dev/shm (--allow-non-direct-io) so that only the master's reads touch
# the disk: on one machine the slave's writes would hit the same disk, which is not what two
# hosts see. Prints both probe rows and the catch-up rate the master reported each second.
set -euo pipefail
CAP="${1:-67108864}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
B="$ROOT/target/release/ringmq"; RB="$ROOT/target/release/ringmq-bench"
W="$(mktemp -d -p "$ROOT" .catchup-XXXX)"; S="/dev/shm/ringmq-catchup-$$"
cleanup() { kill "${SP:-}" "${MP:-}" "${PP:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W" "$S"; }
trap cleanup EXIT
(cd "$ROOT" && cargo build --release -q -p ringmq -p ringmq-bench)
$B broker --data-dir "$W/m" --cores 0, --port 30911 --segment-bytes 268435456 \
  --replica-catchup-bytes-per-sec "$CAP" > "$W/m.log" 2>&1 & MP=$!
sleep 2
$RB run --broker 127.0.0.1:30911 --send-mode async --message-bytes 16384 --messages 400000 \
  --warmup-secs 0 --producers 4 --load-cores 1 --topic backlog > /dev/null 2>&1
LOAD="--broker 127.0.0.1:30911 --rate 2000 --producers 4 --duration-secs 8 --warmup-secs 1 --load-cores 1"
$RB run $LOAD --topic probe > "$W/base.out" 2>&1
$B broker --data-dir "$S" --allow-non-direct-io --cores 1, --port 31911 --segment-bytes 268435456 \
  --role slave --master 127.0.0.1:30911 > "$W/s.log" 2>&1 & SP=$!
( while sleep 1; do $B admin --broker 127.0.0.1:30911 replication; done ) > "$W/poll.out" 2>&1 & PP=$!
$RB run $LOAD --topic probe2 > "$W/during.out" 2>&1
echo "catch-up cap: $CAP bytes/s"
grep -m1 -E "^\| mode" "$W/base.out"
echo "baseline:"; grep -E "^\| sync-flush" "$W/base.out"
echo "during catch-up:"; grep -E "^\| sync-flush" "$W/during.out"
echo "master's view each second:"; awk '{print $8, $9, $10}' "$W/poll.out" | head -6
