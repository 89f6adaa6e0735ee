#!/usr/bin/env bash
# Installs what the test suite needs, idempotently: fast when everything is already there.
# Debian packages: swaks (SMTP client), postfix (for smtp-source / smtp-sink), openssl,
# dnsmasq-base (a DNS server on loopback for the outbound delivery tests), iproute2 (the pod
# network of the end-to-end test).
# PyPI: pytest, bcrypt (tests/python/requirements.txt). crates.io: cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '== %s\n' "$*"; }

missing=()
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
command -v smtp-source >/dev/null 2>&1 || [ -x /usr/sbin/smtp-source ] || missing+=(postfix)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
command -v rspamd >/dev/null 2>&1 || missing+=(rspamd)   # the rspamd plugin's tests
# mailroom-testkit's FakeKubelet (pod network namespaces, bridge, veths): ip from iproute2;
# nsenter, unshare, setpriv and mount come with util-linux / mount (essential packages).
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # postfix asks debconf questions; answer them so the install never waits for input.
  echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections 2>/dev/null || true
  echo "postfix postfix/mailname string mailroom-ci.invalid" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq
  # Packages must not start their services (rspamd's would listen on 11333/11334): the tests
  # start their own on free ports. Containers usually have this policy already.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$own_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
fi

if ! python3 -c 'import pytest, bcrypt' >/dev/null 2>&1; then
  say "installing Python test packages"
  python3 -m pip install -q -r tests/python/requirements.txt
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz"
  cargo install -q cargo-fuzz --locked
fi
# Servers the integration tests run (nats-server; etcd + kube-apiserver + kube-controller-manager
# + kubectl for mailroom-testkit's KubeControlPlane; helm for the chart tests), built from the Go
# module proxy into ~/.cache/mailroom/tools and reused across clones (e2e/tools/README.md). Warm
# cache: about 1 s; a cold build of the Kubernetes tools and helm takes several minutes
# (progress on stderr).
say "test binaries (e2e/tools/build.sh)"
./e2e/tools/build.sh nats-server etcd kube-apiserver kube-controller-manager kubectl helm >/dev/null

say "test dependencies ready"
