#!/usr/bin/env python3
"""Validates Orbit's Kubernetes manifests offline, strictly (an unknown field is an error).

Kubernetes kinds are checked against the Kubernetes JSON schemas shipped by the
`kubernetes-validate` package; KEDA kinds (keda.sh) against the models generated from KEDA's
CRDs by `cloudcoil.models.keda`, with any field the models do not know reported as an error.

    validate.py [--kubernetes-version V] FILE...   # exit 1 and name each problem
    validate.py --self-test FILE...                # every manifest must fail once broken

deploy/check.sh installs both packages into a virtualenv and runs this.
"""

import argparse
import copy
import sys

import kubernetes_validate
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

KEDA_KINDS = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
}


def unknown_fields(given, known, path):
    """Paths in `given` that are absent from `known` (what the model kept)."""
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                yield f"{path}.{key}"
            else:
                yield from unknown_fields(value, known[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for i, (a, b) in enumerate(zip(given, known)):
            yield from unknown_fields(a, b, f"{path}[{i}]")


def problems(doc, version):
    """Every problem found in one resource; empty when it is valid."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return ["not a Kubernetes resource (no kind or apiVersion)"]
    api_group = doc["apiVersion"].split("/")[0]
    if api_group == "keda.sh":
        model = KEDA_KINDS.get(doc["kind"])
        if model is None:
            return [f"no KEDA schema for kind {doc['kind']}"]
        try:
            parsed = model.model_validate(doc)
        except Exception as e:  # pydantic.ValidationError, with every field's reason
            return [str(e)]
        kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        return [f"unknown field {p}" for p in unknown_fields(doc, kept, "")]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [str(e)]
    return []


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def broken_copies(doc):
    """The same resource with an unknown field added, and with a field of the wrong type."""
    unknown = copy.deepcopy(doc)
    unknown.setdefault("spec", {})["notAField"] = True
    wrong_type = copy.deepcopy(doc)
    wrong_type["metadata"]["labels"] = ["not", "a", "map"]
    return [("an unknown spec field", unknown), ("labels as a list", wrong_type)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default="1.33.0")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    failed = False
    checked = 0
    for path in args.files:
        for doc in load(path):
            name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            found = problems(doc, args.kubernetes_version)
            if found:
                failed = True
                for p in found:
                    print(f"{name}: {p}", file=sys.stderr)
            checked += 1
            if args.self_test:
                for what, broken in broken_copies(doc):
                    if not problems(broken, args.kubernetes_version):
                        failed = True
                        print(f"{name}: accepted with {what}", file=sys.stderr)
    if checked == 0:
        print("no manifests found", file=sys.stderr)
        failed = True
    if failed:
        sys.exit(1)
    mode = " (and rejected when broken)" if args.self_test else ""
    print(f"{checked} manifests valid against Kubernetes {args.kubernetes_version} and KEDA{mode}")


if __name__ == "__main__":
    main()
