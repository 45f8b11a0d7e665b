"""k8s/validate.py rejects what it should (so a green render means something)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from .conftest import K8S, MISSING_TOOL, missing_tool

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "x", "namespace": "t2i"},
    "spec": {
        "selector": {"matchLabels": {"a": "b"}},
        "template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i:1", "readinessProbe": {"grpc": {"port": 50051}}}]},
        },
    },
}
SERVICE_MONITOR = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "ServiceMonitor",
    "metadata": {"name": "x", "namespace": "t2i"},
    "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "metrics", "interval": "15s"}]},
}


def validate(tmp_path, *docs) -> tuple[int, str]:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    command = [sys.executable, str(K8S / "validate.py"), str(path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode == MISSING_TOOL:
        missing_tool(result.stdout + result.stderr)
    return result.returncode, result.stdout + result.stderr


def with_change(doc: dict, change) -> dict:
    copy = yaml.safe_load(yaml.safe_dump(doc))
    change(copy)
    return copy


def test_valid_objects_pass(tmp_path):
    status, output = validate(tmp_path, DEPLOYMENT, SERVICE_MONITOR)
    assert status == 0, output


@pytest.mark.parametrize(
    "doc, expected",
    [
        (with_change(DEPLOYMENT, lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
                     .update(grpcc={})), "'grpcc' was unexpected"),
        (with_change(DEPLOYMENT, lambda d: d["spec"].update(replicas="two")), "is not of type 'integer'"),
        (with_change(DEPLOYMENT, lambda d: d["metadata"].update(namespace="default")), "expected 't2i'"),
        (with_change(SERVICE_MONITOR, lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
         "'intervall' was unexpected"),
        ({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "t2i"},
          "stringData": {"k": "v"}}, "a Secret is rendered"),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "t2i"},
          "data": {"URL": "postgresql://t2i:hunter2@db:5432/t2i"}}, "a URL with a password"),
        ({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "s", "namespace": "t2i"},
          "spec": {}}, "Couldn't find schema"),
    ],
    ids=["unknown-field", "wrong-type", "namespace", "crd-unknown-field", "secret", "password-url", "unknown-kind"],
)
def test_problems_fail(tmp_path, doc, expected):
    status, output = validate(tmp_path, DEPLOYMENT, doc)
    assert status == 1, output
    assert expected in output
