#!/usr/bin/env bash
# A Citus cluster on loopback for Orbit's tests and benchmark: a coordinator and two worker
# nodes, each its own PostgreSQL cluster of the machine's PostgreSQL, with Citus built from
# the source vendored in deploy/vendor/citus/ (no registry reachable here serves it; where
# one does, install Citus from its packages instead: deploy/vendor/citus/README.md).
#
#   bash deploy/citus.sh                 build Citus if missing, start the three nodes, join
#                                        the workers to the coordinator, print database.url
#   bash deploy/citus.sh stop-worker N   stop worker node N (1 or 2), for fault tests
#   bash deploy/citus.sh start-worker N  start it again
#   bash deploy/citus.sh stop            stop all three nodes
#
# Ports: coordinator 9700, workers 9701 and 9702 (ORBIT_CITUS_PORT moves all three). Data
# under /var/tmp/orbit-citus (ORBIT_CITUS_DATA); the build is cached under
# /var/tmp/orbit-citus-build, so a second run takes seconds. Idempotent and unattended; run as
# root (it installs build dependencies from Debian's packages and runs the nodes as postgres).
# The database every node has Citus in is `orbit`; trust authentication, loopback only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
vendor="$here/vendor/citus"
version=13.2.2
tarball="$vendor/citus-$version.tar.gz"
sha256=c8fc76dc8294636a52b1a0dd75a20d8b4a36937df6443e30ca84d8d0464a6bb9

base_port="${ORBIT_CITUS_PORT:-9700}"
data="${ORBIT_CITUS_DATA:-/var/tmp/orbit-citus}"
build_root="${ORBIT_CITUS_BUILD:-/var/tmp/orbit-citus-build}"
database=orbit

pg_version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
if [ -z "$pg_version" ]; then
  echo "citus.sh: no PostgreSQL found; run deploy/services.sh first" >&2
  exit 1
fi
bin="/usr/lib/postgresql/$pg_version/bin"

as_postgres() { runuser -u postgres -- "$@"; }

# Everything but the URL goes to stderr: deploy/test.sh reads the URL from stdout, and dpkg
# prints its progress there even with -qq (a fresh machine's first run read it as the URL).
apt_install() {
  apt-get update -qq </dev/null >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" </dev/null >&2
}

# Builds and installs citus.so unless this PostgreSQL has it. The compiled tree is kept, so a
# PostgreSQL reinstall costs a `make install`, not a build.
install_citus() {
  local pkglibdir
  if ! command -v pg_config >/dev/null 2>&1 || ! pg_config --pgxs >/dev/null 2>&1 \
    || [ ! -d "/usr/include/postgresql/$pg_version/server" ]; then
    echo "citus.sh: installing the build dependencies" >&2
    apt_install "postgresql-server-dev-$pg_version" libcurl4-openssl-dev liblz4-dev \
      libzstd-dev libkrb5-dev make gcc
  fi
  pkglibdir="$(pg_config --pkglibdir)"
  if [ -f "$pkglibdir/citus.so" ]; then
    return 0
  fi
  echo "$sha256  $tarball" | sha256sum --check --quiet
  local src="$build_root/citus-$version-pg$pg_version"
  if [ ! -f "$src/src/backend/distributed/citus.so" ]; then
    echo "citus.sh: building Citus $version (a few minutes, once)" >&2
    rm -rf "$src"
    mkdir -p "$build_root"
    tar -xzf "$tarball" -C "$build_root"
    mv "$build_root/citus-$version" "$src"
    (cd "$src" && patch -p1 --quiet <"$vendor/citus-$version-pg15-minor.patch")
    (cd "$src" && ./configure --quiet >/dev/null && make -s -j"$(nproc)" >/dev/null)
  fi
  (cd "$src" && make -s install >/dev/null)
}

node_dir() { echo "$data/node$1"; }    # 0 is the coordinator
node_port() { echo $((base_port + $1)); }

running() { as_postgres "$bin/pg_ctl" -D "$(node_dir "$1")" status >/dev/null 2>&1; }

start_node() {
  local n="$1" dir port
  dir="$(node_dir "$n")"
  port="$(node_port "$n")"
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$data"
    chown postgres:postgres "$data"
    as_postgres "$bin/initdb" -D "$dir" --auth=trust --username=postgres >/dev/null
    cat >>"$dir/postgresql.conf" <<EOF
# deploy/citus.sh
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_preload_libraries = 'citus'
max_connections = 300
EOF
  fi
  if ! running "$n"; then
    as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir.log" -w -t 60 start >/dev/null
  fi
}

stop_node() {
  if running "$1"; then
    as_postgres "$bin/pg_ctl" -D "$(node_dir "$1")" -m fast -w -t 60 stop >/dev/null
  fi
}

sql() { # node, database, statement
  PGOPTIONS='-c client_min_messages=warning' psql -X -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(node_port "$1")" -U postgres -d "$2" -c "$3"
}

case "${1:-up}" in
  stop-worker | start-worker)
    case "${2:-}" in
      1 | 2) ;;
      *)
        echo "citus.sh: name a worker node, 1 or 2" >&2
        exit 2
        ;;
    esac
    ;;
esac

case "${1:-up}" in
  up) ;;
  stop-worker)
    stop_node "$2"
    exit 0
    ;;
  start-worker)
    start_node "$2"
    exit 0
    ;;
  stop)
    for n in 2 1 0; do stop_node "$n"; done
    exit 0
    ;;
  *)
    echo "citus.sh: unknown command $1 (up, stop-worker N, start-worker N, stop)" >&2
    exit 2
    ;;
esac

install_citus
for n in 0 1 2; do
  start_node "$n"
  if [ "$(sql "$n" postgres "SELECT count(*) FROM pg_database WHERE datname = '$database'")" = 0 ]; then
    sql "$n" postgres "CREATE DATABASE $database"
  fi
  sql "$n" "$database" "CREATE EXTENSION IF NOT EXISTS citus"
done
sql 0 "$database" "SELECT citus_set_coordinator_host('127.0.0.1', $(node_port 0))" >/dev/null
for n in 1 2; do
  port="$(node_port "$n")"
  if [ "$(sql 0 "$database" "SELECT count(*) FROM pg_dist_node WHERE nodeport = $port")" = 0 ]; then
    sql 0 "$database" "SELECT citus_add_node('127.0.0.1', $port)" >/dev/null
  fi
done
echo "citus.sh: coordinator 127.0.0.1:$(node_port 0), workers $(node_port 1) and $(node_port 2)" >&2
echo "postgres://postgres@127.0.0.1:$(node_port 0)/$database"
