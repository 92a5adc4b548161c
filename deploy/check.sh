#!/usr/bin/env bash
# Offline checks of the deployment files, no daemon and no cluster needed:
# - compose.yaml with `docker-compose config` (Debian's docker-compose), as it is and with the
#   citus profile;
# - deploy/prometheus: `promtool check config`, `check rules` and the alert unit tests
#   (`test rules`), with Debian's prometheus package;
# - deploy/grafana: the dashboard's structure, and every panel query parsed by promtool;
# - deploy/k8s: every manifest, strictly, against the Kubernetes schemas (kubernetes-validate)
#   and KEDA's (cloudcoil.models.keda), and each must fail once broken (--self-test).
# Installs what is missing: Debian packages with apt, the Python validators into a virtualenv
# (ORBIT_TOOLS_VENV, default /var/tmp/orbit-tools/venv).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq </dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "$@" </dev/null
}

command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
command -v promtool >/dev/null 2>&1 || apt_install prometheus

echo "check.sh: compose.yaml"
docker-compose -f compose.yaml config -q
docker-compose -f compose.yaml --profile citus config -q

echo "check.sh: deploy/prometheus"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)

echo "check.sh: deploy/grafana"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 deploy/grafana/check_dashboard.py deploy/grafana/orbit.json "$scratch/dashboard-rules.yml"
promtool check rules "$scratch/dashboard-rules.yml"

echo "check.sh: deploy/k8s"
venv="${ORBIT_TOOLS_VENV:-/var/tmp/orbit-tools/venv}"
# Pinned: the schemas they ship are what the manifests are checked against.
requirements=(kubernetes-validate==1.37.0 cloudcoil.models.keda==2.16.1.0)
if [ "$(cat "$venv/.orbit-requirements" 2>/dev/null)" != "${requirements[*]}" ]; then
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check "${requirements[@]}"
  echo "${requirements[*]}" >"$venv/.orbit-requirements"
fi
"$venv/bin/python" deploy/k8s/validate.py --self-test deploy/k8s/*.yaml deploy/k8s/keda/*.yaml
