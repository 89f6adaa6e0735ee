#!/usr/bin/env bash
# bench/outbound.sh: outbound delivery rate from a pre-filled queue to Postfix's smtp-sink, for
# Mailroom, Postfix and Haraka, on this machine, loopback only. Run as root.
#
#   bench/outbound.sh                  # prints a markdown table; raw output in bench/results/
#   OUT_ONLY=ours OUT_N_1K=500 OUT_N_100K=100 BENCH_WAIT_QUIET=0 bench/outbound.sh   # smoke run
#
# For each message size (OUT_N_1K x 1 KB, OUT_N_100K x 100 KB, smtp-source -l) and sender:
#  1. fill the sender's queue while it does not deliver (smtp-source, 50 sessions; untimed)
#       ours     `mailroom serve` with bench/mailroom-outbound-bench.yaml, policy `hold: true`;
#                then the server is stopped (SIGTERM)
#       postfix  its own instance (config, queue and log in BENCH_WORK/postfix; the default
#                instance in /etc/postfix is not touched); the inject listener's
#                smtpd_recipient_restrictions put every message on hold (static:HOLD)
#       haraka   its own instance (`haraka -i BENCH_WORK/haraka`; relay plugin acl 127.0.0.1,
#                outbound queue), outbound.ini `disabled=true`; then Haraka is stopped
#  2. release and time until the sender's queue is empty (every message counted by smtp-sink
#     first, then the queue checked empty):
#       ours     start `mailroom serve` on the same spool, policy not on hold: relay to the sink,
#                concurrency 50, maxConnections 50, maxMessagesPerConnection 100 (reuse) or 1;
#                and once more without reuse and without maxConnections (`defaultLimits: {}`:
#                only `concurrency` bounds the deliveries, like Postfix's destination limit)
#       postfix  postsuper -H ALL; postqueue -f. relayhost [127.0.0.1]:2540, destination
#                concurrency limit 50 (initial 5: Postfix's slow start, default), connection
#                cache on demand with reuse limit 100 (reuse) or off (no reuse)
#       haraka   start it with outbound enabled, concurrency_max=50; queue/smtp_forward's
#                get_mx routes test.example to the sink. Haraka 3 has no outbound connection
#                pool (one connection per delivery), so it has no "reuse" row
#  3. stop the sender. Sender CPU = the process tree (self + children + reaped children) from
#     /proc/PID/stat over the timed interval; connections = sessions counted by the sink.
# The sink: smtp-sink -c on 127.0.0.1:2540 (started and stopped here, by PID).
#
# Env (defaults): BENCH_WORK=/tmp/mailroom-bench-outbound, OUT_N_1K=10000, OUT_N_100K=2000,
#   OUT_ONLY=ours,postfix,haraka, OUT_HARAKA_NODES="1 2" (Haraka's cluster workers per run),
#   BENCH_WAIT_QUIET=20 (minutes to wait for no rustc and 1-min load < 1.0 for 30 s; 0 = don't),
#   BENCH_BUILD=1 (0 = reuse BENCH_WORK/mailroom of an earlier run).
# Needs Postfix (smtp-source, smtp-sink) and Haraka as installed by ../shared/bench/peers
# (setup-postfix.sh, setup-haraka.sh); stops only what it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${BENCH_WORK:-/tmp/mailroom-bench-outbound}
N1K=${OUT_N_1K:-10000}
N100K=${OUT_N_100K:-2000}
ONLY=${OUT_ONLY:-ours,postfix,haraka}
HARAKA_NODES=${OUT_HARAKA_NODES:-"1 2"}
WAIT_QUIET=${BENCH_WAIT_QUIET:-20}
BUILD=${BENCH_BUILD:-1}
HARAKA_PKG=${HARAKA_PKG:-/opt/peers/haraka-pkg}
SINK=127.0.0.1:2540 PF_SMTP=127.0.0.1:2541 HK_SMTP=127.0.0.1:2542 MR_SMTP=127.0.0.1:2543
RUN_TIMEOUT=300          # seconds, each fill and each delivery
say() { printf '[outbound.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
has() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
[ "$(id -u)" = 0 ] || { echo "run as root (Postfix's instance needs it)" >&2; exit 1; }
for c in smtp-source smtp-sink postfix postconf postsuper postqueue; do
  command -v "$c" >/dev/null || { echo "$c missing: run ../shared/bench/peers/setup-postfix.sh" >&2; exit 1; }
done
if has haraka && [ ! -f "$HARAKA_PKG/node_modules/Haraka/bin/haraka" ]; then
  echo "Haraka missing in $HARAKA_PKG: run ../shared/bench/peers/setup-haraka.sh" >&2; exit 1
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$WORK"
TCK=$(getconf CLK_TCK)

# --- processes we start, stopped by PID ------------------------------------------------------
SINK_PID="" MR_PID="" HK_PID="" PF_UP=0 WATCH_PID=""
stop_pid() { # $1 pid, $2 name in its cmdline: TERM, wait up to 15 s, KILL
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null || return 0
  kill -TERM "$pid"
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then say "$2 pid $pid did not stop in 15 s: SIGKILL"; kill -KILL "$pid"; fi
  wait "$pid" 2>/dev/null || true
}
children_of() { # direct children of $1 (pids)
  local p
  for p in /proc/[0-9]*; do
    [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}
stop_haraka() {
  [ -n "$HK_PID" ] || return 0
  local kids; kids=$(children_of "$HK_PID")
  stop_pid "$HK_PID" haraka
  for k in $kids; do stop_pid "$k" node; done   # its cluster workers, if the master left any
  HK_PID=""
}
stop_postfix() { # our instance only: `postfix -c DIR stop` signals the master in DIR's pid file
  [ "$PF_UP" = 1 ] || return 0
  postfix -c "$WORK/postfix/etc" stop >/dev/null 2>&1 || true
  for _ in $(seq 100); do postfix -c "$WORK/postfix/etc" status >/dev/null 2>&1 || break; sleep 0.1; done
  PF_UP=0
}
cleanup() {
  set +e
  [ -n "$WATCH_PID" ] && kill "$WATCH_PID" 2>/dev/null
  stop_pid "$MR_PID" mailroom; stop_haraka; stop_postfix; stop_pid "$SINK_PID" smtp-sink
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers ---------------------------------------------------------------------------------
tree_ticks() { # CPU clock ticks of the trees rooted at $@: self + live descendants + reaped children
  python3 - "$@" <<'PY'
import os, sys
procs, kids = {}, {}
for d in os.listdir('/proc'):
    if not d.isdigit():
        continue
    try:
        s = open(f'/proc/{d}/stat').read()
    except OSError:
        continue
    r = s[s.rfind(')') + 2:].split()
    procs[int(d)] = sum(int(x) for x in r[11:15])      # utime stime cutime cstime
    kids.setdefault(int(r[1]), []).append(int(d))
todo, seen, total = [int(a) for a in sys.argv[1:]], set(), 0
while todo:
    p = todo.pop()
    if p in seen or p not in procs:
        continue
    seen.add(p); total += procs[p]; todo += kids.get(p, [])
print(total)
PY
}
sink_counter() { # $1 = mesg | sess: the sink's latest running counter
  local v; v=$(tail -c 400 "$WORK/sink.log" | tr '\r' '\n' | grep -o "$1=[0-9]*" | tail -1 | cut -d= -f2)
  echo "${v:-0}"
}
wait_sink() { # $1 target mesg count, $2 timeout s: polls the sink's log every 20 ms
  python3 - "$WORK/sink.log" "$1" "$2" <<'PY'
import re, sys, time
path, target, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
pat = re.compile(rb'mesg=(\d+)')
while time.time() < deadline:
    with open(path, 'rb') as f:
        f.seek(0, 2); n = f.tell(); f.seek(max(0, n - 400)); m = pat.findall(f.read())
    if m and int(m[-1]) >= target:
        sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
PY
}
wait_empty() { # $1 = function printing the sender's queued messages, $2 timeout s
  local end=$((SECONDS + $2)) n
  while :; do
    n=$($1); [ "$n" = 0 ] && return 0
    [ "$SECONDS" -lt "$end" ] || { say "queue not empty after $2 s: $n left"; return 1; }
    sleep 0.05
  done
}
fill() { # $1 addr, $2 messages, $3 size
  timeout "$RUN_TIMEOUT" smtp-source -s 50 -m "$2" -l "$3" -f from@test -t to@test.example "$1"
}
ROWS=()
report() { # label n t0 t1 tsink c0 c1 s0 s1 conns ok
  ROWS+=("$(python3 - "$TCK" "$@" <<'PY'
import sys
tck = int(sys.argv[1]); label = sys.argv[2]; n = int(sys.argv[3])
t0, t1, ts, c0, c1, s0, s1 = map(float, sys.argv[4:11]); conns, ok = sys.argv[11], sys.argv[12]
wall = t1 - t0; cpu = (c1 - c0) / tck; sink = (s1 - s0) / tck
print(f"| {label} | {n:,} | {wall:.2f} | **{n / wall:,.0f}** | {cpu / wall * 100:.0f} % | "
      f"{cpu * 1e6 / n:,.0f} | {sink / wall * 100:.0f} % | {int(conns):,} | {ok} |")
PY
)")
  printf '%s\n' "${ROWS[-1]}" >&2
  printf '%s\n' "$1: t0=$3 sink-complete=+$(awk -v a="$3" -v b="$5" 'BEGIN{printf "%.3f", b-a}') s queue-empty=+$(awk -v a="$3" -v b="$4" 'BEGIN{printf "%.3f", b-a}') s" >>"$WORK/detail.txt"
}
now() { date +%s.%N; }
sink_ticks() { awk '{print $14+$15}' "/proc/$SINK_PID/stat"; }
# measure LABEL N RELEASE_FN QUEUE_FN ROOTS_FN STOP_FN: t0, release, wait for the sink and an
# empty queue, sender CPU, stop, connections (sink sessions, after the sender closed them)
measure() {
  local label=$1 n=$2 release=$3 queue=$4 roots=$5 stop=$6 base sess0 t0 t1 ts c0 c1 s0 s1 ok=ok
  base=$(sink_counter mesg); sess0=$(sink_counter sess)
  c0=$($roots >/dev/null 2>&1 && tree_ticks $($roots) || echo 0)
  s0=$(sink_ticks); t0=$(now)
  $release
  if wait_sink $((base + n)) "$RUN_TIMEOUT"; then ts=$(now); else ts=$(now); ok="TIMEOUT (sink $(( $(sink_counter mesg) - base )) of $n)"; fi
  wait_empty "$queue" 60 || ok="queue not empty"
  t1=$(now); c1=$(tree_ticks $($roots)); s1=$(sink_ticks)
  $stop
  sleep 0.5
  local got=$(( $(sink_counter mesg) - base ))
  [ "$got" = "$n" ] || ok="$ok; sink got $got"
  report "$label" "$n" "$t0" "$t1" "$ts" "$c0" "$c1" "$s0" "$s1" $(( $(sink_counter sess) - sess0 )) "$ok"
}

# --- build ------------------------------------------------------------------------------------
if has ours; then
  if [ "$BUILD" = 1 ]; then
    say "cargo build --release -p mailroom"
    timeout 2400 cargo build --release -p mailroom >&2
    cp -f target/release/mailroom "$WORK/mailroom.new"; mv -f "$WORK/mailroom.new" "$WORK/mailroom"
    echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/')" >"$WORK/mailroom.rev"
  fi
  [ -x "$WORK/mailroom" ] || { echo "no $WORK/mailroom (BENCH_BUILD=0 needs an earlier build)" >&2; exit 1; }
fi

# --- the sink -----------------------------------------------------------------------------------
: >"$WORK/sink.log"
smtp-sink -c -u nobody -m 5000 "$SINK" 1024 >>"$WORK/sink.log" 2>&1 </dev/null & SINK_PID=$!
for _ in $(seq 50); do ss -ltnH "sport = :${SINK##*:}" | grep -q . && break; sleep 0.1; done
ss -ltnH "sport = :${SINK##*:}" | grep -q . || { echo "smtp-sink did not listen: $(cat "$WORK/sink.log")" >&2; exit 1; }
say "smtp-sink pid $SINK_PID on $SINK"

# --- ours -------------------------------------------------------------------------------------
OURS=$WORK/ours
mr_config() { # $1 = fill | reuse | noreuse | noreuse-nolimit: writes OURS/mailroom.yaml
  local src=bench/mailroom-outbound-bench.yaml
  grep -q '^    hold: false .*# FILL' "$src" && grep -q '^    maxMessagesPerConnection: 100 .*# REUSE' "$src" \
    && grep -q '^    defaultLimits: { maxConnections: 50 } .*# LIMITS' "$src" \
    || { echo "$src: the FILL/REUSE/LIMITS marked lines are missing" >&2; exit 1; }
  local one='s/^    maxMessagesPerConnection: 100 /    maxMessagesPerConnection: 1   /'
  case "$1" in
    fill) sed 's/^    hold: false /    hold: true  /' "$src" ;;
    reuse) cat "$src" ;;
    noreuse) sed "$one" "$src" ;;
    noreuse-nolimit) sed -e "$one" -e 's/^    defaultLimits: { maxConnections: 50 } /    defaultLimits: {}                      /' "$src" ;;
  esac >"$OURS/mailroom.yaml"
  "$WORK/mailroom" check --config "$OURS/mailroom.yaml" >/dev/null
}
mr_start() {
  (cd "$OURS" && exec "$WORK/mailroom" serve --config "$OURS/mailroom.yaml") >>"$OURS/mailroom.log" 2>&1 </dev/null &
  MR_PID=$!
}
mr_wait_ready() {
  for _ in $(seq 600); do curl -fs -m 1 http://127.0.0.1:9643/readyz >/dev/null 2>&1 && return 0; kill -0 "$MR_PID" 2>/dev/null || break; sleep 0.1; done
  echo "mailroom did not become ready: $(tail -5 "$OURS/mailroom.log")" >&2; exit 1
}
mr_queued() { "$WORK/mailroom" queue --spool "$OURS/spool" stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'; }
mr_roots() { [ -n "$MR_PID" ] && echo "$MR_PID"; }
mr_stop() { stop_pid "$MR_PID" mailroom; MR_PID=""; }
ours_run() { # $1 reuse|noreuse, $2 n, $3 size, $4 label
  say "ours $1: fill $2 x $3 B (hold: true)"
  rm -rf "$OURS"; mkdir -p "$OURS"
  mr_config fill; mr_start; mr_wait_ready
  fill "$MR_SMTP" "$2" "$3" >&2
  mr_stop
  local q; q=$(mr_queued); [ "$q" = "$2" ] || { echo "ours: $q queued after the fill, expected $2" >&2; exit 1; }
  mr_config "$1"; sync; sleep 2
  say "ours $1: deliver"
  measure "$4" "$2" mr_start mr_queued mr_roots mr_stop
  say "  delivery log: $(grep -c '"event":"delivery".*"response":"250' "$OURS/delivery.jsonl" || true) deliveries with 250, $(grep -c '"event":"transient_failure' "$OURS/delivery.jsonl" || true) transient failures"
}

# --- postfix: its own instance in WORK/postfix ---------------------------------------------------
PF=$WORK/postfix
pf_setup() {
  rm -rf "$PF"; mkdir -p "$PF/etc" "$PF/spool" "$PF/data"; chown postfix: "$PF/data"
  cat >"$PF/etc/main.cf" <<EOF
# bench/outbound.sh: a Postfix instance of its own (postfix -c $PF/etc), loopback only
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
meta_directory = /etc/postfix
myhostname = outbench.local
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
relayhost = [${SINK%:*}]:${SINK##*:}
default_transport = smtp
relay_transport = smtp
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
# fill: every message accepted by the inject listener goes to the hold queue
smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject
smtpd_client_event_limit_exceptions = \$mynetworks
default_destination_concurrency_limit = 50
smtp_destination_concurrency_limit = 50
smtp_connection_cache_on_demand = yes
smtp_connection_reuse_count_limit = 100
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
EOF
  cat >"$PF/etc/master.cf" <<EOF
$PF_SMTP inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOF
  postfix -c "$PF/etc" check
}
pf_start() {
  postfix -c "$PF/etc" start >/dev/null; PF_UP=1
  for _ in $(seq 100); do ss -ltnH "sport = :${PF_SMTP##*:}" | grep -q . && return 0; sleep 0.1; done
  echo "postfix instance did not listen on $PF_SMTP: $(tail -5 "$PF/maillog")" >&2; exit 1
}
pf_count() { find "$PF/spool/$1" -type f | wc -l; }
pf_queued() { find "$PF/spool/maildrop" "$PF/spool/incoming" "$PF/spool/active" "$PF/spool/deferred" "$PF/spool/hold" -type f | wc -l; }
pf_roots() { tr -d ' ' <"$PF/spool/pid/master.pid"; }
pf_release() { postsuper -c "$PF/etc" -H ALL >/dev/null 2>&1; postqueue -c "$PF/etc" -f; }
postfix_run() { # $1 reuse|noreuse, $2 n, $3 size, $4 label
  [ -f "$PF/etc/main.cf" ] || pf_setup
  postconf -c "$PF/etc" -e "smtp_connection_cache_on_demand = $([ "$1" = reuse ] && echo yes || echo no)"
  say "postfix $1: fill $2 x $3 B (onto the hold queue)"
  pf_start
  fill "$PF_SMTP" "$2" "$3" >&2
  local q; q=$(pf_count hold); [ "$q" = "$2" ] || { echo "postfix: $q on hold after the fill, expected $2" >&2; exit 1; }
  [ "$(pf_queued)" = "$2" ] || { echo "postfix: other queues not empty" >&2; exit 1; }
  sync; sleep 2
  say "postfix $1: release (postsuper -H ALL; postqueue -f)"
  measure "$4" "$2" pf_release pf_queued pf_roots stop_postfix
  say "  postfix log: $(grep -c 'status=sent' "$PF/maillog") sent, $(grep -c 'status=deferred' "$PF/maillog") deferred (cumulative)"
}

# --- haraka: its own instance in WORK/haraka ---------------------------------------------------
HK=$WORK/haraka
hk_config() { # $1 nodes, $2 outbound disabled (true|false)
  [ -d "$HK/config" ] || node "$HARAKA_PKG/node_modules/Haraka/bin/haraka" -i "$HK" >/dev/null
  cp ../shared/bench/peers/haraka-plugins/bench_no_rdns.js "$HK/plugins/" 2>/dev/null \
    || printf '%s\n' "exports.hook_lookup_rdns = (next) => next(OK, 'localhost')" >"$HK/plugins/bench_no_rdns.js"
  printf '%s\n' bench_no_rdns relay queue/smtp_forward >"$HK/config/plugins"
  echo outbench-haraka.local >"$HK/config/me"
  printf 'listen=%s\nnodes=%s\ninactivity_timeout=300\n' "$HK_SMTP" "$1" >"$HK/config/smtp.ini"
  printf '[main]\nlevel=notice\ntimestamps=false\nformat=default\n' >"$HK/config/log.ini"
  printf '[relay]\nacl=true\nforce_routing=false\n' >"$HK/config/relay.ini"
  echo 127.0.0.1/32 >"$HK/config/relay_acl_allow"
  # smtp_forward only routes outbound (get_mx): test.example -> the sink; it does not take
  # the relayed mail itself (enable_outbound=false), so the mail goes into Haraka's queue
  printf '[main]\nenable_outbound=false\n\n[test.example]\nhost=%s\nport=%s\nenable_outbound=false\n' \
    "${SINK%:*}" "${SINK##*:}" >"$HK/config/smtp_forward.ini"
  printf '[main]\ndisabled=%s\nconcurrency_max=50\nenable_tls=false\n' "$2" >"$HK/config/outbound.ini"
}
hk_start() {
  (cd "$HK" && exec node "$HARAKA_PKG/node_modules/Haraka/bin/haraka" -c "$HK") >>"$HK/haraka.log" 2>&1 </dev/null &
  HK_PID=$!
}
hk_wait_listen() {
  for _ in $(seq 200); do ss -ltnH "sport = :${HK_SMTP##*:}" | grep -q . && return 0; sleep 0.1; done
  echo "haraka did not listen on $HK_SMTP: $(tail -20 "$HK/haraka.log")" >&2; exit 1
}
hk_queued() { find "$HK/queue" -maxdepth 1 -type f ! -name '.*' | wc -l; }
hk_roots() { [ -n "$HK_PID" ] && echo "$HK_PID"; }
haraka_run() { # $1 nodes, $2 n, $3 size, $4 label
  say "haraka nodes=$1: fill $2 x $3 B (outbound disabled)"
  hk_config "$1" true
  rm -rf "$HK/queue"; mkdir -p "$HK/queue"; : >"$HK/haraka.log"
  hk_start; hk_wait_listen
  fill "$HK_SMTP" "$2" "$3" >&2
  stop_haraka
  local q; q=$(hk_queued); [ "$q" = "$2" ] || { echo "haraka: $q queued after the fill, expected $2; $(tail -5 "$HK/haraka.log")" >&2; exit 1; }
  hk_config "$1" false; sync; sleep 2
  say "haraka nodes=$1: deliver"
  measure "$4" "$2" hk_start hk_queued hk_roots stop_haraka
  [ -z "$(ls "$HK/queue" | grep '^error\.' || true)" ] || say "  haraka left error.* files in its queue"
}

# --- wait for a quiet machine -----------------------------------------------------------------
QUIET="not checked (BENCH_WAIT_QUIET=0)"
if [ "$WAIT_QUIET" -gt 0 ]; then
  say "waiting (max $WAIT_QUIET min) for a quiet machine: no rustc, 1-min load < 1.0 for 30 s in a row"
  deadline=$(( $(date +%s) + WAIT_QUIET * 60 )); streak=0; QUIET="NOT quiet: gave up after $WAIT_QUIET min"
  while [ "$(date +%s)" -lt "$deadline" ]; do
    nr=$(pgrep -c -x rustc || true); load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "${nr:-0}" -eq 0 ] && awk -v l="$load" 'BEGIN{exit !(l < 1.0)}'; then streak=$((streak + 5)); else streak=0; fi
    [ $((SECONDS % 60)) -lt 5 ] && say "  rustc=$nr load1=$load quiet-for=${streak}s"
    if [ "$streak" -ge 30 ]; then QUIET="quiet: no rustc and 1-min load < 1.0 for 30 s before the run (load1 $load)"; break; fi
    sleep 5
  done
  say "$QUIET"
fi

# --- the runs ---------------------------------------------------------------------------------
ts=$(date -u +%Y%m%dT%H%M%SZ); : >"$WORK/detail.txt"
load_before=$(cat /proc/loadavg); started=$SECONDS
( while sleep 10; do [ "$(pgrep -c -x rustc || true)" -gt 0 ] && echo x; done; true ) >"$WORK/rustc-during.txt" &
WATCH_PID=$!
for size in 1024 102400; do
  if [ "$size" = 1024 ]; then n=$N1K; sz="1 KB"; else n=$N100K; sz="100 KB"; fi
  if has ours; then
    ours_run reuse "$n" "$size" "Mailroom, $sz, reuse (100/conn)"
    ours_run noreuse "$n" "$size" "Mailroom, $sz, no reuse"
    ours_run noreuse-nolimit "$n" "$size" "Mailroom, $sz, no reuse, no maxConnections"
  fi
  if has postfix; then
    postfix_run reuse "$n" "$size" "Postfix, $sz, reuse (conn cache, 100/conn)"
    postfix_run noreuse "$n" "$size" "Postfix, $sz, no reuse"
  fi
  if has haraka; then
    for nodes in $HARAKA_NODES; do haraka_run "$nodes" "$n" "$size" "Haraka nodes=$nodes, $sz (no pool)"; done
  fi
done
kill "$WATCH_PID" 2>/dev/null; wait "$WATCH_PID" 2>/dev/null || true; WATCH_PID=""
load_after=$(cat /proc/loadavg)

# --- results ------------------------------------------------------------------------------------
mkdir -p bench/results
out=bench/results/outbound-$ts.md
{
  echo "# bench/outbound.sh $ts"
  echo
  echo "Delivery from a pre-filled queue to smtp-sink ($SINK), loopback. Time = from the release"
  echo "(server start / postsuper -H + postqueue -f) until the sink counted every message and the"
  echo "sender's queue was empty. CPU = sender's process tree, % of one core over that time."
  echo
  echo "| sender, size, connections | messages | seconds | msgs/s | sender CPU | CPU µs/msg | smtp-sink CPU | connections | check |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo '```'
  cat "$WORK/detail.txt"
  echo "mailroom built from: $(cat "$WORK/mailroom.rev" 2>/dev/null || echo '-')"
  echo "mailroom: $("$WORK/mailroom" --version 2>/dev/null || echo '-'); postfix $(postconf -h mail_version); Haraka $(node -p "require('$HARAKA_PKG/node_modules/Haraka/package.json').version" 2>/dev/null || echo '-'), node $(node --version 2>/dev/null || echo '-')"
  echo "machine: $(nproc) cpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "filesystem of the work dir: $(df -T "$WORK" | awk 'NR==2{print $2" on "$1}')"
  echo "quiet before the run: $QUIET"
  echo "loadavg before: $load_before"
  echo "loadavg after: $load_after"
  echo "rustc seen running during the run: $(wc -l <"$WORK/rustc-during.txt") of the 10-s samples"
  echo "runs took $((SECONDS - started)) s; OUT_N_1K=$N1K OUT_N_100K=$N100K OUT_ONLY=$ONLY OUT_HARAKA_NODES=\"$HARAKA_NODES\""
  echo '```'
} >"$out"
say "results: $out"
cat "$out"
