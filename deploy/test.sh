#!/usr/bin/env bash
# Runs Orbit's whole test suite: unit tests, backend conformance suites and the HTTP
# end-to-end suites. Needs only a Rust toolchain; cargo fetches the crates.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust from your distribution or rustup" >&2
  exit 1
fi

cargo test --workspace --all-targets "$@"
