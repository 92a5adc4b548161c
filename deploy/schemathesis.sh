#!/usr/bin/env bash
# Runs schemathesis (an OpenAPI-driven fuzzer, from PyPI) with the given arguments, installing
# it first into a virtualenv when missing (ORBIT_SCHEMATHESIS_VENV, default
# /var/tmp/orbit-tools/schemathesis). gateway/tests/gateway/openapi.rs runs it against an embedded
# gateway with real ids; by hand, against a running gateway:
#   bash deploy/schemathesis.sh run http://127.0.0.1:8080/openapi.json \
#     --header "Authorization: Bearer $TOKEN" --checks all
set -euo pipefail

venv="${ORBIT_SCHEMATHESIS_VENV:-/var/tmp/orbit-tools/schemathesis}"
# Pinned: a newer release may add checks, which should be a deliberate change here.
requirement="schemathesis==4.32.5"
mkdir -p "$(dirname "$venv")"
if [ "$(cat "$venv/.orbit-requirements" 2>/dev/null)" != "$requirement" ]; then
  # Test binaries run in parallel and share the virtualenv: one installs, the others wait.
  exec 9>"$venv.lock"
  flock 9
  if [ "$(cat "$venv/.orbit-requirements" 2>/dev/null)" != "$requirement" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 python3-venv </dev/null >&2
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check "$requirement" >&2
    echo "$requirement" >"$venv/.orbit-requirements"
  fi
  exec 9>&-
fi
exec "$venv/bin/schemathesis" "$@"
