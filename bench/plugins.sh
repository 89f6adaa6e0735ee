#!/usr/bin/env bash
# bench/plugins.sh: what the inbound plugin chain costs. The same `mailroom serve` twice, side by
# side on loopback: once with no plugins, once with the full chain of bench/plugins-chain.yaml
# (DNS allow/block lists, reverse DNS, HELO checks, SPF, DKIM, DMARC, ARC, rate limits,
# recipients, tarpit), its DNS answered by a loopback dnsmasq. Postfix's smtp-source sends the
# load; the table gives msgs/s and server CPU per message for each, and the ratio.
#
#   bench/plugins.sh                       # build, then scenarios a and b, 1 rep
#   BENCH_BUILD=0 BENCH_REPS=3 bench/plugins.sh
#
# Env (defaults): BENCH_WORK=/tmp/mailroom-bench-plugins, BENCH_BUILD=1 (0: reuse
# BENCH_WORK/bin/mailroom), BENCH_REPS=1, BENCH_SCENARIOS=a,b (a: 1 session x 2000 msgs,
# b: 50 sessions x 20000 msgs, 1 KiB each, a connection per message as smtp-source does).
# Needs smtp-source (postfix) and dnsmasq: scripts/test-deps.sh installs both. Everything it
# starts is stopped by PID on exit. Results: bench/results/plugins-<timestamp>.md.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH="$REPO/bench"
WORK=${BENCH_WORK:-/tmp/mailroom-bench-plugins}
BUILD=${BENCH_BUILD:-1}
REPS=${BENCH_REPS:-1}
SCENARIOS=${BENCH_SCENARIOS:-a,b}
DNS_PORT=${BENCH_DNS_PORT:-5399}
BIN="$WORK/bin/mailroom"
CTL="$BENCH/ours-ctl.sh"
log() { printf '[plugins.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix (scripts/test-deps.sh)" >&2; exit 1; }
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
[ -x "$DNSMASQ" ] || { echo "dnsmasq missing: apt-get install dnsmasq-base" >&2; exit 1; }
mkdir -p "$WORK/bin" "$WORK/none" "$WORK/chain"

# name -> "smtp_port http_port config"
declare -A SMTP=([none]=2610 [chain]=2611) HTTP=([none]=9610 [chain]=9611)
ctl() {  # ctl NAME ARGS...: ours-ctl.sh for one of the two servers
  local n=$1; shift
  BENCH_WORK="$WORK/$n" MAILROOM_BIN="$BIN" MAILROOM_BENCH_CONFIG="$WORK/$n.yaml" \
    OURS_SMTP="127.0.0.1:${SMTP[$n]}" OURS_HTTP="127.0.0.1:${HTTP[$n]}" "$CTL" "$@"
}
DNS_PID=""
cleanup() {
  local rc=$?
  set +e
  ctl none stop; ctl chain stop; ctl none purge-trash; ctl chain purge-trash
  [ -n "$DNS_PID" ] && kill "$DNS_PID" 2>/dev/null && wait "$DNS_PID" 2>/dev/null
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p mailroom"
  (cd "$REPO" && timeout 2400 cargo build --release -p mailroom 2>&1 | tail -2)
  cp -f "$REPO/target/release/mailroom" "$BIN"
  (cd "$REPO" && git rev-parse --short HEAD) >"$WORK/bin/mailroom.rev"
fi
[ -x "$BIN" ] || { echo "no $BIN: run with BENCH_BUILD=1" >&2; exit 1; }

# The DNS the chain asks: the sending client 127.0.0.1 has forward-confirmed reverse DNS (dnsmasq
# answers `localhost` for it), the sender domain has SPF (pass for 127.0.0.1) and a DMARC
# policy; the allow and block lists do not list it (NXDOMAIN, the common case).
log "dnsmasq on 127.0.0.1:$DNS_PORT"
"$DNSMASQ" --keep-in-foreground --conf-file=/dev/null --no-resolv --no-poll --no-hosts \
  --port="$DNS_PORT" --listen-address=127.0.0.1 --bind-interfaces --pid-file= --user=root \
  --local=/bench/ --local=/in-addr.arpa/ \
  --host-record=client.bench,127.0.0.1 --ptr-record=1.0.0.127.in-addr.arpa,client.bench \
  --txt-record=sender.bench,"v=spf1 ip4:127.0.0.1 -all" \
  --txt-record=_dmarc.sender.bench,"v=DMARC1; p=reject" \
  >"$WORK/dnsmasq.log" 2>&1 &
DNS_PID=$!
sleep 0.5
kill -0 "$DNS_PID" || { cat "$WORK/dnsmasq.log" >&2; exit 1; }

# Both configs from the main benchmark's, on their own ports; the chain's gets the plugins.
for n in none chain; do
  sed -e "s/127.0.0.1:2600/127.0.0.1:${SMTP[$n]}/; s/127.0.0.1:9600/127.0.0.1:${HTTP[$n]}/" \
    -e '/^    plugins: \[\]/d' "$BENCH/mailroom-bench.yaml" >"$WORK/$n.yaml"
done
python3 - "$WORK/chain.yaml" "$BENCH/plugins-chain.yaml" "$DNS_PORT" <<'PY'
import sys
conf, chain, port = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(conf).read()
block = open(chain).read().replace("@DNS_PORT@", port)
block = "".join("    " + l if l.strip() else l for l in block.splitlines(True)
                if not l.startswith("#"))
anchor = "    timeouts:\n"
assert anchor in text, "listener timeouts block not found"
open(conf, "w").write(text.replace(anchor, block + anchor, 1))
PY
for n in none chain; do "$BIN" check --config "$WORK/$n.yaml" >/dev/null; done

cpu_of() {  # utime+stime of a pid, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}
declare -A ARGS=([a]="-s 1 -m 2000 -l 1024" [b]="-s 50 -m 20000 -l 1024")
ts=$(date -u +%Y%m%dT%H%M%SZ)
out="$BENCH/results/plugins-$ts.md"
mkdir -p "$BENCH/results"
{
  echo "# Plugin chain overhead, run $ts"
  echo
  echo "mailroom $(cat "$WORK/bin/mailroom.rev" 2>/dev/null || echo '?'); $(nproc) cpus; loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "chain: bench/plugins-chain.yaml; DNS: dnsmasq on loopback; sender from@sender.bench, HELO client.bench"
  echo
  echo "| scenario | rep | server | msgs/s | server CPU ms/msg | accepted |"
  echo "|---|---|---|---|---|---|"
} >"$out"
declare -A RATE
for rep in $(seq 1 "$REPS"); do
  for sc in ${SCENARIOS//,/ }; do
    m=$(echo "${ARGS[$sc]}" | awk '{print $4}')
    for n in none chain; do
      ctl "$n" restart-aside >/dev/null
      pid=$(ctl "$n" pid)
      # Warm-up: caches, lazy init.
      timeout 120 smtp-source -s 5 -m 100 -l 1024 -M client.bench -f from@sender.bench \
        -t to@test.example "127.0.0.1:${SMTP[$n]}" >/dev/null 2>&1 || true
      before=$(ctl "$n" count); cpu0=$(cpu_of "$pid"); t0=$(date +%s.%N)
      # shellcheck disable=SC2086
      timeout 600 smtp-source ${ARGS[$sc]} -M client.bench -f from@sender.bench \
        -t to@test.example "127.0.0.1:${SMTP[$n]}" >"$WORK/smtp-source.log" 2>&1 || true
      t1=$(date +%s.%N); cpu1=$(cpu_of "$pid"); after=$(ctl "$n" count)
      got=$((after - before))
      read -r rate cpu_ms < <(awk -v m="$got" -v t0="$t0" -v t1="$t1" -v c0="$cpu0" -v c1="$cpu1" \
        -v hz="$(getconf CLK_TCK)" 'BEGIN{w=t1-t0; printf "%.0f %.3f\n", m/w, (m>0 ? (c1-c0)*1000/hz/m : 0)}')
      RATE[$sc.$rep.$n]=$rate
      log "scenario $sc rep $rep $n: $got of $m accepted, $rate msgs/s, ${cpu_ms} ms CPU/msg"
      echo "| $sc | $rep | $n | $rate | $cpu_ms | $got/$m |" >>"$out"
      ctl "$n" stop
    done
  done
done
{
  echo
  for rep in $(seq 1 "$REPS"); do
    for sc in ${SCENARIOS//,/ }; do
      awk -v s="$sc" -v r="$rep" -v a="${RATE[$sc.$rep.chain]}" -v b="${RATE[$sc.$rep.none]}" \
        'BEGIN{printf "scenario %s rep %s: chain / none = %.2f\n", s, r, (b>0 ? a/b : 0)}'
    done
  done
} >>"$out"
log "results: $out"
cat "$out" >&2
