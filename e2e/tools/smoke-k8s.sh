#!/usr/bin/env bash
# Smoke test of the self-built control plane: etcd + kube-apiserver (+ kube-controller-manager with
# --controller-manager, + a helm install with --helm) on loopback, free ports, everything in one
# temp dir, stopped by PID and removed at the end. Exits 0 when the apiserver is ready and answers
# as the pinned version.
#
#   e2e/tools/build.sh etcd kube-apiserver [kube-controller-manager helm]   # minutes when cold
#   e2e/tools/smoke-k8s.sh [--controller-manager] [--helm] [--all] [--keep]
#
# Checks, in order:
#   1. etcd /health
#   2. kube-apiserver /readyz with a static token user in system:masters (--token-auth-file)
#   3. /version with a client-cert user (CN=admin, O=system:masters) reports the gitVersion that
#      e2e/tools/k8s/go.mod pins (i.e. the version ldflags took effect)
#   4. RBAC is on: an anonymous request and a token user without bindings get 401/403
#   5. namespace "default" exists (the apiserver's bootstrap controller made it)
#   6. with --controller-manager: its serviceaccount controller creates default/default
#   7. with --helm: `helm create` + `helm install` (no --wait: no kubelet, pods never run) into a new
#      namespace through a kubeconfig, and the release's Deployment is in the apiserver
#
# Binaries: $MAILROOM_ETCD, $MAILROOM_KUBE_APISERVER, $MAILROOM_KUBE_CONTROLLER_MANAGER, $MAILROOM_HELM if set,
# else ${MAILROOM_TOOLS_DIR:-~/.cache/mailroom/tools}/bin/<tool>, else PATH.
# Needs openssl and curl. --keep leaves the temp dir (PKI, logs, kubeconfig) for a look.
# SMOKE_RUN='cmd' runs a shell command with KUBECONFIG set before the teardown (e.g.
#   SMOKE_RUN='kubectl apply -f crds/' e2e/tools/smoke-k8s.sh).
# Flags follow ../shared/research/k8s-test-infra.md §6 (the envtest recipe).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS_DIR=${MAILROOM_TOOLS_DIR:-${HOME:-/root}/.cache/mailroom/tools}
WITH_KCM=0
WITH_HELM=0
KEEP=0
for arg in "$@"; do
  case $arg in
    --controller-manager) WITH_KCM=1 ;;
    --helm) WITH_HELM=1 ;;
    --all) WITH_KCM=1; WITH_HELM=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke-k8s.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

say() { printf '== %s\n' "$*" >&2; }
fail() { printf 'smoke-k8s.sh: FAIL: %s\n' "$*" >&2; exit 1; }

find_bin() { # $1 tool, $2 env var
  local v=${!2:-}
  if [ -n "$v" ]; then [ -x "$v" ] || fail "$2=$v is not executable"; echo "$v"; return; fi
  if [ -x "$TOOLS_DIR/bin/$1" ]; then echo "$TOOLS_DIR/bin/$1"; return; fi
  command -v "$1" 2>/dev/null || fail "$1 not found; run: e2e/tools/build.sh $1"
}
for c in openssl curl; do command -v $c >/dev/null || fail "$c is required"; done
ETCD=$(find_bin etcd MAILROOM_ETCD)
APISERVER=$(find_bin kube-apiserver MAILROOM_KUBE_APISERVER)
if [ "$WITH_KCM" = 1 ]; then KCM=$(find_bin kube-controller-manager MAILROOM_KUBE_CONTROLLER_MANAGER); fi
if [ "$WITH_HELM" = 1 ]; then HELM=$(find_bin helm MAILROOM_HELM); fi

# Expected gitVersion: the pin in k8s/go.mod (comments stripped).
WANT=$(awk '{ sub(/\/\/.*/, "") } $1 == "k8s.io/kubernetes" { print $2; exit }
            $1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit }' "$HERE/k8s/go.mod")

RUN=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-smoke-k8s.XXXXXX")
PIDS=()
cleanup() {
  local rc=$? pid i
  # Stop in reverse start order: TERM, up to 15 s, then KILL. Only our own PIDs.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[$i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "pid $pid did not stop on TERM; KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  if [ "$rc" != 0 ]; then
    for f in "$RUN"/*.log; do
      [ -f "$f" ] && [ "${f##*/}" != openssl.log ] || continue
      printf '\n---- last 40 lines of %s ----\n' "$f" >&2
      tail -n 40 "$f" >&2
    done
  fi
  if [ "$KEEP" = 1 ]; then say "kept $RUN"; else rm -rf "$RUN"; fi
  [ "$rc" = 0 ] && say "PASS" || say "FAILED (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback port: random, not listening now, not handed out before in this run.
USED=" "
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    case $USED in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then USED+="$p "; echo "$p"; return; fi
  done
  fail "no free port found"
}
ETCD_PORT=$(free_port); PEER_PORT=$(free_port); API_PORT=$(free_port)

# wait_for <seconds> <what> <pid> <command...>: polls the command every 0.5 s while pid lives.
wait_for() {
  local secs=$1 what=$2 pid=$3 start=$SECONDS; shift 3
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || fail "$what: process $pid exited"
    (( SECONDS - start < secs )) || fail "$what: not ready after ${secs}s"
    sleep 0.5
  done
  say "$what ready after $((SECONDS - start))s"
}

start() { # start <name> <cmd...>: background, log to $RUN/<name>.log, print the command line
  local name=$1; shift
  say "start $name: $*"
  "$@" >"$RUN/$name.log" 2>&1 &
  PIDS+=($!)
  LAST_PID=$!
}

# ---- PKI (research note §6.1): one CA for serving and client certs, an RSA SA key, tokens ----
say "PKI in $RUN/pki"
D=$RUN/pki; mkdir -p "$D"
(
  cd "$D"
  EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${EC[@]}" -keyout ca.key -out ca.crt -days 1 -subj "/CN=mailroom-smoke-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
  openssl req -new "${EC[@]}" -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' >srv.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile srv.ext -out apiserver.crt
  openssl req -new "${EC[@]}" -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin"
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' >cli.ext
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile cli.ext -out admin.crt
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
) >"$RUN/openssl.log" 2>&1 || fail "openssl failed (see $RUN/openssl.log)"
ADMIN_TOKEN=$(openssl rand -hex 16)
NOBODY_TOKEN=$(openssl rand -hex 16)
printf '%s,admin-token-user,admin-uid,system:masters\n%s,nobody,nobody-uid\n' "$ADMIN_TOKEN" "$NOBODY_TOKEN" >"$D/tokens.csv"

# ---- etcd (§6.2) ----
"$ETCD" --version | sed 's/^/   /' >&2 || fail "$ETCD --version failed"
start etcd "$ETCD" --name smoke --data-dir "$RUN/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "smoke=http://127.0.0.1:$PEER_PORT" \
  --unsafe-no-fsync --log-level warn
ETCD_PID=$LAST_PID
wait_for 30 "etcd /health" "$ETCD_PID" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

# ---- kube-apiserver (§6.3) ----
"$APISERVER" --version | sed 's/^/   /' >&2 || fail "$APISERVER --version failed"
ADMISSION=(--disable-admission-plugins=ServiceAccount)   # no controller-manager => no default SA
[ "$WITH_KCM" = 1 ] && ADMISSION=()
start kube-apiserver "$APISERVER" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --tls-cert-file="$D/apiserver.crt" --tls-private-key-file="$D/apiserver.key" \
  --client-ca-file="$D/ca.crt" --token-auth-file="$D/tokens.csv" \
  --service-account-issuer="https://127.0.0.1:$API_PORT/" \
  --service-account-key-file="$D/sa.key" --service-account-signing-key-file="$D/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --authorization-mode=RBAC "${ADMISSION[@]}" --allow-privileged=true \
  --cert-dir="$RUN/apiserver-certs"
API_PID=$LAST_PID
API=https://127.0.0.1:$API_PORT
AS_ADMIN_TOKEN=(--cacert "$D/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN")
AS_ADMIN_CERT=(--cacert "$D/ca.crt" --cert "$D/admin.crt" --key "$D/admin.key")
wait_for 120 "kube-apiserver /readyz" "$API_PID" curl -fsS "${AS_ADMIN_TOKEN[@]}" "$API/readyz"

say "curl /readyz?verbose (token user in system:masters)"
curl -fsS "${AS_ADMIN_TOKEN[@]}" "$API/readyz?verbose" | tail -n 3 | sed 's/^/   /' >&2

say "curl /version (client-cert user CN=admin,O=system:masters)"
VERSION_JSON=$(curl -fsS "${AS_ADMIN_CERT[@]}" "$API/version")
echo "$VERSION_JSON" | sed 's/^/   /' >&2
GOT=$(echo "$VERSION_JSON" | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
[ "$GOT" = "$WANT" ] || fail "/version gitVersion is '$GOT', expected '$WANT' (version ldflags?)"

say "RBAC/authn: anonymous and unbound users are refused"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$D/ca.crt" "$API/api/v1/namespaces")
case $code in 401|403) say "   anonymous GET /api/v1/namespaces -> $code" ;; *) fail "anonymous GET /api/v1/namespaces -> $code" ;; esac
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$D/ca.crt" -H "Authorization: Bearer $NOBODY_TOKEN" "$API/api/v1/namespaces")
[ "$code" = 403 ] || fail "token user 'nobody' GET /api/v1/namespaces -> $code, expected 403"
say "   user 'nobody' (no bindings) GET /api/v1/namespaces -> 403"

wait_for 30 "namespace default" "$API_PID" curl -fsS "${AS_ADMIN_CERT[@]}" "$API/api/v1/namespaces/default"

# ---- kubeconfig for clients (§6.5): client-cert admin ----
cat >"$RUN/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster: {server: "$API", certificate-authority: "$D/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$D/admin.crt", client-key: "$D/admin.key"}
contexts:
- name: smoke
  context: {cluster: smoke, user: admin}
current-context: smoke
EOF

# ---- kube-controller-manager (§6.4), optional ----
if [ "$WITH_KCM" = 1 ]; then
  "$KCM" --version | sed 's/^/   /' >&2 || fail "$KCM --version failed"
  start kube-controller-manager "$KCM" --kubeconfig="$RUN/admin.kubeconfig" \
    --authentication-kubeconfig="$RUN/admin.kubeconfig" --authorization-kubeconfig="$RUN/admin.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false \
    --service-account-private-key-file="$D/sa.key" --root-ca-file="$D/ca.crt" \
    --use-service-account-credentials=false --controllers='*'
  KCM_PID=$LAST_PID
  wait_for 90 "serviceaccount default/default (made by kube-controller-manager)" "$KCM_PID" \
    curl -fsS "${AS_ADMIN_CERT[@]}" "$API/api/v1/namespaces/default/serviceaccounts/default"
fi

# ---- helm (§6.7), optional: offline homes, local chart, no --wait ----
if [ "$WITH_HELM" = 1 ]; then
  "$HELM" version --short | sed 's/^/   /' >&2 || fail "$HELM version failed"
  export HELM_CACHE_HOME=$RUN/helm/cache HELM_CONFIG_HOME=$RUN/helm/config HELM_DATA_HOME=$RUN/helm/data
  say "helm create + install into namespace smoke"
  "$HELM" create "$RUN/smokechart" >"$RUN/helm.log" 2>&1 || fail "helm create failed (see $RUN/helm.log)"
  "$HELM" --kubeconfig "$RUN/admin.kubeconfig" install smoke "$RUN/smokechart" -n smoke --create-namespace \
    --timeout 60s >>"$RUN/helm.log" 2>&1 || fail "helm install failed"
  "$HELM" --kubeconfig "$RUN/admin.kubeconfig" list -n smoke 2>&1 | sed 's/^/   /' >&2
  curl -fsS "${AS_ADMIN_CERT[@]}" "$API/apis/apps/v1/namespaces/smoke/deployments/smoke-smokechart" >/dev/null \
    || fail "helm install did not create deployment smoke/smoke-smokechart"
  say "   deployment smoke/smoke-smokechart exists"
fi

# ---- optional: a command of the caller against the running control plane ----
if [ -n "${SMOKE_RUN:-}" ]; then
  say "running SMOKE_RUN with KUBECONFIG=$RUN/admin.kubeconfig"
  KUBECONFIG=$RUN/admin.kubeconfig bash -c "$SMOKE_RUN" || fail "SMOKE_RUN failed: $SMOKE_RUN"
fi

say "control plane OK: etcd 127.0.0.1:$ETCD_PORT, kube-apiserver $API ($GOT)"
