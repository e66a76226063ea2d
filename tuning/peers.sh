#!/usr/bin/env bash
# The performance issue's table in one run: Redis 7 with AOF (`redis-server`, Debian's package)
# and RingMQ's `ringmq-bench run --workload wN`, each server on core 0 and its load generator on
# core 1, 256-byte messages, plus the floors of the same run (a 4 KiB O_DIRECT write +
# fdatasync, a loopback round trip). Prints a markdown table and writes every raw output to
# OUT (default ./peers-<date>).
#
#   tuning/peers.sh [OUT]        (needs: redis-server redis-benchmark, a release build)
#
# RingMQ runs with both load drivers where the load generator decides the figure (W1's client
# wake-ups, W2 and W3b's 50 producers); the load core's CPU is in RingMQ's rows (`load CPU %`), and `top` shows
# redis-benchmark's. Figures move 10-30 % between runs on a shared VM: run it three times and
# take medians.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bench="$here/target/release/ringmq-bench"
ringmq="$here/target/release/ringmq"
out=${1:-"$PWD/peers-$(date +%Y%m%d-%H%M%S)"}
secs=${PEERS_SECS:-5}
for tool in redis-server redis-benchmark taskset python3; do
  command -v "$tool" >/dev/null || { echo "peers.sh: $tool not found (apt-get install redis-server redis-tools util-linux python3)" >&2; exit 2; }
done
for bin in "$bench" "$ringmq"; do
  [ -x "$bin" ] || { echo "peers.sh: $bin missing: cargo build --release --workspace" >&2; exit 2; }
done
mkdir -p "$out"
work=$(mktemp -d "$out/data.XXXX")   # on the same disk as OUT: never tmpfs
redis_pid=
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- floors -------------------------------------------------------------------------------
echo "floors ..." >&2
(cd "$work" && taskset -c 0 "$bench" storage --quick) > "$out/floor-storage.txt" 2>&1
floor_fsync_us=$(awk -F'|' '/raw 4 KiB pwrite\+fdatasync/ {gsub(/ /,"",$5); print $5; exit}' "$out/floor-storage.txt")

# --- Redis --------------------------------------------------------------------------------
redis_port=16379
start_redis() { # appendfsync
  rm -rf "$work/redis" && mkdir -p "$work/redis"
  taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work/redis" \
    --save "" --appendonly yes --appendfsync "$1" --daemonize no --logfile "$work/redis/log" &
  redis_pid=$!
  for _ in $(seq 1 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "peers.sh: redis-server did not start (see $work/redis/log)" >&2
  exit 1
}
stop_redis() {
  kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid=
}
# name fsync clients pipeline requests
redis_row() {
  local name=$1 fsync=$2 clients=$3 pipeline=$4 n=$5
  start_redis "$fsync"
  taskset -c 1 redis-benchmark -p "$redis_port" -t set -d 256 -r 1000000 -c "$clients" \
    -P "$pipeline" -n "$n" --csv > "$out/redis-$name.csv" 2>"$out/redis-$name.err"
  stop_redis
}
# A round trip on Redis' own connection, for the floor (redis-benchmark -t ping, 1 client).
start_redis everysec
taskset -c 1 redis-benchmark -p "$redis_port" -t ping_mbulk -c 1 -n 20000 --csv > "$out/redis-ping.csv" 2>/dev/null
stop_redis
echo "redis ..." >&2
redis_row w1 always 1 1 15000
redis_row w2 always 50 1 150000
redis_row w3a always 1 1000 500000
redis_row w3b always 50 16 800000
redis_row w4a everysec 2 1000 2000000
redis_row w4b everysec 50 16 2000000

# --- RingMQ -------------------------------------------------------------------------------
echo "ringmq ..." >&2
ring_row() { # name args...
  local name=$1; shift
  (cd "$work" && "$bench" run "$@" --duration-secs "$secs" --data-root "$work" --out "$out/ringmq-$name") \
    > "$out/ringmq-$name.txt" 2>&1
}
ring_row w1 --workload w1
ring_row w1-event-loop --workload w1 --driver event-loop
ring_row w2 --workload w2
ring_row w2-event-loop --workload w2 --driver event-loop
ring_row w3a --workload w3a
ring_row w3b --workload w3b
ring_row w3b-event-loop --workload w3b --driver event-loop
ring_row w3c --workload w3c
ring_row w4a --workload w4a
ring_row w4b --workload w4b
# The round trip: a broker of its own, one shard on core 0, `ringmq ping` from core 1.
mkdir -p "$work/ping"
ping_port=17911
taskset -c 0 "$ringmq" broker --data-dir "$work/ping" --port "$ping_port" --cores 0, \
  --metrics-listen off > "$work/ping.log" 2>&1 &
broker_pid=$!
for _ in $(seq 1 200); do
  taskset -c 1 "$ringmq" ping --broker "127.0.0.1:$ping_port" >/dev/null 2>&1 && break
  sleep 0.05
done
sleep 2 # past the first segment's preparation
taskset -c 1 "$ringmq" ping --broker "127.0.0.1:$ping_port" --count 201 > "$out/ringmq-ping.txt" 2>&1 || true
kill "$broker_pid"; wait "$broker_pid" 2>/dev/null || true

# --- the table ----------------------------------------------------------------------------
python3 - "$out" "$floor_fsync_us" <<'EOF'
import csv, json, os, re, statistics, sys
out, floor = sys.argv[1], sys.argv[2]

def redis(name):
    with open(os.path.join(out, f"redis-{name}.csv")) as f:
        rows = list(csv.DictReader(f))
    r = rows[0]
    return float(r["rps"]), float(r["p50_latency_ms"]) * 1000, float(r["p99_latency_ms"]) * 1000

def ring(name):
    with open(os.path.join(out, f"ringmq-{name}", "report.json")) as f:
        m = json.load(f)["modes"][0]
    cpu = m.get("cpu") or {}
    return m["msgs_per_sec"], m["latency"]["p50_us"], m["latency"]["p99_us"], cpu.get("load_cpu_pct", 0)

ping_us = None
try:
    text = open(os.path.join(out, "ringmq-ping.txt")).read()
    rtts = [float(x) for x in re.findall(r" in ([0-9]+) us", text)]
    ping_us = statistics.median(rtts) if rtts else None
except OSError:
    pass
redis_ping = redis("ping")

rows = [
    ("W1: 1 producer, 1 msg/request, durable", "w1 always c1", "w1", ["w1", "w1-event-loop"]),
    ("W2: 50 producers, 1 msg/request, durable", "w2 always c50", "w2", ["w2", "w2-event-loop"]),
    ("W3a: 1 producer, 1000-msg batches, durable", "w3a always P1000", "w3a", ["w3a"]),
    ("W3b: 50 producers, 16-msg batches, durable", "w3b always c50 P16", "w3b", ["w3b", "w3b-event-loop"]),
    ("W3c: 1 producer, pipelined async sends, durable", "(W3b's)", "w3b", ["w3c"]),
    ("W4a: no fsync on the ack path, 2 x 1000-msg batches", "everysec c2 P1000", "w4a", ["w4a"]),
    ("W4b: no fsync, pipelined async sends", "everysec c50 P16", "w4b", ["w4b"]),
]
print(f"Floors of this run: 4 KiB O_DIRECT write + fdatasync p50 {floor} µs; "
      f"loopback round trip (ringmq ping, median) {ping_us if ping_us is None else round(ping_us)} µs; "
      f"redis-benchmark PING p50 {redis_ping[1]:.0f} µs.\n")
print("| workload | Redis 7 AOF | RingMQ | RingMQ / Redis |")
print("|---|---|---|---:|")
for label, rlabel, rname, names in rows:
    rr = redis(rname)
    cells = []
    best = 0.0
    for n in names:
        try:
            t, p50, p99, cpu = ring(n)
        except (OSError, KeyError, IndexError):
            cells.append(f"{n}: failed (see ringmq-{n}.txt)")
            continue
        best = max(best, t)
        driver = " event loop" if n.endswith("event-loop") else ""
        cells.append(f"{t:,.0f}/s, p50 {p50/1000:.2f} ms, p99 {p99/1000:.2f} ms, load CPU {cpu:.0f} %{driver}")
    print(f"| {label} | {rlabel}: {rr[0]:,.0f}/s, p50 {rr[1]/1000:.2f} ms, p99 {rr[2]/1000:.2f} ms | "
          f"{'; '.join(cells)} | {best / rr[0]:.2f}x |")
try:
    t, p50, p99, _ = ring("w1")
    if ping_us and floor:
        print(f"\nW1 p50 / (fdatasync floor + round trip) = {p50:.0f} / ({floor} + {ping_us:.0f}) = "
              f"{p50 / (float(floor) + ping_us):.2f}; p99 / p50 = {p99 / p50:.2f}")
except (OSError, KeyError, ValueError, ZeroDivisionError):
    pass
EOF
