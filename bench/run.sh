#!/usr/bin/env bash
# bench/run.sh: Mailroom against Postfix, Haraka and smtp-sink, on this machine, loopback only.
#
#   bench/run.sh                                   # all peers + ours, scenarios a,b,c,d,e, 1 rep
#   BENCH_REPS=3 bench/run.sh
#   BENCH_ONLY=smtp-sink,ours BENCH_SCENARIOS=a BENCH_WAIT_QUIET=0 bench/run.sh   # smoke run
#
# What it does (idempotent; everything bounded in time; stops what it started, by PID):
#  1. copies the shared peers harness (PEERS_SRC) to BENCH_WORK/peers (the original is read-only
#     and run-peers.sh writes raw/ next to itself)
#  2. runs its setup scripts: Postfix (Debian package; also brings smtp-source), smtp-sink,
#     Haraka (npm); only the peers named in BENCH_ONLY are left running
#  3. cargo build --release -p mailroom, copies the binary to BENCH_WORK/bin (so a rebuild by
#     someone else during the run changes nothing)
#  4. starts it: bench/ours-ctl.sh start (mailroom serve --config bench/mailroom-bench.yaml,
#     SMTP 127.0.0.1:2600, metrics 127.0.0.1:9600, spool + delivery log in BENCH_WORK)
#  5. appends an [ours] block to the copied peers.ini
#  6. optionally waits for a quiet machine (no rustc, 1-min load < 0.7 for 60 s in a row)
#  7. runs run-peers.sh --only BENCH_ONLY --scenarios BENCH_SCENARIOS --reps BENCH_REPS
#  8. optionally: 10,000 idle connections against ours alone (idle_conns.py -n 10000)
#  9. stops our server and the peers (peers-ctl.sh stop NAME...)
# 10. copies the table (.md), the raw JSON and a .meta.txt (machine, quietness, git revision)
#     to bench/results/run-<timestamp>.*
#
# Env (defaults):
#   BENCH_WORK=/tmp/mailroom-bench      work dir (peers copy, spool, logs, binary copy)
#   PEERS_SRC=<repo>/../shared/bench/peers
#   BENCH_REPS=1
#   BENCH_SCENARIOS=a,b,c,d,e
#   BENCH_ONLY=smtp-sink,postfix,haraka-disk-n1,haraka-disk-n2,ours,ours-jetstream
#                                       ours = local spool; ours-jetstream = the JetStream queue
#                                       on one nats-server (file storage, sync_interval: always),
#                                       via bench/ours-js-ctl.sh
#   BENCH_WAIT_QUIET=25                 minutes to wait for a quiet machine; 0 = do not wait
#   BENCH_IDLE10K=1                     also measure 10,000 idle connections on ours (0 = skip)
#   BENCH_SETUP=1                       run the peers' setup scripts (0 = assume they are set up)
#   BENCH_BUILD=1                       cargo build; 0 = reuse BENCH_WORK/bin/mailroom of an earlier run
#   BENCH_EXTRA_ARGS=                   more peerbench.py options, e.g. "--pause 3"
#   BENCH_OURS_SPOOL=delete             delete: reset_cmd deletes our spool files before each
#                                       scenario and restart_cmd empties the spool (like the Haraka
#                                       peers); keep: nothing is ever deleted (no reset_cmd, restarts
#                                       keep the spool). On ext4 without a journal, creating files
#                                       soon after deleting many is slow: see bench/RESULTS.md
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH="$REPO/bench"
WORK=${BENCH_WORK:-/tmp/mailroom-bench}
PEERS_SRC=${PEERS_SRC:-$(cd "$REPO/.." && pwd)/shared/bench/peers}
REPS=${BENCH_REPS:-1}
SCENARIOS=${BENCH_SCENARIOS:-a,b,c,d,e}
ONLY=${BENCH_ONLY:-smtp-sink,postfix,haraka-disk-n1,haraka-disk-n2,ours,ours-jetstream}
WAIT_QUIET=${BENCH_WAIT_QUIET:-25}
IDLE10K=${BENCH_IDLE10K:-1}
OURS_SPOOL=${BENCH_OURS_SPOOL:-delete}
case "$OURS_SPOOL" in delete|keep) ;; *) echo "BENCH_OURS_SPOOL must be delete or keep" >&2; exit 2 ;; esac
SETUP=${BENCH_SETUP:-1}
BUILD=${BENCH_BUILD:-1}
EXTRA=${BENCH_EXTRA_ARGS:-}
export BENCH_WORK=$WORK
export MAILROOM_BIN="$WORK/bin/mailroom"
OURS_CTL="$BENCH/ours-ctl.sh"
OURS_JS_CTL="$BENCH/ours-js-ctl.sh"
PEERS="$WORK/peers"

log() { printf '[run.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
# quiet_run SECONDS NAME CMD...: full output to WORK/setup-NAME.log; its last lines shown
quiet_run() {
  local secs=$1 name=$2; shift 2
  if timeout "$secs" "$@" >"$WORK/setup-$name.log" 2>&1; then
    tail -n 4 "$WORK/setup-$name.log" | sed 's/^/  /' >&2
  else
    echo "setup $name failed (exit $?); see $WORK/setup-$name.log:" >&2
    tail -n 30 "$WORK/setup-$name.log" >&2
    return 1
  fi
}
has() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

[ -d "$PEERS_SRC" ] || { echo "peers harness not found at $PEERS_SRC (set PEERS_SRC)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (the peers' setup installs packages)" >&2; exit 1; }

# --- cleanup: everything we started, by PID --------------------------------------------------
STARTED_PEERS=""
GIT_AT_BUILD=""
cleanup() {
  local rc=$?
  set +e
  log "stopping our servers"
  "$OURS_CTL" stop
  "$OURS_CTL" purge-trash
  "$OURS_JS_CTL" stop
  "$OURS_JS_CTL" purge-trash
  if [ -n "$STARTED_PEERS" ] && [ -x "$PEERS/peers-ctl.sh" ]; then
    log "stopping peers:$STARTED_PEERS"
    # shellcheck disable=SC2086
    timeout 120 "$PEERS/peers-ctl.sh" stop $STARTED_PEERS
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. copy the harness -----------------------------------------------------------------------
log "copying $PEERS_SRC -> $PEERS"
mkdir -p "$WORK" "$PEERS"
find "$PEERS" -mindepth 1 -maxdepth 1 ! -name raw -exec rm -rf {} +   # keep earlier raw/ runs
cp -r "$PEERS_SRC"/. "$PEERS"/
chmod -R u+w "$PEERS"

# --- 2. peers ----------------------------------------------------------------------------------
HARAKA_INSTANCES=""
for n in disk-n1 discard-n1 disk-n2 discard-n2; do has "haraka-$n" && HARAKA_INSTANCES+=" $n"; done
HARAKA_INSTANCES=${HARAKA_INSTANCES# }
if [ "$SETUP" = 1 ]; then
  log "setup-postfix.sh (installs Postfix + smtp-source when missing)"
  STARTED_PEERS+=" postfix"
  quiet_run 900 postfix "$PEERS/setup-postfix.sh"
  if has smtp-sink; then
    log "setup-smtp-sink.sh"
    STARTED_PEERS+=" smtp-sink"
    quiet_run 120 smtp-sink "$PEERS/setup-smtp-sink.sh"
  fi
  if [ -n "$HARAKA_INSTANCES" ]; then
    log "setup-haraka.sh ($HARAKA_INSTANCES)"
    for n in $HARAKA_INSTANCES; do STARTED_PEERS+=" haraka-$n"; done
    INSTANCES="$HARAKA_INSTANCES" quiet_run 900 haraka "$PEERS/setup-haraka.sh"
  fi
  if ! has postfix; then
    log "postfix not benchmarked: stopping it (smtp-source stays installed)"
    timeout 60 "$PEERS/peers-ctl.sh" stop postfix
  fi
else
  log "BENCH_SETUP=0: starting the selected peers without setup"
  for n in postfix smtp-sink $(for h in $HARAKA_INSTANCES; do echo "haraka-$h"; done); do
    has "$n" || continue
    STARTED_PEERS+=" $n"
    timeout 120 "$PEERS/peers-ctl.sh" start "$n"
  done
fi
command -v smtp-source >/dev/null || { echo "smtp-source missing after setup" >&2; exit 1; }
timeout 30 "$PEERS/peers-ctl.sh" status | sed 's/^/  /' >&2

# --- 3. build (or reuse) -----------------------------------------------------------------------
if has ours || has ours-jetstream; then
  mkdir -p "$WORK/bin"
  "$OURS_CTL" stop   # a server left over from an interrupted run (by its PID file)
  "$OURS_JS_CTL" stop
  if [ "$BUILD" = 1 ]; then
    log "cargo build --release -p mailroom"
    (cd "$REPO" && timeout 2400 cargo build --release -p mailroom 2>&1 | tail -3)
    GIT_AT_BUILD="$(cd "$REPO" && git rev-parse HEAD)$(cd "$REPO" && git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/')"
    cp -f "$REPO/target/release/mailroom" "$WORK/bin/mailroom.new"
    mv -f "$WORK/bin/mailroom.new" "$WORK/bin/mailroom"
    echo "$GIT_AT_BUILD (built $(date -u +%Y-%m-%dT%H:%M:%SZ))" >"$WORK/bin/mailroom.rev"
  else
    [ -x "$WORK/bin/mailroom" ] || { echo "BENCH_BUILD=0 but no $WORK/bin/mailroom" >&2; exit 1; }
    GIT_AT_BUILD="$(cat "$WORK/bin/mailroom.rev" 2>/dev/null || echo '?') [BENCH_BUILD=0: binary of an earlier run]"
    log "BENCH_BUILD=0: using $WORK/bin/mailroom ($GIT_AT_BUILD)"
  fi
  "$WORK/bin/mailroom" check --config "$BENCH/mailroom-bench.yaml"
  "$WORK/bin/mailroom" check --config "$BENCH/mailroom-bench-js.yaml"
fi
if has ours; then
  # --- 4. start ours -----------------------------------------------------------------------------
  # An earlier run's spool is moved aside, not deleted: on ext4 without a journal, files
  # deleted in the last minutes make new files slow to create (see RESULTS.md).
  log "starting mailroom (empty spool; an old one is moved to $WORK/trash, deleted at the end)"
  "$OURS_CTL" restart-aside
  log "mailroom pid $("$OURS_CTL" pid) on 127.0.0.1:2600, metrics 127.0.0.1:9600, spool $WORK/spool"

  # --- 5. [ours] in the copied peers.ini --------------------------------------------------------
  env_prefix="BENCH_WORK=$WORK MAILROOM_BIN=$WORK/bin/mailroom"
  if [ "$OURS_SPOOL" = keep ]; then
    env_prefix+=" OURS_KEEP_SPOOL=1"
    reset_line=""
    note="spool kept across scenarios (nothing deleted)"
  else
    reset_line="reset_cmd = $env_prefix $OURS_CTL reset"
    note="spool files deleted before each scenario (reset_cmd)"
  fi
  cat >>"$PEERS/peers.ini" <<INI

[ours]
addr = 127.0.0.1:2600
pids_cmd = $env_prefix $OURS_CTL pid
count_cmd = curl -s 127.0.0.1:9600/metrics | awk '/^mailroom_inbound_messages_accepted_total/{s+=\$2} END{print s+0}'
restart_cmd = $env_prefix $OURS_CTL restart
$reset_line
note = Mailroom: file fdatasync + group-committed dir fsync before 250; $note
INI
fi
if has ours-jetstream; then
  log "starting mailroom with the JetStream queue (fresh nats-server store)"
  [ -n "$(grep -s '^MAILROOM_NATS_SERVER=' ~/.cache/mailroom/tools/current.env)" ] \
    || quiet_run 900 nats-build "$REPO/e2e/tools/build.sh"
  "$OURS_JS_CTL" restart-aside
  log "mailroom+nats pids $("$OURS_JS_CTL" pid) on 127.0.0.1:2601"
  cat >>"$PEERS/peers.ini" <<INI

[ours-jetstream]
addr = 127.0.0.1:2601
pids_cmd = BENCH_WORK=$WORK MAILROOM_BIN=$WORK/bin/mailroom $OURS_JS_CTL pid
count_cmd = curl -s 127.0.0.1:9601/metrics | awk '/^mailroom_inbound_messages_accepted_total/{s+=\$2} END{print s+0}'
restart_cmd = BENCH_WORK=$WORK MAILROOM_BIN=$WORK/bin/mailroom $OURS_JS_CTL restart
note = Mailroom + nats-server (JetStream file storage, fsync before every PubAck): 250 after the PubAck; stream kept across scenarios; CPU and memory are both processes
INI
fi

# --- 6. wait for a quiet machine ---------------------------------------------------------------
QUIET="not checked (BENCH_WAIT_QUIET=0)"
if [ "$WAIT_QUIET" -gt 0 ]; then
  log "waiting (max ${WAIT_QUIET} min) for a quiet machine: no rustc, 1-min load < 0.7 for 60 s in a row"
  deadline=$(( $(date +%s) + WAIT_QUIET * 60 ))
  streak=0
  QUIET="NOT quiet: gave up after ${WAIT_QUIET} min"
  while [ "$(date +%s)" -lt "$deadline" ]; do
    nr=$(pgrep -c rustc || true); load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "${nr:-0}" -eq 0 ] && awk -v l="$load" 'BEGIN{exit !(l < 0.7)}'; then
      streak=$((streak + 5))
    else
      streak=0
    fi
    if [ $((SECONDS % 60)) -lt 5 ]; then log "  rustc=$nr load1=$load quiet-for=${streak}s"; fi
    if [ "$streak" -ge 60 ]; then QUIET="quiet: no rustc and 1-min load < 0.7 for 60 s before the run (load1 $load)"; break; fi
    sleep 5
  done
  log "$QUIET"
fi
load_before=$(cat /proc/loadavg)

# --- 7. the benchmark --------------------------------------------------------------------------
log "run-peers.sh --only $ONLY --scenarios $SCENARIOS --reps $REPS $EXTRA"
before=$(ls -1 "$PEERS/raw/"run-*.md 2>/dev/null | sort | tail -1 || true)
rustc_seen=0
( while sleep 10; do [ "$(pgrep -c rustc || true)" -gt 0 ] && echo x; done ) >"$WORK/rustc-during.txt" &
watch_pid=$!
# shellcheck disable=SC2086
timeout 7500 "$PEERS/run-peers.sh" --only "$ONLY" --scenarios "$SCENARIOS" --reps "$REPS" $EXTRA
kill "$watch_pid" 2>/dev/null; wait "$watch_pid" 2>/dev/null || true
rustc_seen=$(wc -l <"$WORK/rustc-during.txt")
load_after=$(cat /proc/loadavg)
md=$(ls -1 "$PEERS/raw/"run-*.md | sort | tail -1)
[ "$md" != "$before" ] || { echo "run-peers.sh wrote no new result" >&2; exit 1; }
ts=$(basename "$md" .md); ts=${ts#run-}

# --- 8. 10,000 idle connections, ours alone ----------------------------------------------------
idle10k=""
if [ "$IDLE10K" = 1 ] && has ours; then
  log "10,000 idle connections against ours alone (fresh restart + 200-message warm-up)"
  "$OURS_CTL" restart
  timeout 120 smtp-source -s 10 -m 200 -l 1024 -f from@test -t to@test.example 127.0.0.1:2600 || true
  sync; sleep 2
  idle10k=$(ulimit -n "$(ulimit -Hn)"; timeout 400 python3 "$PEERS/idle_conns.py" --host 127.0.0.1 --port 2600 \
    -n 10000 --hold 3 --timeout 300 --pids-cmd "$OURS_CTL pid" | tail -1) || true
  echo "$idle10k" >&2
fi

# --- 10. results -------------------------------------------------------------------------------
mkdir -p "$BENCH/results"
cp "$md" "$BENCH/results/run-$ts.md"
cp "${md%.md}.json" "$BENCH/results/run-$ts.json"
[ -n "$idle10k" ] && echo "$idle10k" >"$BENCH/results/run-$ts.idle10k.json"
{
  echo "run: $ts"
  echo "mailroom built from: ${GIT_AT_BUILD:-not built (ours not in BENCH_ONLY)} (binary copied to $WORK/bin at build time)"
  echo "args: --only $ONLY --scenarios $SCENARIOS --reps $REPS $EXTRA"
  echo "our spool between scenarios: BENCH_OURS_SPOOL=$OURS_SPOOL"
  echo "machine: $(nproc) cpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "filesystem of the work dir: $(df -T "$WORK" | awk 'NR==2{print $2" on "$1}')"
  echo "quiet before the run: $QUIET"
  echo "loadavg before: $load_before"
  echo "loadavg after: $load_after"
  echo "rustc seen running during the run: $rustc_seen of the 10-s samples"
  echo "mailroom: $("$WORK/bin/mailroom" --version 2>/dev/null || echo '?')"
} >"$BENCH/results/run-$ts.meta.txt"
log "results: bench/results/run-$ts.{md,json,meta.txt}$([ -n "$idle10k" ] && echo ', run-'"$ts"'.idle10k.json')"
cat "$BENCH/results/run-$ts.meta.txt" >&2
