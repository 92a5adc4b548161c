#!/usr/bin/env bash
# Runs Orbit's whole test suite: unit tests, the backend conformance suites (SQLite,
# PostgreSQL and Citus, local directory and S3, in-process queue and RabbitMQ), and the HTTP
# suites on the embedded stack and again on the distributed one (PostgreSQL, S3, RabbitMQ, two
# orbit-worker processes), then once more with Citus as its database, and the offline checks
# of the deployment files (deploy/check.sh). Brings up the services it needs first
# (deploy/services.sh, then the Citus cluster of deploy/citus.sh), and installs Prometheus,
# which the monitoring test runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust from your distribution or rustup" >&2
  exit 1
fi

bash deploy/services.sh
# The store suites' Citus cases and the last HTTP run use the coordinator this prints.
citus_url="$(bash deploy/citus.sh)"
export ORBIT_TEST_CITUS_URL="${ORBIT_TEST_CITUS_URL:-$citus_url}"
# promtool and docker-compose for the checks, prometheus for gateway/tests/gateway/monitoring.rs.
bash deploy/check.sh

# The distributed HTTP suites spawn orbit-worker processes: build them first.
cargo build --workspace --bins
cargo test --workspace --all-targets "$@"
# The HTTP suites are one test binary (gateway/tests/gateway); its upload, api, steer, merge,
# limits, fairness and export suites run again on the distributed stack (filters match by
# substring, so openapi:: is skipped by name).
ORBIT_TEST_STACK=distributed cargo test --workspace --test gateway "$@" -- upload:: compressed:: resumable:: api:: steer:: merge:: limits:: fairness:: export:: --skip openapi::
# The same on Citus: each test's database is a fresh schema on the coordinator.
ORBIT_TEST_STACK=distributed ORBIT_TEST_DATABASE=citus cargo test --workspace --test gateway "$@" -- upload:: compressed:: resumable:: api:: steer:: merge:: limits:: fairness:: export:: --skip openapi::
