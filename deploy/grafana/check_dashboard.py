#!/usr/bin/env python3
"""Checks a Grafana dashboard's structure and writes its PromQL queries as a Prometheus rules
file, so that `promtool check rules` parses every query offline.

    check_dashboard.py DASHBOARD.json RULES_OUT.yml

Grafana's own variables are replaced by what Grafana would put there ($__rate_interval by a
range). Exits 1 naming each problem.
"""

import json
import sys

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def main():
    dashboard_path, rules_path = sys.argv[1], sys.argv[2]
    with open(dashboard_path) as f:
        dashboard = json.load(f)
    problems = []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"dashboard has no {key}")
    variables = [v.get("name") for v in dashboard.get("templating", {}).get("list", [])]
    ids = set()
    rules = []
    for panel in dashboard.get("panels", []):
        title = panel.get("title") or f"panel {panel.get('id')}"
        for key in ("id", "title", "type", "gridPos", "targets", "datasource"):
            if key not in panel:
                problems.append(f"{title}: no {key}")
        if panel.get("id") in ids:
            problems.append(f"{title}: id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")) or grid.get(
            "x", 0
        ) + grid.get("w", 0) > 24:
            problems.append(f"{title}: gridPos {grid} is not within the 24-column grid")
        uid = panel.get("datasource", {}).get("uid", "")
        if uid.startswith("$") and uid.strip("${}") not in variables:
            problems.append(f"{title}: datasource {uid} is not a dashboard variable")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title}: no queries")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{title}: refIds {ref_ids} are not unique")
        for target in targets:
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"{title}: a query without expr")
                continue
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            if "$" in expr:
                problems.append(f"{title}: unknown variable in {expr!r}")
            rules.append({"record": f"dashboard:panel{panel.get('id')}:{target.get('refId')}", "expr": expr})
    if problems:
        for p in problems:
            print(f"{dashboard_path}: {p}", file=sys.stderr)
        sys.exit(1)
    with open(rules_path, "w") as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=2)
    print(f"{dashboard_path}: {len(dashboard['panels'])} panels, {len(rules)} queries")


if __name__ == "__main__":
    main()
