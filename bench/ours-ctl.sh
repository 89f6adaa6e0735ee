#!/usr/bin/env bash
# ours-ctl.sh {start|stop|restart|restart-aside|purge-trash|status|reset|count|pid}
#
# Controls the Mailroom server under benchmark, by PID only (the PID file in the work dir).
#   start    start `mailroom serve --config bench/mailroom-bench.yaml` with cwd = BENCH_WORK
#            (spool and delivery log land there); waits until SMTP and /readyz answer
#   stop     SIGTERM the PID from the PID file, wait (15 s), then SIGKILL
#   restart  stop, empty the spool and the delivery log, start (OURS_KEEP_SPOOL=1: keep the spool;
#            the server re-reads it at start, and no file is deleted, see bench/RESULTS.md on
#            ext4 without a journal)
#   restart-aside  stop, move the spool to BENCH_WORK/trash/ (deletes nothing), start
#   purge-trash    delete BENCH_WORK/trash/ (after a measurement, never before one)
#   reset    delete committed message files from the spool while the server runs (untimed
#            cleanup between scenarios, like the Haraka peers' reset_cmd; keeps the PID)
#   count    messages accepted since start (from /metrics)
#   pid      print the PID
# Env: BENCH_WORK (default /tmp/mailroom-bench), MAILROOM_BIN (default BENCH_WORK/bin/mailroom,
# the copy bench/run.sh makes after building), OURS_SMTP (127.0.0.1:2600), OURS_HTTP
# (127.0.0.1:9600): must match bench/mailroom-bench.yaml.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${BENCH_WORK:-/tmp/mailroom-bench}
BIN=${MAILROOM_BIN:-$WORK/bin/mailroom}
CONF=${MAILROOM_BENCH_CONFIG:-$HERE/mailroom-bench.yaml}
SMTP=${OURS_SMTP:-127.0.0.1:2600}
HTTP=${OURS_HTTP:-127.0.0.1:9600}
PIDF=$WORK/mailroom.pid
LOG=$WORK/mailroom.log

running_pid() {  # prints the PID if the PID file names a live mailroom process
  [ -f "$PIDF" ] || return 1
  local pid; pid=$(cat "$PIDF" 2>/dev/null)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q mailroom "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

do_stop() {
  local pid
  if pid=$(running_pid); then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "mailroom pid $pid did not stop in 15 s: SIGKILL" >&2
      kill -KILL "$pid"
      sleep 0.2
    fi
  fi
  rm -f "$PIDF"
}

do_start() {
  if running_pid >/dev/null; then return 0; fi
  [ -x "$BIN" ] || { echo "no mailroom binary at $BIN (run bench/run.sh, or set MAILROOM_BIN)" >&2; return 1; }
  mkdir -p "$WORK"
  (
    cd "$WORK" || exit 1
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    setsid nohup "$BIN" serve --config "$CONF" >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDF"
  )
  local host=${SMTP%:*} port=${SMTP##*:}
  for _ in $(seq 1 600); do   # 60 s: a kept spool is re-read at start
    if running_pid >/dev/null && ss -ltnH "sport = :$port" | grep -q "$host" \
       && curl -sf -m 1 "http://$HTTP/readyz" >/dev/null; then
      return 0
    fi
    running_pid >/dev/null || break
    sleep 0.1
  done
  echo "mailroom failed to start; last log lines:" >&2
  tail -20 "$LOG" >&2
  return 1
}

case "${1:-status}" in
  start) do_start ;;
  stop) do_stop ;;
  restart)
    do_stop
    if [ "${OURS_KEEP_SPOOL:-0}" != 1 ]; then rm -rf "$WORK/spool" "$WORK/delivery.jsonl"; fi
    do_start ;;
  restart-aside)
    do_stop
    if [ -d "$WORK/spool" ]; then
      mkdir -p "$WORK/trash"
      mv "$WORK/spool" "$WORK/trash/spool.$(date +%s%N)"
    fi
    rm -f "$WORK/delivery.jsonl"
    do_start ;;
  purge-trash) rm -rf "$WORK/trash" ;;
  reset)
    [ -d "$WORK/spool/queue" ] && find "$WORK/spool/queue" -maxdepth 1 -name '*.msg' -type f -delete
    exit 0 ;;
  count)
    curl -s -m 5 "http://$HTTP/metrics" | awk '/^mailroom_inbound_messages_accepted_total/{s+=$2} END{print s+0}' ;;
  pid) running_pid ;;
  status)
    if pid=$(running_pid); then echo "mailroom: running (pid $pid)"; else echo "mailroom: stopped"; fi ;;
  *) echo "usage: $0 {start|stop|restart|restart-aside|purge-trash|status|reset|count|pid}" >&2; exit 2 ;;
esac
