#!/usr/bin/env bash
# Runs schemathesis (an OpenAPI-driven fuzzer, from PyPI) with the given arguments, installing
# it first into a virtualenv when missing (deploy/pytool.sh). gateway/tests/gateway/openapi.rs
# runs it against an embedded gateway with real ids; by hand, against a running gateway:
#   bash deploy/schemathesis.sh run http://127.0.0.1:8080/openapi.json \
#     --header "Authorization: Bearer $TOKEN" --checks all
set -euo pipefail

# Pinned: a newer release may add checks, which should be a deliberate change here.
exec bash "$(dirname "$0")/pytool.sh" schemathesis "schemathesis==4.32.5" schemathesis "$@"
