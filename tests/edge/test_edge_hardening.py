"""REST details a careless or hostile caller finds: trailing slashes, other content types and
query strings still mean the documented call; an empty body is a 400 naming what is missing;
headers of any size are 431; odd request ids are replaced; keys never reach the access log;
SIGTERM lets in-flight work finish; the service port is not reachable past the edge."""

import ipaddress
import json
import signal
import subprocess
import threading
import time

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from testbed.metrics import scrape, value
from testbed.up import UpProcess

from .conftest import billing_env
from .test_rest import SMALL, assert_error_shape, headers

PRICE = 1  # what SMALL costs on the demo model


def balance(ledger, key) -> int:
    return ledger.find_key(key).balance


def test_every_spelling_of_the_generate_call_is_created_and_charged_once(edge, ledger):
    for path, content_type in (("/text-to-image/generate", "application/json"),
                               ("/text-to-image/generate/", "application/json"),
                               ("/text-to-image/generate", "application/grpc-web")):
        before = balance(ledger, edge.demo_key)
        reply = edge.request("POST", path, SMALL, {**headers(edge.demo_key), "Content-Type": content_type})
        assert reply.status == 201, (path, content_type, reply.body[:200])
        assert int(reply.json()["stardustUsage"]) == PRICE
        assert balance(ledger, edge.demo_key) == before - PRICE


def test_query_parameters_never_override_the_body(edge, ledger):
    before = balance(ledger, edge.demo_key)
    # Were they read, modelId 99 would be a 404 and 150 steps would cost more.
    reply = edge.request("POST", "/text-to-image/generate?modelId=99&steps=150&width=2048&samplerName=dpm_2",
                         SMALL, headers(edge.demo_key))
    assert reply.status == 201, reply.body[:200]
    assert int(reply.json()["stardustUsage"]) == PRICE and balance(ledger, edge.demo_key) == before - PRICE


def test_an_empty_or_partial_body_is_a_400_naming_the_missing_fields(edge, ledger):
    before = balance(ledger, edge.demo_key)
    empty = edge.request("POST", "/text-to-image/generate", None, headers(edge.demo_key))
    assert_error_shape(empty, 400, "INVALID_ARGUMENT",
                       "missing required fields: modelId, prompt, height, width, steps, samplerName, scheduler")
    partial = edge.request("POST", "/text-to-image/generate", {"modelId": 1, "prompt": "x", "width": 64, "height": 64},
                           headers(edge.demo_key))
    assert_error_shape(partial, 400, "INVALID_ARGUMENT", "missing required fields: steps, samplerName, scheduler")
    assert balance(ledger, edge.demo_key) == before


def test_header_blocks_over_the_limit_are_431_for_every_size_and_protocol(edge):
    assert edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key, **{"x-pad": "a" * 8000})).status == 201
    for size in (20_000, 70_000, 200_000):
        reply = edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key, **{"x-pad": "a" * size}))
        assert reply.status == 431, (size, reply.status)
        error = reply.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT" and error["code"] == 431
        assert "request headers too large" in error["message"] or "Too Large" in error["message"]
        assert "retry-after" not in reply.headers
    # Native gRPC through the same listener: INVALID_ARGUMENT, never RESOURCE_EXHAUSTED (retried).
    options = [("grpc.max_metadata_size", 1 << 20)]
    for size in (20_000, 200_000):
        with grpc.insecure_channel(f"127.0.0.1:{edge.http_port}", options=options) as channel:
            stub = pb_grpc.TextToImageServiceStub(channel)
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=(("x-illustrious-api-key", edge.demo_key), ("x-pad", "a" * size)),
                                timeout=30)
                raise AssertionError("a header block over the limit was let through")
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (size, error.code(), error.details())
                assert "request headers too large" in error.details()


def test_request_ids_are_kept_when_sane_and_replaced_when_not(edge):
    kept = edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key, **{"x-request-id": "client-id.42"}))
    assert kept.status == 201 and kept.headers["x-request-id"] == "client-id.42"
    for odd in ("r" * 300, "with spaces and <brackets>"):
        reply = edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key, **{"x-request-id": odd}))
        assert reply.status == 201, reply.body[:200]
        assert reply.headers["x-request-id"] != odd and 16 <= len(reply.headers["x-request-id"]) <= 128
    refused = edge.request("POST", "/text-to-image/generate", {**SMALL, "width": 7}, headers(edge.demo_key, **{"x-request-id": "r" * 300}))
    error = assert_error_shape(refused, 400, "INVALID_ARGUMENT")
    assert len(error["requestId"]) <= 128


def test_the_access_log_never_holds_a_query_string(edge):
    secret = "ilx_sent-in-a-query-string-by-mistake-0000000"
    edge.request("GET", f"/model/list?x-illustrious-api-key={secret}&other=1", headers=headers(edge.demo_key))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [e for e in edge.access_log() if str(e.get("path", "")).startswith("/model/list")]
        if entries:
            break
        time.sleep(0.2)
    assert entries and all(e["path"] == "/model/list" for e in entries), entries[-3:]
    assert secret not in edge.output() and secret not in json.dumps(edge.access_log())


def listening(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses a TCP port is bound to (IPv4-mapped IPv6 ones as IPv4)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in filter(str.strip, out.splitlines()):
        address = ipaddress.ip_address(line.split()[3].rsplit(":", 1)[0].strip("[]"))
        found.add(getattr(address, "ipv4_mapped", None) or address)
    return found


def test_the_service_and_its_metrics_listen_on_loopback_only(edge):
    for port in (edge.grpc_port, edge.metrics_port):
        addresses = listening(port)
        assert addresses and all(a.is_loopback for a in addresses), (port, addresses)


def test_sigterm_lets_in_flight_requests_finish_before_anything_stops(data_dir, tmp_path):
    up = UpProcess(data_dir, tmp_path / "data", env=billing_env(tmp_path), gate=tmp_path / "gate").wait_ready()
    try:
        body = {**SMALL, "width": 128, "height": 128, "steps": 30}
        replies: list = []

        def call(seed: int) -> None:
            replies.append(up.request("POST", "/text-to-image/generate", {**body, "seed": seed}, headers(up.demo_key), timeout=300))

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(8)]
        with up.gate:  # none can finish before the SIGTERM is being handled
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60  # only guards against a hang
            while value(scrape(up.metrics_port), "t2i_inflight_requests") < 8:
                assert time.monotonic() < deadline, "the eight requests never reached the service"
                time.sleep(0.05)
            up.process.send_signal(signal.SIGTERM)  # to `t2i up` alone, as an orchestrator sends it
            up.wait_logged("shutting down")  # the service drains: now let the work go on
        for thread in threads:
            thread.join(300)
        assert [r.status for r in replies] == [201] * 8, [r.body[:120] for r in replies]
        assert up.process.wait(120) == 0
        order = [e["msg"] for e in up.service_log() if e.get("msg") in ("shutting down", "draining finished", "stopped")]
        assert order == ["shutting down", "draining finished", "stopped"], order
    finally:
        up.kill()
