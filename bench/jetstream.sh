#!/usr/bin/env bash
# bench/jetstream.sh: inbound accept rate with the JetStream queue (single nats-server, file
# storage) next to the local spool, same binary, same load: smtp-source b (50 sessions,
# 20000 x 1 KB) and c (50 sessions, 2000 x 100 KB). Loopback only; stops what it starts.
#   bench/jetstream.sh                 # prints a markdown table; results in bench/results/
# nats-server runs twice: with its default sync (it acknowledges before fsync; it syncs every
# 2 min) and with `sync_interval: always` (fsync before the PubAck, the durable setting).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${BENCH_WORK:-/tmp/mailroom-bench-js}
NATS_BIN=$(grep -s '^MAILROOM_NATS_SERVER=' ~/.cache/mailroom/tools/current.env | cut -d= -f2)
[ -x "${NATS_BIN:-}" ] || NATS_BIN=$(./e2e/tools/build.sh >/dev/null && grep '^MAILROOM_NATS_SERVER=' ~/.cache/mailroom/tools/current.env | cut -d= -f2)
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }
say() { printf '[jetstream.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cargo build --release -p mailroom >&2
rm -rf "$WORK"; mkdir -p "$WORK"; cp target/release/mailroom "$WORK/mailroom"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; }   # clock ticks

start_nats() { # $1 = sync setting ("" or "always")
  rm -rf "$WORK/js"; mkdir -p "$WORK/js"
  { echo "listen: 127.0.0.1:4299"; echo "http: 127.0.0.1:8299"
    echo "jetstream { store_dir: \"$WORK/js\"$( [ -n "$1" ] && echo ", sync_interval: $1") }"; } > "$WORK/nats.conf"
  "$NATS_BIN" -c "$WORK/nats.conf" > "$WORK/nats.log" 2>&1 & NATS_PID=$!; pids+=("$NATS_PID")
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:8299/healthz?js-enabled-only=true" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "nats-server did not start" >&2; exit 1
}

start_mailroom() { # $1 = queue yaml block
  cat > "$WORK/mailroom.yaml" <<YAML
hostname: mx.bench.test
listeners:
  - name: bench
    address: "127.0.0.1:2610"
    acceptedDomains: [test.example]
    limits: { maxConnectionsPerIp: 5000 }
queue:
$1
policies: [ { name: default, hold: true } ]
http: { address: "127.0.0.1:9610" }
log: { level: warn, deliveryLog: "$WORK/delivery.jsonl" }
YAML
  "$WORK/mailroom" serve --config "$WORK/mailroom.yaml" 2> "$WORK/mailroom.log" & MR_PID=$!; pids+=("$MR_PID")
  for _ in $(seq 100); do curl -fs http://127.0.0.1:9610/readyz >/dev/null 2>&1 && return; sleep 0.1; done
  echo "mailroom did not become ready: $(tail -5 "$WORK/mailroom.log")" >&2; exit 1
}

run() { # $1 label, $2 sessions, $3 messages, $4 size; extra pids to account in $EXTRA
  smtp-source -s 10 -m 200 -l 1024 -f from@test -t to@test.example 127.0.0.1:2610   # warm-up
  sync; sleep 1
  local c0 n0=0 c1 n1=0 t0 t1
  c0=$(cpu_of "$MR_PID"); [ -n "${EXTRA:-}" ] && n0=$(cpu_of "$EXTRA")
  t0=$(date +%s.%N)
  timeout 300 smtp-source -s "$2" -m "$3" -l "$4" -f from@test -t to@test.example 127.0.0.1:2610
  t1=$(date +%s.%N)
  c1=$(cpu_of "$MR_PID"); [ -n "${EXTRA:-}" ] && n1=$(cpu_of "$EXTRA")
  python3 - "$1" "$3" "$t0" "$t1" "$c0" "$c1" "$n0" "$n1" <<'PY'
import sys
label, m, t0, t1, c0, c1, n0, n1 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
wall = t1 - t0
print(f"| {label} | {m/wall:,.0f} | {(c1-c0)/wall:.0f} % | {(n1-n0)/wall:.0f} % | {((c1-c0)+(n1-n0))*10000/m:,.0f} |")
PY
}

echo "| backend, scenario | msgs/s | mailroom CPU | nats-server CPU | CPU µs/msg (both) |"
echo "|---|---:|---:|---:|---:|"
say "local spool (syncfs group commit)"
start_mailroom "  local: { path: \"$WORK/spool\" }"; EXTRA=""
run "local, b 50 sess 1 KB" 50 20000 1024
run "local, c 50 sess 100 KB" 50 2000 102400
kill "$MR_PID"; wait "$MR_PID" 2>/dev/null || true
for sync in "" always; do
  label="jetstream$( [ -n "$sync" ] && echo " sync_interval=always" || echo " (nats default sync)")"
  say "$label"
  start_nats "$sync"
  start_mailroom "  jetstream: { urls: [\"nats://127.0.0.1:4299\"] }"; EXTRA=$NATS_PID
  run "$label, b 50 sess 1 KB" 50 20000 1024
  run "$label, c 50 sess 100 KB" 50 2000 102400
  kill "$MR_PID" "$NATS_PID"; wait "$MR_PID" "$NATS_PID" 2>/dev/null || true
done
