#!/usr/bin/env bash
# Runs a Python tool from PyPI, installing it first into its own virtualenv when missing:
#   bash deploy/pytool.sh NAME REQUIREMENT COMMAND [ARGS...]
# The virtualenv is /var/tmp/orbit-tools/NAME (ORBIT_TOOLS_DIR overrides the directory);
# COMMAND is looked up in its bin/ (`python` runs a script with the tool importable).
# Test binaries run in parallel and share a virtualenv: one installs, the others wait.
set -euo pipefail

name="$1" requirement="$2" command="$3"
shift 3
venv="${ORBIT_TOOLS_DIR:-/var/tmp/orbit-tools}/$name"
mkdir -p "$(dirname "$venv")"
if [ "$(cat "$venv/.orbit-requirements" 2>/dev/null)" != "$requirement" ]; then
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
exec "$venv/bin/$command" "$@"
