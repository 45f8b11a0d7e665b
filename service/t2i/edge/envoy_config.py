"""A runnable copy of the canonical edge/envoy.yaml for one machine.

The canonical file is what Kubernetes deploys (its upstreams are the headless Service
t2i-grpc.t2i.svc.cluster.local, port 50051 for gRPC and 8090 for the adapters, its descriptor
/etc/envoy/text_to_image.pb). Running locally changes only addresses, ports, the descriptor
path, the playground's file paths and the route timeouts, structurally; each replaced value must be found where it is expected, so an edit
of edge/envoy.yaml that breaks the local launcher fails loudly instead of silently running
something else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parents[3]
CANONICAL = REPOSITORY / "edge" / "envoy.yaml"
CANONICAL_DESCRIPTOR = "/etc/envoy/text_to_image.pb"
CLUSTER = "t2i_grpc"
COMPAT_CLUSTER = "t2i_compat"  # the adapters' HTTP port (t2i.compat)
# The playground page (GET /, its script and style sheet): direct_response bodies read from
# /etc/envoy/playground/ where Kubernetes mounts edge/playground/, from the repository locally.
PLAYGROUND = REPOSITORY / "edge" / "playground"
CANONICAL_PLAYGROUND = "/etc/envoy/playground"
PLAYGROUND_FILES = ("index.html", "playground.js", "playground.css")


@dataclass
class EdgeSettings:
    http_port: int = 8080
    host: str = "127.0.0.1"
    admin_port: int = 9901
    upstreams: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 50051)])
    descriptor: Path = Path(CANONICAL_DESCRIPTOR)
    route_timeout: float = 300.0  # seconds: the longest generation the edge waits for
    playground: Path = PLAYGROUND  # the folder holding PLAYGROUND_FILES
    compat_upstreams: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 8090)])


def load_canonical(path: Path = CANONICAL) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"the Envoy config {path} is missing (it ships in the repository's edge/ folder)")
    return yaml.safe_load(path.read_text())


def connection_manager(config: dict) -> dict:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    return manager["typed_config"]


def http_filter(config: dict, name: str) -> dict:
    for entry in connection_manager(config)["http_filters"]:
        if entry["name"] == name:
            return entry["typed_config"]
    raise KeyError(f"edge/envoy.yaml has no HTTP filter {name}")


def generate_route(config: dict) -> dict:
    for virtual_host in connection_manager(config)["route_config"]["virtual_hosts"]:
        for route in virtual_host["routes"]:
            if route.get("route", {}).get("cluster") == CLUSTER:
                return route["route"]
    raise KeyError(f"edge/envoy.yaml has no route to cluster {CLUSTER}")


def routes_to(config: dict, cluster: str) -> list[dict]:
    """The route actions that send requests to `cluster`, in route order."""
    return [
        route["route"]
        for virtual_host in connection_manager(config)["route_config"]["virtual_hosts"]
        for route in virtual_host["routes"]
        if route.get("route", {}).get("cluster") == cluster
    ]


def file_bodies(config: dict) -> list[dict]:
    """The direct_response bodies read from a file (the playground's), in route order."""
    return [
        route["direct_response"]["body"]
        for virtual_host in connection_manager(config)["route_config"]["virtual_hosts"]
        for route in virtual_host["routes"]
        if "filename" in route.get("direct_response", {}).get("body", {})
    ]


def route_timeout_seconds(config: dict) -> float:
    return _seconds(generate_route(config)["timeout"])


def render(settings: EdgeSettings, canonical: dict | None = None) -> dict:
    config = copy.deepcopy(canonical if canonical is not None else load_canonical())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=settings.admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address=settings.host, port_value=settings.http_port)

    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    _expect(transcoder["proto_descriptor"], CANONICAL_DESCRIPTOR, "the transcoder's descriptor path")
    transcoder["proto_descriptor"] = str(settings.descriptor)

    bodies = file_bodies(config)
    expected = sorted(f"{CANONICAL_PLAYGROUND}/{name}" for name in PLAYGROUND_FILES)
    _expect(sorted(body["filename"] for body in bodies), expected, "the files the routes serve")
    for body in bodies:
        body["filename"] = str(Path(settings.playground).resolve() / body["filename"].rsplit("/", 1)[1])

    compat_routes = routes_to(config, COMPAT_CLUSTER)
    if not compat_routes:
        raise KeyError(f"edge/envoy.yaml has no route to cluster {COMPAT_CLUSTER}")
    for route in (generate_route(config), *compat_routes):
        if _seconds(route.get("timeout", "15s")) == 0:
            continue  # no limit by design: GET /jobs/{id}/events lasts as long as its job
        route["timeout"] = f"{settings.route_timeout:g}s"
        if _seconds(route.get("idle_timeout", "0s")) < settings.route_timeout:
            route["idle_timeout"] = f"{settings.route_timeout:g}s"

    for name, upstreams in ((CLUSTER, settings.upstreams), (COMPAT_CLUSTER, settings.compat_upstreams)):
        (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
        # Local upstreams are IP addresses: no DNS to resolve.
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
        cluster["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                for host, port in upstreams
            ]}],
        }
    return config


def write(settings: EdgeSettings, path: Path, canonical: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render(settings, canonical), sort_keys=False))
    return path


def _expect(actual, expected, what: str) -> None:
    if actual != expected:
        raise ValueError(f"edge/envoy.yaml changed: expected {what} to be {expected!r}, found {actual!r}")


def _seconds(duration: str) -> float:
    if not duration.endswith("s"):
        raise ValueError(f"unsupported duration {duration!r} (expected seconds, like '300s')")
    return float(duration[:-1])
