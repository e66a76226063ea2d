#!/usr/bin/env bash
# Restart time of a broker with a large log: after a clean stop (SIGTERM) and after SIGKILL
# under load, from the start of the process until it answers a request (`ringmq admin info`).
#
#   tuning/restart-time.sh [GB] [ROUNDS]      (default 4 GB, 2 rounds of each)
#
# Needs the release binaries (`cargo build --release -p ringmq -p ringmq-bench`). The broker
# runs on core 0 with ASYNC_FLUSH (to fill the log fast; recovery does not depend on the flush
# mode), 1 KiB messages in batches of 32; the data dir is on the real disk under /var/tmp.
# Every process started here is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
GB=${1:-4}
ROUNDS=${2:-2}
BIN=target/release
PORT=${PORT:-31811}
ADDR=127.0.0.1:$PORT
DATA=$(mktemp -d /var/tmp/ringmq-restart.XXXXXX)
BROKER=""
LOAD=""
cleanup() {
  [ -n "$LOAD" ] && kill "$LOAD" 2>/dev/null || true
  [ -n "$BROKER" ] && kill -9 "$BROKER" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $DATA" >&2; else rm -rf "$DATA"; fi
}
trap cleanup EXIT

start_broker() {
  "$BIN/ringmq" broker --cores 0, --port "$PORT" --data-dir "$DATA" --flush-mode async_flush \
    >>"$DATA.log" 2>&1 &
  BROKER=$!
}

# Starts the broker and sets ANSWERED to the seconds until it answers (no subshell: BROKER
# must stay this shell's).
time_to_answer() {
  local t0 t1
  t0=$(date +%s.%N)
  start_broker
  until "$BIN/ringmq" admin --broker "$ADDR" info >/dev/null 2>&1; do
    kill -0 "$BROKER" 2>/dev/null || { echo "broker exited; see $DATA.log" >&2; tail -5 "$DATA.log" >&2; exit 1; }
    sleep 0.02
  done
  t1=$(date +%s.%N)
  ANSWERED=$(echo "$t1 - $t0" | bc)
}

LOAD_ARGS=(run --broker "$ADDR" --producers 2 --queues 4 --message-bytes 1024 --batch 32
  --send-mode async --warmup-secs 0 --topic restart)
load() { # $1 = messages
  "$BIN/ringmq-bench" "${LOAD_ARGS[@]}" --messages "$1" >/dev/null 2>&1
}

echo "== filling $GB GB"
start_broker
until "$BIN/ringmq" admin --broker "$ADDR" info >/dev/null 2>&1; do kill -0 "$BROKER" || { tail -5 "$DATA.log"; exit 1; }; sleep 0.1; done
load $((GB * 1000 * 1000))
du -sh "$DATA" | sed 's/^/log size: /'

for r in $(seq 1 "$ROUNDS"); do
  kill -TERM "$BROKER"; wait "$BROKER" || true
  time_to_answer
  echo "round $r clean stop -> answers after $ANSWERED s"
  # Under load, then SIGKILL. (The bench is started directly, so that $! is its PID.)
  "$BIN/ringmq-bench" "${LOAD_ARGS[@]}" --duration-secs 60 >/dev/null 2>&1 &
  LOAD=$!
  sleep 3
  kill -9 "$BROKER"; wait "$BROKER" 2>/dev/null || true
  kill -9 "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true
  LOAD=""
  time_to_answer
  echo "round $r SIGKILL under load -> answers after $ANSWERED s"
done
grep -h "storage: opened\|background check" "$DATA.log" | tail -8 | cut -c1-400
kill -TERM "$BROKER"; wait "$BROKER" || true
BROKER=""
[ -n "${KEEP:-}" ] || rm -f "$DATA.log"
