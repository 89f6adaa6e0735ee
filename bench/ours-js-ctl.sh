#!/usr/bin/env bash
# ours-js-ctl.sh {start|stop|restart|restart-aside|purge-trash|status|count|pid}
#
# The `ours-jetstream` benchmark peer: one nats-server (JetStream, file storage,
# `sync_interval: always`) plus Mailroom with bench/mailroom-bench-js.yaml, both by PID file in
# BENCH_WORK/js. `pid` prints both PIDs (the harness measures both process trees). restart
# restarts Mailroom only (the stream keeps its messages, like a kept spool); restart-aside also
# wipes the stream (a fresh nats-server store). Mailroom itself is handled by ours-ctl.sh.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BENCH_WORK:-/tmp/mailroom-bench}
JS=$BASE/js
export BENCH_WORK=$JS
export MAILROOM_BIN=${MAILROOM_BIN:-$BASE/bin/mailroom}
export MAILROOM_BENCH_CONFIG=$HERE/mailroom-bench-js.yaml
export OURS_SMTP=127.0.0.1:2601 OURS_HTTP=127.0.0.1:9601
NATS_PIDF=$JS/nats.pid
NATS_BIN=${MAILROOM_NATS_SERVER:-$(grep -s '^MAILROOM_NATS_SERVER=' ~/.cache/mailroom/tools/current.env | cut -d= -f2)}

nats_pid() {
  [ -f "$NATS_PIDF" ] || return 1
  local pid; pid=$(cat "$NATS_PIDF" 2>/dev/null)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q nats-server "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

nats_start() {
  nats_pid >/dev/null && return 0
  [ -x "${NATS_BIN:-}" ] || { echo "no nats-server (run e2e/tools/build.sh)" >&2; return 1; }
  mkdir -p "$JS/store"
  cat >"$JS/nats.conf" <<CONF
listen: 127.0.0.1:4290
http: 127.0.0.1:8290
max_payload: 8MB
jetstream { store_dir: "$JS/store", sync_interval: always }
CONF
  (setsid nohup "$NATS_BIN" -c "$JS/nats.conf" >>"$JS/nats.log" 2>&1 </dev/null & echo $! >"$NATS_PIDF")
  for _ in $(seq 1 200); do
    curl -sf -m 1 "http://127.0.0.1:8290/healthz?js-enabled-only=true" >/dev/null && return 0
    sleep 0.1
  done
  echo "nats-server did not start; see $JS/nats.log" >&2
  return 1
}

nats_stop() {
  local pid
  if pid=$(nats_pid); then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$NATS_PIDF"
}

mkdir -p "$JS"
case "${1:-status}" in
  start) nats_start && "$HERE/ours-ctl.sh" start ;;
  stop) "$HERE/ours-ctl.sh" stop; nats_stop ;;
  restart) nats_start && OURS_KEEP_SPOOL=1 "$HERE/ours-ctl.sh" restart ;;
  restart-aside)
    "$HERE/ours-ctl.sh" stop; nats_stop
    if [ -d "$JS/store" ]; then mkdir -p "$JS/trash"; mv "$JS/store" "$JS/trash/store.$(date +%s%N)"; fi
    nats_start && "$HERE/ours-ctl.sh" start ;;
  purge-trash) rm -rf "$JS/trash" ;;
  count) "$HERE/ours-ctl.sh" count ;;
  pid) { "$HERE/ours-ctl.sh" pid; nats_pid; } | tr '\n' ' '; echo ;;
  status)
    "$HERE/ours-ctl.sh" status
    if pid=$(nats_pid); then echo "nats-server: running (pid $pid)"; else echo "nats-server: stopped"; fi ;;
  *) echo "usage: $0 {start|stop|restart|restart-aside|purge-trash|status|count|pid}" >&2; exit 2 ;;
esac
