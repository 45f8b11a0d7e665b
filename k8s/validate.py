#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests (called by k8s/render.sh; usable on its own).

    python k8s/validate.py [--kubernetes-version 1.30] ... build/k8s/dev.yaml build/k8s/gpu.yaml

Every object is checked against the OpenAPI schema of each requested Kubernetes version in
strict mode (unknown fields are errors), using the schemas bundled in the PyPI package
kubernetes-validate (no network). Custom resources are checked against the JSON schemas in
k8s/schemas/ (<group>_<version>_<kind>.json); an object whose kind has no schema at all is an
error, not a warning. On top of the schemas, a few rules that hold for every overlay:

  * every namespaced object lives in namespace t2i; names are unique per kind;
  * no Secret is rendered (the billing Secret is created out of band, never committed);
  * no string anywhere holds a URL with a password (scheme://user:password@host).

Exit status: 0 all valid, 1 a problem was found, 2 a prerequisite is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas"
NAMESPACE = "t2i"
DEFAULT_VERSIONS = ("1.30.0", "1.37.0")
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
                  "StorageClass", "PersistentVolume", "IngressClass", "RuntimeClass"}
# scheme://user:password@  (a password-less user@ or a $(VAR) reference is fine)
URL_WITH_PASSWORD = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:[^/\s@]+@")


def load_documents(path: Path) -> list[dict]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise TypeError(f"{path}: a document is not a mapping: {doc!r:.80}")
    return docs


def object_name(doc: dict) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def crd_schema(doc: dict) -> dict | None:
    group, _, version = doc["apiVersion"].rpartition("/")
    path = SCHEMAS / f"{group}_{version}_{doc['kind'].lower()}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def kubernetes_schema_errors(doc: dict, version: str) -> list[str]:
    """All schema errors of one object (kubernetes_validate.validate stops at the first)."""
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate import utils
    from packaging.version import Version
    from referencing import Registry, Resource

    try:
        # Same lookup as kubernetes_validate.validate(): the newest bundled schema not newer
        # than the requested version, strict variant, <kind>-<group>-<version>.json.
        wanted = utils.major_minor(version)
        bundled = [v for v in utils.all_versions() if Version(utils.major_minor(v)) <= Version(wanted)]
        folder = f"kubernetes-json-schema/v{bundled[-1]}-local-strict"
        api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
        try:
            schema = utils.schema_contents(f"{folder}/{doc['kind'].lower()}-{api_version}.json", version)
        except FileNotFoundError:
            raise kubernetes_validate.SchemaNotFoundError(version=wanted, kind=doc["kind"],
                                                          api_version=doc["apiVersion"]) from None
        definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
    except AttributeError:  # the package's internals changed: first error only
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            return []
        except kubernetes_validate.ValidationError as e:
            return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def schema_errors(doc: dict, versions: list[str]) -> list[str]:
    import jsonschema
    import kubernetes_validate

    schema = crd_schema(doc)
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message} (k8s/schemas)"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]
    errors = []
    for version in versions:
        try:
            errors += [f"Kubernetes {version}: {error}" for error in kubernetes_schema_errors(doc, version)]
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"Kubernetes {version}: {e.message}; add a JSON schema to k8s/schemas/ for custom resources")
    return errors


def policy_errors(doc: dict) -> list[str]:
    errors = []
    kind = doc.get("kind")
    metadata = doc.get("metadata") or {}
    if kind not in CLUSTER_SCOPED and metadata.get("namespace") != NAMESPACE:
        errors.append(f"namespace is {metadata.get('namespace')!r}, expected {NAMESPACE!r}")
    if kind == "Secret":
        errors.append("a Secret is rendered: the billing Secret is created out of band (docs/runbook.md), never committed")
    for text in strings(doc):
        if URL_WITH_PASSWORD.search(text):
            errors.append(f"a URL with a password: {URL_WITH_PASSWORD.search(text).group(0)[:40]}...")
    return errors


def validate_file(path: Path, versions: list[str]) -> int:
    try:
        docs = load_documents(path)
    except (OSError, yaml.YAMLError, TypeError) as error:
        print(f"ERROR {path}: {error}")
        return 1
    if not docs:
        print(f"ERROR {path}: no objects")
        return 1
    problems = 0
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        name = object_name(doc)
        if not all(k in doc for k in ("apiVersion", "kind", "metadata")) or "name" not in (doc.get("metadata") or {}):
            print(f"ERROR {path}: {name}: apiVersion, kind and metadata.name are required")
            problems += 1
            continue
        key = (doc["apiVersion"].split("/")[0] + "/" + doc["kind"], doc["metadata"]["name"])
        errors = schema_errors(doc, versions) + policy_errors(doc)
        if key in seen:
            errors.append("defined twice")
        seen.add(key)
        for error in errors:
            print(f"ERROR {path}: {name}: {error}")
        problems += bool(errors)
    print(f"{path}: {len(docs)} objects, {problems} with problems (Kubernetes {', '.join(versions)}, strict)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--kubernetes-version", "-k", action="append", dest="versions",
                        help=f"validate against this version (repeatable; default {' and '.join(DEFAULT_VERSIONS)})")
    args = parser.parse_args(argv)
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate
    except ImportError as error:
        print(f"MISSING {error.name}: pip install kubernetes-validate (see docs/runbook.md)", file=sys.stderr)
        return 2
    from kubernetes_validate import utils
    from packaging.version import Version

    versions = args.versions or list(DEFAULT_VERSIONS)
    bundled = [Version(utils.major_minor(v)) for v in utils.all_versions()]
    for version in versions:
        if not bundled[0] <= Version(utils.major_minor(version)) <= bundled[-1]:
            print(f"kubernetes-validate {kubernetes_validate.__version__} has schemas for Kubernetes "
                  f"{bundled[0]} to {bundled[-1]}, not {version}", file=sys.stderr)
            return 2
    status = 0
    for path in args.files:
        status |= validate_file(path, versions)
    return status


if __name__ == "__main__":
    sys.exit(main())
