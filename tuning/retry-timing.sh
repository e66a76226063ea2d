#!/usr/bin/env bash
# Retry timing against RocketMQ's delay levels: for each level given (default 1 2 3), one
# message is nacked by `ringmq consume --group --reject --reject-level L` until it reaches the
# dead-letter queue (max_reconsume_times 2), and the time between its deliveries is printed
# next to the level's delay. Starts its own broker (1 shard, loopback, a temp data dir) and
# stops it by PID.
#
#   tuning/retry-timing.sh [LEVEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin ringmq
bin=target/release/ringmq
port=${PORT:-29911}
dir=$(mktemp -d -p target ringmq-retry-XXXX)
delays=(0 1000 5000 10000 30000 60000 120000 180000 240000 300000 360000 420000 480000 540000 600000 1200000 1800000 3600000 7200000)
"$bin" broker --data-dir "$dir" --cores 1 --port "$port" --metrics-listen off 2>"$dir/broker.log" &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q "shard 0 listening on" "$dir/broker.log" && break; sleep 0.1; done
a=(--broker "127.0.0.1:$port")
printf "| level | delay ms | measured ms (2 retries) | late by ms |\n|---:|---:|---|---|\n"
for level in "${@:-1 2 3}"; do
  for l in $level; do
    g="timing-$l"
    "$bin" admin "${a[@]}" topic create "$g" --queues 1 >/dev/null
    "$bin" admin "${a[@]}" group create "$g" --max-reconsume-times 2 >/dev/null
    echo "level-$l" | "$bin" produce "${a[@]}" --topic "$g" >/dev/null 2>&1
    times=()
    while read -r _line; do
      times+=("$(date +%s%3N)")
      [ "${#times[@]}" -ge 3 ] && break
    done < <(timeout $(( delays[l] * 3 / 1000 + 20 )) "$bin" consume "${a[@]}" --topic "$g" \
               --group "$g" --reject --reject-level "$l" 2>/dev/null)
    if [ "${#times[@]}" -lt 3 ]; then echo "| $l | ${delays[l]} | only ${#times[@]} deliveries | - |"; continue; fi
    d1=$(( times[1] - times[0] )); d2=$(( times[2] - times[1] ))
    echo "| $l | ${delays[l]} | $d1, $d2 | $(( d1 - delays[l] )), $(( d2 - delays[l] )) |"
  done
done
