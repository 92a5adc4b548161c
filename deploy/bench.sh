#!/usr/bin/env bash
# Orbit's benchmark (docs/performance.md): generates a deterministic 1M-row contacts CSV, loads
# it with `psql \copy` and `pgloader` into a table with an identity primary key and a unique
# (directory_id, email) index, ingests it with Orbit distributed (gateway + 2 workers on
# PostgreSQL, S3, RabbitMQ) and embedded, counting PostgreSQL's WAL bytes per row; then runs a
# 100,000-row file into one directory on 1, 2 and 4 orbit-worker processes each capped to a
# tenth of a core (scale-out), measures the synchronous path (100-row uploads, 16 concurrent
# clients, 30 s), the same uploads offered open-loop at 100 a second (latency from when each
# fell due; CPU per upload of gateway, workers and PostgreSQL) and peak RSS during a 1 GiB
# upload. Prints figures and each target as met or
# missed, and writes results.json in the work dir. Before the synchronous path, the `fairness`
# phase (issue 24; about 2 minutes) times, with fair scheduling on and off, one organization's
# 20,000-row upload idle and right after another queues four 500,000-row files, and a lone
# organization's 1M-row ingest. Not in the default run, the `export` phase (issue 23) loads 1M
# profiles into one directory and times `GET …/profiles/export` as CSV, NDJSON and zstd CSV
# against paging the JSON list through them, with the gateway's peak RSS.
#
#   bash deploy/bench.sh                      # every phase but citus and export (about 17 minutes on 2 cores)
#   bash deploy/bench.sh --phases copy,distributed --rows 200000
#   bash deploy/bench.sh --phases scaleout --scaleout-rows 30000
#   bash deploy/citus.sh && bash deploy/bench.sh --phases citus    # Citus against PostgreSQL
#   bash deploy/bench.sh --phases fairness --fairness-bulk-runs 3   # fair scheduling on and off
#   bash deploy/bench.sh --phases export --export-rows 300000       # export against paging
#   bash deploy/bench.sh --help
#
# Needs only the test services: brings them up (deploy/services.sh) and installs pgloader
# from Debian's packages when it is missing. Run as root on a fresh machine: the scale-out
# phase caps its workers with cgroup v1 `cpu` groups under /sys/fs/cgroup/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust from your distribution or rustup" >&2
  exit 1
fi

bash deploy/services.sh
if ! command -v pgloader >/dev/null 2>&1; then
  echo "bench.sh: installing pgloader" >&2
  apt-get update -qq </dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgloader </dev/null
fi

# orbit-bench starts the orbit-gateway and orbit-worker built beside it.
cargo build --release --workspace --bins
exec cargo run --release --quiet -p orbit-bench -- "$@"
