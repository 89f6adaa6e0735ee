#!/usr/bin/env bash
# bench/fs-experiment.sh: how much does the file system under the spool matter? Our server alone,
# scenario b (smtp-source -s 50 -m 20000 -l 1024), loopback only, with the spool on
#   root     the work machine's / (on the benchmark VM: ext4 WITHOUT a journal)
#   loopj    a fresh ext4 image with a journal (the usual ext4), loop-mounted
#   loopnoj  a fresh ext4 image without a journal (mkfs.ext4 -O ^has_journal), loop-mounted
# two runs each: run 1 on a fresh spool, run 2 right after deleting run 1's 20,000 files.
# The whole list is done twice. Loop devices and images are removed at the end.
#
# Env: MAILROOM_BIN (default /tmp/mailroom-bench/bin/mailroom, the copy bench/run.sh made),
#      FSX_DIR (default /tmp/mailroom-fsx). Do not run together with bench/run.sh (same ports).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CTL="$HERE/ours-ctl.sh"
SRC_BIN=${MAILROOM_BIN:-/tmp/mailroom-bench/bin/mailroom}
DIR=${FSX_DIR:-/tmp/mailroom-fsx}
[ -x "$SRC_BIN" ] || { echo "no binary at $SRC_BIN (run bench/run.sh first or set MAILROOM_BIN)" >&2; exit 1; }
mkdir -p "$DIR/root"

cleanup() {
  "$CTL" stop 2>/dev/null
  for d in loopj loopnoj; do
    mountpoint -q "$DIR/$d" && umount "$DIR/$d"
    rm -f "$DIR/$d.img"
  done
  rm -rf "$DIR"
}
trap 'BENCH_WORK=$W cleanup' EXIT
trap 'exit 130' INT TERM
W=$DIR/root/work

loop_fs() {  # NAME MKFS-OPTIONS
  local d=$DIR/$1
  mkdir -p "$d"
  mountpoint -q "$d" && return 0
  truncate -s 3G "$DIR/$1.img"
  # shellcheck disable=SC2086
  mkfs.ext4 -q -F $2 "$DIR/$1.img"
  mount -o loop "$DIR/$1.img" "$d"
}
loop_fs loopj ""
loop_fs loopnoj "-O ^has_journal"

echo "# $(date -u +%Y%m%dT%H%M%SZ) $(nproc) cpus, kernel $(uname -r); binary $SRC_BIN"
for fs in root loopj loopnoj root loopj loopnoj; do
  W=$DIR/$fs/work; mkdir -p "$W/bin"; cp -f "$SRC_BIN" "$W/bin/mailroom"
  export BENCH_WORK=$W MAILROOM_BIN=$W/bin/mailroom
  "$CTL" restart || exit 1
  pid=$("$CTL" pid)
  timeout 60 smtp-source -s 10 -m 200 -l 1024 -f from@test -t to@test.example 127.0.0.1:2600
  for run in 1 2; do
    "$CTL" reset; sync; sleep 2
    k0=$(awk '{print $14+$15}' "/proc/$pid/stat"); t0=$(date +%s.%N)
    timeout 120 smtp-source -s 50 -m 20000 -l 1024 -f from@test -t to@test.example 127.0.0.1:2600
    t1=$(date +%s.%N); k1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    awk -v fs="$fs" -v r="$run" -v a="$t0" -v b="$t1" -v k=$((k1 - k0)) -v hz="$(getconf CLK_TCK)" \
        -v l="$(cut -d' ' -f1 /proc/loadavg)" \
      'BEGIN{printf "%-8s run%d  %6.0f msgs/s  server CPU %5.1f s = %4.0f us/msg  (load1 %s)\n",
             fs, r, 20000/(b-a), k/hz, 1e6*k/hz/20000, l}'
  done
  "$CTL" stop
done
