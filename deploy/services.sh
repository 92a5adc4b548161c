#!/usr/bin/env bash
# Brings up the services the distributed backends need, on loopback: PostgreSQL (5432),
# RabbitMQ (5672) and an S3-compatible server (deploy/s3.sh, 9000). Uses ones already
# running, starts installed ones, and installs missing ones from Debian's packages.
# Idempotent and unattended (no prompts, no stdin); run as root on a fresh machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
  for _ in $(seq 1 "$3"); do
    listening "$2" && return 0
    sleep 1
  done
  echo "services.sh: $1 did not come up on 127.0.0.1:$2" >&2
  return 1
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq </dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" </dev/null
}

if ! listening 5432; then
  fresh_postgres=""
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "services.sh: installing PostgreSQL" >&2
    apt_install postgresql
    fresh_postgres=1
  fi
  cluster_version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  hba="/etc/postgresql/$cluster_version/main/pg_hba.conf"
  # Tests connect as postgres over TCP without a password, as on the CI machines.
  if [ -n "$fresh_postgres" ] && ! grep -q "orbit-tests" "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust # orbit-tests' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start || true
  wait_for PostgreSQL 5432 60
fi

if ! listening 5672; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services.sh: installing RabbitMQ" >&2
    apt_install rabbitmq-server
  fi
  rabbitmq-server -detached || true
  wait_for RabbitMQ 5672 120
fi

bash "$here/s3.sh"
