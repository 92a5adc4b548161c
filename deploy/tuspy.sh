#!/usr/bin/env bash
# Runs Python with tuspy (the tus client from PyPI) importable, installing it first when
# missing (deploy/pytool.sh): gateway/tests/gateway/resumable.rs uploads through it, a client
# nobody here wrote. By hand:
#   bash deploy/tuspy.sh -c 'from tusclient import client; …'
set -euo pipefail

# Pinned: interop is checked against this release.
exec bash "$(dirname "$0")/pytool.sh" tuspy "tuspy==1.1.0" python "$@"
