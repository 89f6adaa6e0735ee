#!/usr/bin/env bash
# bench/profile.sh: where does Mailroom's time go under the benchmark load? Our server alone,
# loopback only, each step bounded in time. Do not run it at the same time as bench/run.sh
# (same ports 2600/9600).
#
#   bench/profile.sh                 # scenario b: 50 sessions x 1 KB
#   PROFILE_S=1 PROFILE_M=2000 bench/profile.sh    # scenario a: one session
#
# Steps (each against a freshly restarted server with an empty spool, warmed with 200 messages;
# old spools are moved aside and deleted only at the end: on ext4 without a journal, creating
# files soon after deleting many is slow, which would distort the profile):
#  1. plain run under `perf stat -p PID` (software counters): msgs/s, server CPU µs per message,
#     context switches per message
#  2. `strace -c -f -p PID`: syscalls per message (strace slows the server a lot; only the counts
#     matter)
#  3. `strace -f -T -e fdatasync,fsync`: how many file/dir syncs per message, how long each takes,
#     messages per directory fsync (the group commit's batch size)
#  4. `perf record -e cpu-clock -g -p PID`: the hottest functions and libraries of the server
#  5. `perf record -a`: the whole machine during the run, by command (client, kernel threads)
# Text summaries go to PROFILE_OUT (default bench/results/profile-<timestamp>/); perf.data files
# stay in the work dir.
#
# Env: BENCH_WORK (/tmp/mailroom-bench-profile), PROFILE_S (50), PROFILE_M (20000), PROFILE_L
# (1024), PROFILE_STRACE_M (5000: messages per strace run), PROFILE_BUILD (1: cargo build first),
# PROFILE_BIN (binary to profile; default target/release/mailroom, e.g. the copy bench/run.sh
# benchmarked: /tmp/mailroom-bench/bin/mailroom with PROFILE_BUILD=0).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH="$REPO/bench"
export BENCH_WORK=${BENCH_WORK:-/tmp/mailroom-bench-profile}
export MAILROOM_BIN="$BENCH_WORK/bin/mailroom"
S=${PROFILE_S:-50}; M=${PROFILE_M:-20000}; L=${PROFILE_L:-1024}; SM=${PROFILE_STRACE_M:-5000}
ts=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${PROFILE_OUT:-$BENCH/results/profile-$ts}
CTL="$BENCH/ours-ctl.sh"
TMP="$BENCH_WORK/profile"
mkdir -p "$OUT" "$TMP" "$BENCH_WORK/bin"
log() { printf '[profile %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
trap '"$CTL" stop; "$CTL" purge-trash' EXIT
trap 'exit 130' INT TERM

for t in smtp-source strace perf curl; do command -v "$t" >/dev/null || { echo "$t missing" >&2; exit 1; }; done
if ss -ltnH 'sport = :2600' | grep -q . && ! "$CTL" pid >/dev/null; then
  echo "127.0.0.1:2600 is in use by another process (bench/run.sh running?)" >&2; exit 1
fi

if [ "${PROFILE_BUILD:-1}" = 1 ]; then
  log "cargo build --release -p mailroom"
  (cd "$REPO" && timeout 2400 cargo build --release -p mailroom 2>&1 | tail -1)
fi
"$CTL" stop
cp -f "${PROFILE_BIN:-$REPO/target/release/mailroom}" "$MAILROOM_BIN.new" && mv -f "$MAILROOM_BIN.new" "$MAILROOM_BIN"

SRC=(smtp-source -s "$S" -l "$L" -f from@test -t to@test.example)
fresh() {  # restart with an empty spool (the old one moved aside, not deleted), warm up, print the PID
  "$CTL" restart-aside
  timeout 120 smtp-source -s 10 -m 200 -l 1024 -f from@test -t to@test.example 127.0.0.1:2600 >/dev/null
  sync; sleep 2
  "$CTL" pid
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
count() { "$CTL" count; }

{
  echo "# Mailroom profile $ts: smtp-source -s $S -m $M -l $L (strace runs: -m $SM)"
  echo "# binary: ${PROFILE_BIN:-target/release/mailroom} ($(cat "${PROFILE_BIN:-/nonexistent}.rev" 2>/dev/null || echo "work tree at $(cd "$REPO" && git rev-parse --short HEAD)"))"
  echo "# $(nproc) cpus; kernel $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# spool fs: $(df -T "$BENCH_WORK" | awk 'NR==2{print $2" on "$1}'), ext4 journal task: $(cat /sys/fs/ext4/"$(basename "$(df "$BENCH_WORK" | awk 'NR==2{print $1}')")"/journal_task 2>/dev/null || echo '?')"
} >"$OUT/summary.txt"

# --- 1. plain run + perf stat -----------------------------------------------------------------
pid=$(fresh); log "1. plain run + perf stat (pid $pid)"
c0=$(count); k0=$(cpu_ticks "$pid")
perf stat -e task-clock,context-switches,cpu-migrations,page-faults -p "$pid" -o "$TMP/perfstat.txt" &
ps_pid=$!
t0=$(date +%s.%N)
timeout 300 "${SRC[@]}" -m "$M" 127.0.0.1:2600
t1=$(date +%s.%N)
kill -INT "$ps_pid"; wait "$ps_pid" || true
k1=$(cpu_ticks "$pid"); c1=$(count)
n=$((c1 - c0)); hz=$(getconf CLK_TCK)
{
  echo
  echo "## 1. plain run"
  awk -v n="$n" -v t0="$t0" -v t1="$t1" -v k="$((k1 - k0))" -v hz="$hz" 'BEGIN{
    w=t1-t0; printf "accepted %d in %.2f s = %.0f msgs/s; server CPU %.2f s = %.0f%% of one core = %.0f us/msg\n",
    n, w, n/w, k/hz, 100*k/hz/w, 1e6*k/hz/n }'
  grep -E "task-clock|context-switches|migrations|page-faults" "$TMP/perfstat.txt" |
    awk -v n="$n" '{gsub(",","",$1); printf "  %-18s %12s  (%.2f per message)\n", $2, $1, $1/n}'
} >>"$OUT/summary.txt"

# --- 2. strace -c -----------------------------------------------------------------------------
pid=$(fresh); log "2. strace -c -f (pid $pid, $SM messages)"
c0=$(count)
timeout 600 strace -qq -c -f -o "$TMP/strace-c.txt" -p "$pid" &
st_pid=$!; sleep 1
timeout 300 "${SRC[@]}" -m "$SM" 127.0.0.1:2600
sleep 0.5; kill -INT "$st_pid"; wait "$st_pid" || true
n=$(( $(count) - c0 ))
{
  echo
  echo "## 2. syscalls per message (strace -c -f, $n messages; time column is strace's, inflated)"
  echo "  syscall              calls   per msg   % time"
  awk -v n="$n" '$1 ~ /^[0-9.]+$/ && NF>=5 { name=$NF; calls=$4; printf "  %-18s %8d %9.2f %8s\n", name, calls, calls/n, $1 }' \
    "$TMP/strace-c.txt" | sort -k2 -nr | head -30
} >>"$OUT/summary.txt"

# --- 3. sync calls and their latency ----------------------------------------------------------
pid=$(fresh); log "3. strace -T fdatasync/fsync (pid $pid, $SM messages)"
c0=$(count)
timeout 600 strace -qq -f -T -tt -e trace=fdatasync,fsync,renameat2,rename -o "$TMP/strace-sync.txt" -p "$pid" &
st_pid=$!; sleep 1
t0=$(date +%s.%N)
timeout 300 "${SRC[@]}" -m "$SM" 127.0.0.1:2600
t1=$(date +%s.%N)
sleep 0.5; kill -INT "$st_pid"; wait "$st_pid" || true
n=$(( $(count) - c0 ))
{
  echo
  echo "## 3. durable-write calls ($n messages, under strace: $(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f msgs/s", n/(b-a)}'))"
  awk -v n="$n" '
    # a call is complete on one line, or split by another thread into "NAME(... <unfinished ...>"
    # and "<... NAME resumed>... <duration>"
    /<[0-9.]+>$/ && (/ (fdatasync|fsync|renameat2|rename)\(/ || /<\.\.\. (fdatasync|fsync|renameat2|rename) resumed>/) {
      if (match($0, /<\.\.\. [a-z0-9]+ resumed>/)) c=substr($0, RSTART+5, RLENGTH-14)
      else { match($0, / (fdatasync|fsync|renameat2|rename)\(/); c=substr($0, RSTART+1, RLENGTH-2) }
      match($0, /<[0-9.]+>$/); d=substr($0, RSTART+1, RLENGTH-2)+0
      cnt[c]++; sum[c]+=d; v[c, cnt[c]]=d
    }
    END {
      for (c in cnt) {
        m=cnt[c]; for (i=1;i<=m;i++) a[i]=v[c,i]
        # insertion sort is fine for a few thousand values
        for (i=2;i<=m;i++){x=a[i];j=i-1;while(j>0&&a[j]>x){a[j+1]=a[j];j--};a[j+1]=x}
        p90=int(m*0.9); if (p90 < 1) p90=1
        printf "  %-10s %6d calls = %.3f per message; mean %.3f ms, median %.3f ms, p90 %.3f ms\n",
          c, m, m/n, 1000*sum[c]/m, 1000*a[int((m+1)/2)], 1000*a[p90]
      }
      if (cnt["fsync"]>0) printf "  messages per directory fsync (group commit batch): %.1f\n", n/cnt["fsync"]
    }' "$TMP/strace-sync.txt"
} >>"$OUT/summary.txt"

# --- 4. perf record, our server ---------------------------------------------------------------
pid=$(fresh); log "4. perf record -g -p $pid"
timeout 600 perf record -e cpu-clock -F 999 -g -p "$pid" -o "$TMP/perf-ours.data" 2>/dev/null &
pr_pid=$!; sleep 1
timeout 300 "${SRC[@]}" -m "$M" 127.0.0.1:2600
kill -INT "$pr_pid"; wait "$pr_pid" || true
{
  echo
  echo "## 4. perf record -p (server only, cpu-clock): by shared object"
  perf report -i "$TMP/perf-ours.data" --stdio --no-children --sort dso --percent-limit 1 2>/dev/null |
    grep -E '^ +[0-9]' | head -15
  echo
  echo "## 4b. by symbol (self time, >= 0.7 %)"
  perf report -i "$TMP/perf-ours.data" --stdio --no-children -g none --sort sym --percent-limit 0.7 2>/dev/null |
    grep -E '^ +[0-9]' | head -45
  echo
  echo "## 4c. by thread name"
  perf report -i "$TMP/perf-ours.data" --stdio --no-children -g none --sort comm 2>/dev/null |
    grep -E '^ +[0-9]' | head -10
} >>"$OUT/summary.txt"
perf report -i "$TMP/perf-ours.data" --stdio --children -g caller,0.5,callee --percent-limit 3 \
  >"$TMP/perf-ours-callgraph.txt" 2>/dev/null || true

# --- 5. whole machine -------------------------------------------------------------------------
pid=$(fresh); log "5. perf record -a (whole machine)"
timeout 600 perf record -e cpu-clock -F 499 -a -o "$TMP/perf-all.data" 2>/dev/null &
pr_pid=$!; sleep 1
timeout 300 "${SRC[@]}" -m "$M" 127.0.0.1:2600
kill -INT "$pr_pid"; wait "$pr_pid" || true
{
  echo
  echo "## 5. perf record -a (whole machine, both cores) by command"
  perf report -i "$TMP/perf-all.data" --stdio --no-children --sort comm --percent-limit 1 2>/dev/null |
    grep -E '^ +[0-9]' | head -15
  echo
  echo "## 5b. whole machine by command + shared object"
  perf report -i "$TMP/perf-all.data" --stdio --no-children --sort comm,dso --percent-limit 1.5 2>/dev/null |
    grep -E '^ +[0-9]' | head -20
} >>"$OUT/summary.txt"

"$CTL" stop
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/summary.txt"
log "summary: $OUT/summary.txt (perf data and call graph in $TMP)"
cat "$OUT/summary.txt"
