"""The edge's own behaviour: timeouts, a missing service, zero values, per-address auth limits,
Ctrl-C, and Envoy's validation of the config."""

import subprocess
import time
from pathlib import Path

import pytest

from t2i.edge.descriptor import write_descriptor
from t2i.edge.envoy_config import (
    CANONICAL, CANONICAL_PLAYGROUND, PLAYGROUND, EdgeSettings, load_canonical, route_timeout_seconds, write,
)
from t2i.edge.launcher import envoy_binary

from testbed.up import UpProcess, free_ports
from .conftest import billing_env
from .test_rest import SMALL, assert_error_shape, headers


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def free_edge(data_dir, tmp_path_factory):
    """No billing, and a 3 s route timeout; the UNet behind `free_edge.gate` (testbed/gate.py)."""
    folder = tmp_path_factory.mktemp("free")
    up = UpProcess(data_dir, folder / "data", "--no-billing", "--route-timeout", "3", gate=folder / "gate").wait_ready()
    yield up
    up.kill()


def test_zero_values_are_printed(free_edge):
    reply = free_edge.request("POST", "/text-to-image/generate", SMALL, headers())
    assert reply.status == 201
    body = reply.json()
    assert body["stardustUsage"] == "0" and body["stardustBalance"] == "0"


def test_a_generation_longer_than_the_route_timeout_is_504(free_edge):
    def logged(msg: str) -> int:
        return len([e for e in free_edge.service_log() if e.get("msg") == msg])

    before = {msg: logged(msg) for msg in ("request cancelled by the client", "request dropped", "image generated")}
    # Held in the UNet (free_edge.gate), the generation cannot end before the route timeout.
    with free_edge.gate:
        reply = free_edge.request("POST", "/text-to-image/generate", SMALL, headers())
        assert_error_shape(reply, 504, "DEADLINE_EXCEEDED", "did not answer within")
        # Envoy gave up on the call, and the service saw it go.
        free_edge.wait_logged("request cancelled by the client", before["request cancelled by the client"] + 1)
    # The abandoned request was dropped by the service, not finished for nobody.
    free_edge.wait_logged("request dropped", before["request dropped"] + 1)
    assert logged("image generated") == before["image generated"]


def test_an_openai_generation_longer_than_the_route_timeout_is_504_and_stopped(free_edge):
    import openai

    def logged(msg: str) -> int:
        return len([e for e in free_edge.service_log() if e.get("msg") == msg])

    before = {msg: logged(msg) for msg in ("request cancelled by the client", "request dropped")}
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{free_edge.http_port}/v1", api_key="unused", max_retries=0)
    with free_edge.gate:
        with pytest.raises(openai.InternalServerError) as raised:
            api.images.generate(prompt="1girl", size="64x64", extra_body={"steps": 2})
        assert raised.value.status_code == 504 and raised.value.type == "server_error"
        assert "did not answer within the edge's request timeout" in raised.value.message
        # The edge dropped the adapter's connection; the adapter cancelled its gRPC call.
        free_edge.wait_logged("request cancelled by the client", before["request cancelled by the client"] + 1)
    free_edge.wait_logged("request dropped", before["request dropped"] + 1)


def test_ctrl_c_stops_the_service_and_envoy(data_dir, tmp_path):
    up = UpProcess(data_dir, tmp_path / "data", "--no-billing").wait_ready()
    kids = children(up.process.pid)
    assert len(kids) == 2, "t2i up runs the service and Envoy"
    assert up.interrupt() == 0
    assert not any(alive(pid) for pid in kids)
    assert "Traceback" not in up.output()


def test_failed_authentications_are_limited_per_client_address(data_dir, tmp_path):
    config = "auth_failures_per_minute: 1\nauth_failure_burst: 3\n"
    up = UpProcess(data_dir, tmp_path / "data", env=billing_env(tmp_path, config)).wait_ready()
    try:
        bad = headers("ilx_wrong-000000000000000000000000000000")
        statuses = [up.request("POST", "/text-to-image/generate", SMALL, bad).status for _ in range(3)]
        assert statuses == [401, 401, 401]
        # The edge passes the client's address on, so the fourth guess from it is refused, and
        # so is even a valid key from the same address for a while.
        reply = up.request("POST", "/text-to-image/generate", SMALL, bad)
        assert_error_shape(reply, 429, "RESOURCE_EXHAUSTED", "too many failed authentications")
        assert int(reply.headers["retry-after"]) >= 1
        assert up.request("POST", "/text-to-image/generate", SMALL, headers(up.demo_key)).status == 429
        # A forged x-forwarded-for does not get around it: Envoy appends the real peer.
        forged = up.request("POST", "/text-to-image/generate", SMALL, headers(up.demo_key, **{"x-forwarded-for": "203.0.113.9"}))
        assert forged.status == 429
    finally:
        up.kill()


def test_no_reachable_service_is_503(tmp_path):
    http_port, admin_port, dead_port, dead_compat_port = free_ports(4)
    config = write(
        EdgeSettings(http_port=http_port, admin_port=admin_port, upstreams=[("127.0.0.1", dead_port)],
                     compat_upstreams=[("127.0.0.1", dead_compat_port)], descriptor=write_descriptor(tmp_path / "d.pb")),
        tmp_path / "envoy.yaml",
    )
    envoy = subprocess.Popen([envoy_binary(), "-c", str(config), "--log-level", "error", "--disable-hot-restart"], stdout=subprocess.DEVNULL)
    try:
        import http.client

        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
                connection.request("POST", "/text-to-image/generate", body=b"{}", headers={"content-type": "application/json"})
                response = connection.getresponse()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        body = response.read()
        import json

        error = json.loads(body)["error"]
        assert response.status == 503 and error["status"] == "UNAVAILABLE" and error["code"] == 503
        assert error["requestId"] == response.getheader("x-request-id")
        # The adapters' paths answer in their API's shape: OpenAI's, which its SDK reads.
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        connection.request("GET", "/v1/models", headers={"authorization": "Bearer ilx_x"})
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 503 and response.getheader("x-request-id")
        assert error == {"message": "no healthy image service replica is available; retry later", "type": "server_error",
                         "param": None, "code": None}
    finally:
        envoy.terminate()
        envoy.wait(30)


def test_envoy_validates_the_config_as_deployed_and_as_run_locally(tmp_path):
    # As deployed: the canonical file, only the descriptor's and the playground's paths (where
    # Kubernetes mounts them) pointed at local copies.
    canonical = CANONICAL.read_text().replace(f"{CANONICAL_PLAYGROUND}/", f"{PLAYGROUND}/")
    descriptor = write_descriptor(tmp_path / "text_to_image.pb")
    as_deployed = tmp_path / "deployed.yaml"
    as_deployed.write_text(canonical.replace("/etc/envoy/text_to_image.pb", str(descriptor)))
    assert canonical.count("/etc/envoy/text_to_image.pb") == 2  # the comment and the transcoder
    local = write(EdgeSettings(http_port=18999, admin_port=19999, descriptor=descriptor), tmp_path / "local.yaml")
    for config in (as_deployed, local):
        result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True)
        assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stderr[-2000:]
    broken = tmp_path / "broken.yaml"
    broken.write_text(canonical.replace("/etc/envoy/text_to_image.pb", str(tmp_path / "missing.pb")))
    assert subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(broken)], capture_output=True).returncode != 0


def test_the_route_timeout_is_sized_for_long_generations():
    assert route_timeout_seconds(load_canonical()) >= 300


def test_the_launchers_route_timeout_leaves_the_job_event_stream_unbounded():
    """`t2i up --route-timeout` bounds generations, not GET /jobs/{id}/events, which lasts as long
    as its job (a long queue included)."""
    from t2i.edge.envoy_config import COMPAT_CLUSTER, connection_manager, render, routes_to

    config = render(EdgeSettings(route_timeout=3.0))
    assert {route.get("timeout") for route in routes_to(config, COMPAT_CLUSTER)} == {"3s", "0s"}
    (events,) = [route for host in connection_manager(config)["route_config"]["virtual_hosts"] for route in host["routes"]
                 if route["match"].get("safe_regex", {}).get("regex") == "/jobs/[^/]+/events/?"]
    assert events["route"]["timeout"] == "0s"
