#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for a short time; a crash fails the run.
set -euo pipefail
seconds=${1:-15}
cd "$(dirname "$0")/../fuzz"
echo "== fuzz: building targets (nightly)"
cargo +nightly fuzz build
for t in $(cargo +nightly fuzz list); do
  log=$(mktemp)
  echo "-- fuzz $t for ${seconds}s"
  if ! cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $t failed; the crashing input is in fuzz/artifacts/$t/"
    exit 1
  fi
  grep -E '^Done|#[0-9]+.*DONE' "$log" | tail -n 1 || tail -n 1 "$log"
  rm -f "$log"
done
