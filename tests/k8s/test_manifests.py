"""Invariants of the rendered Kubernetes overlays (k8s/render.sh output).

What ties the pieces together is read from its source of truth, not repeated here: the route
timeout, the upstream address and the descriptor path from edge/envoy.yaml, the settings from
the rendered ConfigMap, the metric names from t2i.metrics, the env var names from t2i.cli.
"""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import K8S, ROOT, Rendered

ENVOY_FILE = ROOT / "edge" / "envoy.yaml"
ENVOY = yaml.safe_load(ENVOY_FILE.read_text())
SERVICE_NAME = "illustrious.texttoimage.v1.TextToImageService"


# --- edge/envoy.yaml ---------------------------------------------------------------------------

def envoy_http_managers() -> list[dict]:
    return [
        f["typed_config"]
        for listener in ENVOY["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]


def envoy_cluster() -> dict:
    (cluster,) = [c for c in ENVOY["static_resources"]["clusters"] if c["name"] == "t2i_grpc"]
    return cluster


def duration_seconds(value: str) -> float:
    assert isinstance(value, str) and value.endswith("s"), f"not a protobuf duration: {value!r}"
    return float(value[:-1])


def envoy_route_timeout() -> float:
    """The longest route timeout towards the service: the longest generation Envoy waits for."""
    timeouts = [
        duration_seconds(route["route"].get("timeout", "15s"))
        for hcm in envoy_http_managers()
        for vhost in hcm["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if route.get("route", {}).get("cluster") == envoy_cluster()["name"]
    ]
    assert timeouts, "no route to the t2i_grpc cluster in edge/envoy.yaml"
    return max(timeouts)


def envoy_upstream(cluster: str = "t2i_grpc") -> tuple[str, int]:
    (found,) = [c for c in ENVOY["static_resources"]["clusters"] if c["name"] == cluster]
    (address,) = [
        e["endpoint"]["address"]["socket_address"]
        for group in found["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    return address["address"], int(address["port_value"])


def envoy_descriptor_path() -> str:
    (path,) = [
        f["typed_config"]["proto_descriptor"]
        for hcm in envoy_http_managers()
        for f in hcm["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    return path


def envoy_served_files() -> list[str]:
    """The files Envoy serves as direct_response bodies (the playground page)."""
    return [
        route["direct_response"]["body"]["filename"]
        for hcm in envoy_http_managers()
        for vhost in hcm["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if "filename" in route.get("direct_response", {}).get("body", {})
    ]


def envoy_max_heap_bytes() -> int:
    (monitor,) = [m for m in ENVOY["overload_manager"]["resource_monitors"] if m["name"].endswith("fixed_heap")]
    return int(monitor["typed_config"]["max_heap_size_bytes"])


def test_envoy_facts_this_suite_relies_on():
    assert envoy_route_timeout() == 300
    assert envoy_upstream() == ("t2i-grpc.t2i.svc.cluster.local", 50051)
    assert envoy_cluster()["type"] == "STRICT_DNS"
    assert envoy_descriptor_path() == "/etc/envoy/text_to_image.pb"
    assert sorted(envoy_served_files()) == [f"/etc/envoy/playground/{name}" for name in
                                            ("index.html", "playground.css", "playground.js")]


# --- helpers -----------------------------------------------------------------------------------

QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def quantity(value) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"unsupported quantity {value!r}"
    return float(match.group(1)) * FACTORS[match.group(2)]


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_templates(r: Rendered) -> list[tuple[str, dict]]:
    out = []
    for o in r.objects:
        spec = o.get("spec") or {}
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", spec["template"]))
        elif o["kind"] == "CronJob":
            out.append((f"CronJob/{o['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]))
        elif o["kind"] == "Pod":
            out.append((f"Pod/{o['metadata']['name']}", o))
    return out


def headless_service(r: Rendered) -> dict:
    host, _ = envoy_upstream()
    name, namespace = host.split(".")[:2]
    service = r.get("Service", name)
    assert service["metadata"]["namespace"] == namespace
    return service


def server_deployment(r: Rendered) -> dict:
    """The Deployment behind the headless Service Envoy sends gRPC traffic to."""
    selector = headless_service(r)["spec"]["selector"]
    found = [d for d in r.all("Deployment") if selects({"matchLabels": selector}, d["spec"]["template"]["metadata"]["labels"])]
    assert len(found) == 1, f"{r.overlay}: the t2i-grpc selector matches {len(found)} Deployments"
    return found[0]


def server_container(r: Rendered) -> dict:
    (container,) = server_deployment(r)["spec"]["template"]["spec"]["containers"]
    return container


def edge_deployment(r: Rendered) -> dict:
    found = [
        d for d in r.all("Deployment")
        if any(c["name"] == "envoy" for c in d["spec"]["template"]["spec"]["containers"])
    ]
    assert len(found) == 1
    return found[0]


def container_env(r: Rendered, container: dict) -> dict[str, object]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env."""
    env: dict[str, object] = {}
    for source in container.get("envFrom") or []:
        assert "configMapRef" in source, f"unexpected envFrom {source}"
        env.update(r.configmap(source["configMapRef"]["name"])["data"])
    for item in container.get("env") or []:
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def prestop_sleep_seconds(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if pre is None:
        return 0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = " ".join(pre["exec"]["command"])
    sleeps = [float(s) for s in re.findall(r"\bsleep\s+([0-9.]+)", command)]
    assert sleeps, f"preStop does not sleep: {command!r}"
    return sum(sleeps)


def mount_for(r: Rendered, container: dict, pod_spec: dict, path: str) -> tuple[dict, dict]:
    """The (volumeMount, volume) a file or folder path lives in (the longest mountPath prefix)."""
    mounts = [m for m in container.get("volumeMounts") or [] if path == m["mountPath"] or
              path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is not inside any volume mount"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def projected_file(r: Rendered, container: dict, pod_spec: dict, path: str) -> tuple[str, str]:
    """(ConfigMap name, key) a file `path` comes from when it is in a projected volume."""
    mount, volume = mount_for(r, container, pod_spec, path)
    assert "projected" in volume, f"{path} is not from a projected volume: {volume}"
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    found = [
        (source["configMap"]["name"], item["key"])
        for source in volume["projected"]["sources"] if "configMap" in source
        for item in source["configMap"].get("items", []) if item["path"] == relative
    ]
    assert len(found) == 1, f"{path}: {len(found)} projected ConfigMap items"
    return found[0]


def configmap_file(r: Rendered, container: dict, pod_spec: dict, path: str) -> str:
    """Contents of the file `path` when it comes from a ConfigMap volume."""
    mount, volume = mount_for(r, container, pod_spec, path)
    assert "configMap" in volume, f"{path} is not from a ConfigMap volume: {volume}"
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    return r.configmap(volume["configMap"]["name"])["data"][key]


# --- the service Deployment ---------------------------------------------------------------------

def test_probes_use_grpc_health_on_the_serving_port(rendered: Rendered):
    container = server_container(rendered)
    port = int(container_env(rendered, container).get("T2I_GRPC_PORT", serve_options()["T2I_GRPC_PORT"].default))
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{rendered.overlay}: no {probe}"
        assert container[probe]["grpc"]["port"] == port, f"{probe} must be a native gRPC probe on {port}"
    # Readiness asks for the same service name Envoy's active health check asks for.
    envoy_name = envoy_cluster()["health_checks"][0]["grpc_health_check"]["service_name"]
    assert container["readinessProbe"]["grpc"].get("service") == envoy_name == SERVICE_NAME


def test_startup_probe_allows_a_long_model_load(rendered: Rendered):
    startup = server_container(rendered)["startupProbe"]
    window = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert window >= 600, f"startup probe gives up after {window} s; SDXL checkpoints take minutes"
    if rendered.overlay == "gpu":
        assert window >= 1200


def test_termination_grace_covers_the_longest_generation_and_the_drain(rendered: Rendered):
    deployment = server_deployment(rendered)
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(rendered)
    grace_period = float(container_env(rendered, container)["T2I_GRACE_PERIOD"])
    prestop = prestop_sleep_seconds(container)
    termination = pod["terminationGracePeriodSeconds"]
    route_timeout = envoy_route_timeout()
    # In-flight work accepted just before SIGTERM may run for the whole route timeout.
    assert grace_period >= route_timeout, (grace_period, route_timeout)
    assert prestop > 0, "a preStop delay lets Envoy (DNS refresh + health check) stop picking the pod"
    assert termination >= route_timeout
    assert termination >= prestop + grace_period, (termination, prestop, grace_period)


def serve_options() -> dict:
    from t2i.cli_options import options_of
    from t2i.settings import ServeSettings

    return {o.env: o for o in options_of(ServeSettings) if o.env}


# Where the cluster's server.env deliberately differs from a `t2i serve` default, and why.
CLUSTER_OVERRIDES = {
    "T2I_GRPC_HOST": "the edge is another pod: listen on the pod's address, not loopback",
    "T2I_COMPAT_HOST": "the adapters' port, reached by the edge from another pod",
    "T2I_METRICS_HOST": "Prometheus scrapes from another pod",
    "T2I_TRUSTED_PROXIES": "the edge pods' addresses; NetworkPolicy lets only them reach the gRPC port",
    "T2I_DATA_DIR": "the emptyDir mount",
    "T2I_GRACE_PERIOD": "at least the edge's route timeout",
    "T2I_BILLING_CONFIG": "the billing ConfigMap",
}
LOGGING = {"T2I_LOG_LEVEL", "T2I_LOG_FORMAT"}  # the `t2i` callback's options, not serve's


def test_settings_come_from_a_configmap_and_are_known_to_the_cli(rendered: Rendered):
    container = server_container(rendered)
    env = container_env(rendered, container)
    unknown = {k for k in env if k.startswith("T2I_")} - set(serve_options()) - LOGGING
    assert not unknown, f"settings `t2i serve` does not read: {unknown}"
    assert container["args"] == ["serve"] or container.get("command", [])[-1:] == ["serve"]
    assert env["T2I_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_cluster_env_file_restates_no_default():
    """server.env sets what the cluster needs differently, nothing that merely repeats a
    default (which would go stale when the default changes)."""
    options = serve_options()
    lines = (ROOT / "k8s/base/config/server.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    for name, value in env.items():
        if not name.startswith("T2I_") or name in LOGGING:
            continue
        option = options[name]
        if name in CLUSTER_OVERRIDES:
            assert value != str(option.default), f"{name}={value} is the default; drop it or its override note"
        else:
            assert str(option.default).lower() == value.lower(), (
                f"{name}={value} differs from the `t2i serve` default {option.default!r}: "
                "add it to CLUSTER_OVERRIDES with the reason, or drop it"
            )
    assert set(CLUSTER_OVERRIDES) <= set(env), set(CLUSTER_OVERRIDES) - set(env)


def test_database_and_redis_urls_come_from_the_secret(rendered: Rendered):
    env = container_env(rendered, server_container(rendered))
    for name, key in (("T2I_DATABASE_URL", "database-url"), ("T2I_REDIS_URL", "redis-url")):
        ref = env[name]["secretKeyRef"]
        assert ref["name"] == "t2i-billing" and ref["key"] == key
        # Production must not start without its billing stores; dev falls back to SQLite.
        assert ref.get("optional", False) is (rendered.overlay == "dev")
    assert not rendered.all("Secret")


def test_writable_scratch_is_emptydir_and_the_root_filesystem_is_read_only(rendered: Rendered):
    container = server_container(rendered)
    pod = server_deployment(rendered)["spec"]["template"]["spec"]
    data_dir = container_env(rendered, container)["T2I_DATA_DIR"]
    for path in (data_dir, "/tmp"):
        mount, volume = mount_for(rendered, container, pod, path)
        assert mount["mountPath"] == path and "emptyDir" in volume and not mount.get("readOnly")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_models_come_from_a_volume(rendered: Rendered):
    container = server_container(rendered)
    pod = server_deployment(rendered)["spec"]["template"]["spec"]
    env = container_env(rendered, container)
    mount, _ = mount_for(rendered, container, pod, "/models")
    assert mount["readOnly"] is True
    if rendered.overlay == "dev":
        assert "T2I_MODELS" not in env  # the built-in demo model
        return
    from t2i.models.config import ModelsFile

    models = ModelsFile.model_validate(yaml.safe_load(configmap_file(rendered, container, pod, env["T2I_MODELS"])))
    for spec in models.models:
        for path in filter(None, (spec.path, spec.config)):
            assert path.is_absolute(), f"model {spec.id}: {path} would be relative to the ConfigMap folder"
            _, volume = mount_for(rendered, container, pod, str(path))
            assert volume.get("persistentVolumeClaim", {}).get("readOnly") is True, (path, volume)
            rendered.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_billing_config_is_valid(rendered: Rendered):
    from t2i.billing.settings import BillingSettings

    container = server_container(rendered)
    pod = server_deployment(rendered)["spec"]["template"]["spec"]
    path = container_env(rendered, container)["T2I_BILLING_CONFIG"]
    BillingSettings.model_validate(yaml.safe_load(configmap_file(rendered, container, pod, path)))


def test_no_service_link_variables(rendered: Rendered):
    # A Service named t2i-metrics would inject T2I_METRICS_PORT=tcp://... (and t2i-grpc-like
    # names others) into the environment the CLI reads its settings from.
    for name, template in pod_templates(rendered):
        assert template["spec"].get("enableServiceLinks") is False, name


def test_gpu_overlay_requests_a_gpu_and_dev_does_not(rendered: Rendered):
    container = server_container(rendered)
    pod = server_deployment(rendered)["spec"]["template"]["spec"]
    env = container_env(rendered, container)
    if rendered.overlay == "gpu":
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert pod.get("nodeSelector"), "GPU replicas must land on GPU nodes"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        assert env["T2I_DEVICE"] == "cuda"
    else:
        for _, template in pod_templates(rendered):
            for c in template["spec"]["containers"]:
                resources = c.get("resources", {})
                assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}
            assert "nodeSelector" not in template["spec"]
        assert env["T2I_DEVICE"] == "cpu"


def test_every_container_has_requests_and_limits(rendered: Rendered):
    for name, template in pod_templates(rendered):
        for c in template["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (name, c["name"], kind)
            assert quantity(c["resources"]["requests"]["memory"]) <= quantity(c["resources"]["limits"]["memory"])
            assert quantity(c["resources"]["requests"]["cpu"]) <= quantity(c["resources"]["limits"]["cpu"])


def test_dev_overlay_is_one_small_replica(overlays):
    dev = overlays["dev"]
    assert server_deployment(dev)["spec"]["replicas"] == 1
    assert not dev.all("HorizontalPodAutoscaler")
    limits = server_container(dev)["resources"]["limits"]
    assert quantity(limits["memory"]) <= 4 * 2**30 and quantity(limits["cpu"]) <= 2


def test_gpu_overlay_runs_several_replicas(overlays):
    gpu = overlays["gpu"]
    (hpa,) = gpu.all("HorizontalPodAutoscaler")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Replicas belong to the autoscaler: a fixed count would be reset on every apply.
    assert "replicas" not in server_deployment(gpu)["spec"]


# --- security ----------------------------------------------------------------------------------

def test_every_container_is_locked_down(rendered: Rendered):
    for name, template in pod_templates(rendered):
        pod = template["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            where = f"{rendered.overlay}: {name} container {c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: unpinned {image}"


def test_namespace_is_restricted(rendered: Rendered):
    (namespace,) = rendered.all("Namespace")
    assert namespace["metadata"]["name"] == "t2i"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in rendered.objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "t2i", f"{o['kind']}/{o['metadata']['name']}"


URL_WITH_PASSWORD = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]*:[^/\s@'\"]+@")


def test_no_secret_values_are_committed_under_k8s():
    manifests = [p for p in sorted(K8S.rglob("*")) if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".env")
                 and "generated" not in p.parts]
    assert len(manifests) > 10
    for path in manifests:
        text = path.read_text()
        assert not URL_WITH_PASSWORD.search(text), f"{path}: a URL with a password"
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), f"{path}: a Secret with values"
                if isinstance(doc, dict) and "secretGenerator" in doc:
                    pytest.fail(f"{path}: secretGenerator would put secret values in the repository")


def test_no_url_with_a_password_in_rendered_manifests(rendered: Rendered):
    assert not URL_WITH_PASSWORD.search(rendered.path.read_text())


# --- Services and Envoy -------------------------------------------------------------------------

def test_headless_service_matches_the_envoy_cluster(rendered: Rendered):
    service = headless_service(rendered)
    _, port = envoy_upstream()
    assert service["spec"]["clusterIP"] == "None", "Envoy's STRICT_DNS needs one A record per pod"
    assert not service["spec"].get("publishNotReadyAddresses"), "only ready (SERVING) pods may be in DNS"
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    container = server_container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = service_port["targetPort"]
    assert (ports[target] if isinstance(target, str) else target) == port


def test_the_adapters_port_matches_the_envoy_cluster_and_the_settings(rendered: Rendered):
    """Envoy's t2i_compat cluster (the OpenAI Images API) reaches the same pods as t2i_grpc on the
    adapters' port, which the container declares, the headless Service names, and `t2i serve`
    listens on; its loopback calls to the gRPC port are trusted (else it refuses to start)."""
    from t2i.cli_options import build
    from t2i.compat.app import configuration_error
    from t2i.settings import ServeSettings

    host, port = envoy_upstream("t2i_compat")
    assert host == envoy_upstream()[0]
    container = server_container(rendered)
    env = container_env(rendered, container)
    assert int(env.get("T2I_COMPAT_PORT", serve_options()["T2I_COMPAT_PORT"].default)) == port
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["compat"] == port
    service = headless_service(rendered)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert service_port["targetPort"] == "compat"
    settings = build(ServeSettings, {option.name: env[option.env] for option in serve_options().values()
                                     if option.env in env and option.name in ("grpc_host", "trusted_proxies")})
    assert configuration_error(settings) is None


def test_metrics_service_and_servicemonitor(rendered: Rendered):
    container = server_container(rendered)
    metrics_port = int(container_env(rendered, container).get("T2I_METRICS_PORT", serve_options()["T2I_METRICS_PORT"].default))
    pod_labels = server_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = [
        s for s in rendered.all("Service")
        if selects({"matchLabels": s["spec"].get("selector", {})}, pod_labels)
        and any(ports.get(p["targetPort"], p["targetPort"]) == metrics_port for p in s["spec"]["ports"])
    ]
    assert len(services) == 1, "one Service exposes the metrics port"
    (metrics,) = services
    monitors = rendered.all("ServiceMonitor")
    if rendered.overlay == "dev":
        assert not monitors  # no prometheus-operator on a dev cluster
        return
    (monitor,) = monitors
    assert selects(monitor["spec"]["selector"], metrics["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [metrics["metadata"]["namespace"]]
    port_names = {p["name"] for p in metrics["spec"]["ports"]}
    assert all(e["port"] in port_names and e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])


def test_edge_configmap_holds_edge_envoy_yaml_byte_for_byte(rendered: Rendered):
    edge = edge_deployment(rendered)
    pod = edge["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container.get("command", []) + container.get("args", [])
    config_path = args[args.index("--config-path") + 1] if "--config-path" in args else args[args.index("-c") + 1]
    mount, volume = mount_for(rendered, container, pod, config_path)
    key = config_path[len(mount["mountPath"]) + 1:]
    sources = {
        item["path"]: source["configMap"]["name"]
        for source in volume["projected"]["sources"]
        for item in source["configMap"]["items"]
    }
    config_map = rendered.configmap(sources[key])
    assert config_map["data"]["envoy.yaml"].encode() == ENVOY_FILE.read_bytes()

    # The descriptor Envoy's transcoder loads is mounted at the path edge/envoy.yaml names.
    descriptor_path = envoy_descriptor_path()
    assert Path(descriptor_path).parent == Path(mount["mountPath"])
    descriptor_map = rendered.configmap(sources[Path(descriptor_path).name])
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(
        base64.b64decode(descriptor_map["binaryData"][Path(descriptor_path).name])
    ).file
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert SERVICE_NAME in services
    assert "google/api/annotations.proto" in {f.name for f in files}, "--include_imports"
    # Small enough for a ConfigMap (1 MiB including the base64 overhead).
    assert len(yaml.safe_dump(descriptor_map)) < 900_000


def test_the_files_envoy_serves_are_mounted_byte_for_byte(rendered: Rendered):
    """The playground page: /etc/envoy/playground/X in the pod is edge/playground/X."""
    edge = edge_deployment(rendered)
    pod = edge["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_dir = Path(envoy_descriptor_path()).parent
    served = envoy_served_files()
    assert served
    names = set()
    for path in served:
        name, key = projected_file(rendered, container, pod, path)
        config_map = rendered.configmap(name)
        repository_copy = ROOT / "edge" / Path(path).relative_to(config_dir)
        assert config_map["data"][key].encode() == repository_copy.read_bytes(), path
        names.add(name)
    for name in names:
        # Small enough for a ConfigMap (1 MiB).
        assert len(yaml.safe_dump(rendered.configmap(name))) < 900_000


def test_edge_shutdown_and_memory_agree_with_envoy_yaml(rendered: Rendered):
    edge = edge_deployment(rendered)
    pod = edge["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    route_timeout = envoy_route_timeout()
    # In-flight generations through a terminating Envoy may last the whole route timeout.
    assert prestop_sleep_seconds(container) >= route_timeout
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep_seconds(container)
    # The overload manager's heap limit must not exceed the container's memory limit.
    assert envoy_max_heap_bytes() <= quantity(container["resources"]["limits"]["memory"])
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    admin = ENVOY["admin"]["address"]["socket_address"]
    assert f"/dev/tcp/{admin['address']}/{admin['port_value']}" in command and "drain_listeners" in command
    listener_port = ENVOY["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == listener_port
    args = container.get("args", [])
    assert int(args[args.index("--concurrency") + 1]) <= quantity(container["resources"]["limits"]["cpu"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in container


# --- autoscaling, disruption, network -----------------------------------------------------------

def test_hpa_targets_the_service_deployment(rendered: Rendered):
    from prometheus_client import Gauge

    from t2i import metrics

    gauges = {m._name for m in vars(metrics).values() if isinstance(m, Gauge)}
    deployment = server_deployment(rendered)
    for hpa in rendered.all("HorizontalPodAutoscaler"):
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            "apps/v1", "Deployment", deployment["metadata"]["name"])
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert names and set(names) <= {"t2i_queue_depth", "t2i_inflight_requests"} <= gauges, names
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_disruption_budgets_cover_both_deployments(rendered: Rendered):
    for deployment in (server_deployment(rendered), edge_deployment(rendered)):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [p for p in rendered.all("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
        assert len(budgets) == 1, deployment["metadata"]["name"]
        # maxUnavailable: a single-replica deployment can still be drained.
        assert budgets[0]["spec"].get("maxUnavailable", 0) >= 1


def ingress_rules_reaching(r: Rendered, labels: dict, port: int) -> list[dict]:
    rules = []
    for policy in r.all("NetworkPolicy"):
        if "Ingress" in policy["spec"]["policyTypes"] and selects(policy["spec"]["podSelector"], labels):
            for rule in policy["spec"].get("ingress", []):
                ports = [p.get("port") for p in rule.get("ports", [])]
                if not ports or port in ports:
                    rules.append(rule)
    return rules


def test_default_deny(rendered: Rendered):
    assert any(
        p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
        for p in rendered.all("NetworkPolicy")
    )


def test_only_the_edge_reaches_the_grpc_port_and_prometheus_the_metrics(rendered: Rendered):
    server_labels = server_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    edge_labels = edge_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    for port in (envoy_upstream()[1], envoy_upstream("t2i_compat")[1]):  # gRPC, the adapters
        rules = ingress_rules_reaching(rendered, server_labels, port)
        assert rules, f"nothing may reach the service on {port}"
        for rule in rules:
            assert rule.get("from"), "a rule open to every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"} and selects(peer["podSelector"], edge_labels), peer
        edge_egress = [rule for policy in rendered.all("NetworkPolicy") if "Egress" in policy["spec"]["policyTypes"]
                       and selects(policy["spec"]["podSelector"], edge_labels)
                       for rule in policy["spec"].get("egress", []) if port in [p.get("port") for p in rule.get("ports", [])]]
        assert edge_egress, f"the edge may not open connections to {port}"
    metrics = ingress_rules_reaching(rendered, server_labels, 9464)
    assert metrics and all(
        peer.get("namespaceSelector") and peer.get("podSelector") for rule in metrics for peer in rule["from"]
    )


def test_only_the_service_reaches_postgresql_and_redis(rendered: Rendered):
    server_labels = server_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    reaching = set()
    for policy in rendered.all("NetworkPolicy"):
        if "Egress" not in policy["spec"]["policyTypes"]:
            continue
        for rule in policy["spec"].get("egress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            assert ports, f"{policy['metadata']['name']}: an egress rule to every port"
            if ports & {5432, 6379}:
                reaching |= ports & {5432, 6379}
                assert selects(policy["spec"]["podSelector"], server_labels)
                for _, template in pod_templates(rendered):
                    labels = template["metadata"]["labels"]
                    if selects(policy["spec"]["podSelector"], labels):
                        assert labels["app.kubernetes.io/name"] == server_labels["app.kubernetes.io/name"], labels
    assert reaching == {5432, 6379}


def test_dev_and_gpu_differ_only_where_intended(overlays):
    """The overlays are thin: the same objects, apart from what each one is for."""
    names = {o: {(x["kind"], x["metadata"]["name"].rsplit("-", 1)[0] if x["kind"] == "ConfigMap" else
                  x["metadata"]["name"]) for x in overlays[o].objects} for o in overlays}
    assert names["gpu"] - names["dev"] == {("HorizontalPodAutoscaler", "t2i"), ("ServiceMonitor", "t2i"),
                                           ("PersistentVolumeClaim", "t2i-models")}
    assert names["dev"] - names["gpu"] == set()


@pytest.mark.parametrize("path", ["render.sh", "validate.py"])
def test_tools_are_executable(path):
    assert (K8S / path).stat().st_mode & 0o111


def test_render_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(K8S / "render.sh")], check=True)
