#!/usr/bin/env bash
# Makes an S3-compatible server available on loopback for the S3 tests and local runs:
# s3s-fs (a small S3 server that keeps objects as files), listening on 127.0.0.1:$ORBIT_S3_PORT.
# Idempotent: if something already listens on that port, it is assumed to be the server and
# left alone. Safe to run unattended (no prompts, no stdin).
#
#   ORBIT_S3_PORT        port to listen on                  (default 9000)
#   ORBIT_S3_DATA        directory holding buckets/objects  (default /var/tmp/orbit-s3)
#   ORBIT_S3_ACCESS_KEY  access key the server accepts      (default orbit)
#   ORBIT_S3_SECRET_KEY  secret key the server accepts      (default orbit-secret)
#
# The server's log is $ORBIT_S3_DATA.log and its pid $ORBIT_S3_DATA.pid (next to the data
# directory, so a wiped data directory does not lose them). Stop it with
#   kill "$(cat /var/tmp/orbit-s3.pid)"
# Then point Orbit at it with object_store.url = s3://<bucket>,
# object_store.endpoint = http://127.0.0.1:9000 and the keys above.
set -euo pipefail

port="${ORBIT_S3_PORT:-9000}"
data="${ORBIT_S3_DATA:-/var/tmp/orbit-s3}"
data="${data%/}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"
access_key="${ORBIT_S3_ACCESS_KEY:-orbit}"
secret_key="${ORBIT_S3_SECRET_KEY:-orbit-secret}"
log="$data.log"
pidfile="$data.pid"
version="0.14.1"

listening() {
  # bash's /dev/tcp: no dependency on nc/curl being installed.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

if listening; then
  exit 0
fi

# cargo installs into $CARGO_HOME/bin, which a non-login shell (CI, sudo) may not have on PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v s3s-fs >/dev/null 2>&1; then
  if ! command -v cargo >/dev/null 2>&1; then
    echo "s3.sh: s3s-fs is not installed and cargo is missing to install it" >&2
    exit 1
  fi
  echo "s3.sh: installing s3s-fs $version (once; takes a few minutes)" >&2
  cargo install "s3s-fs@$version" --features binary --locked --quiet </dev/null
fi

# setsid + nohup: the server outlives this script, its terminal and its process group. It runs
# in its data directory: started from a clone that is later deleted, s3s-fs answers every
# request with 500 InternalError.
cd "$data"
setsid nohup s3s-fs \
  --host 127.0.0.1 \
  --port "$port" \
  --access-key "$access_key" \
  --secret-key "$secret_key" \
  "$data" </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid" >"$pidfile"

for _ in $(seq 1 60); do
  if listening; then
    echo "s3.sh: s3s-fs listening on http://127.0.0.1:$port (pid $pid, data $data)" >&2
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "s3.sh: s3s-fs exited before listening on 127.0.0.1:$port; last lines of $log:" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
  fi
  sleep 0.5
done

echo "s3.sh: s3s-fs (pid $pid) did not listen on 127.0.0.1:$port within 30 s; see $log" >&2
exit 1
