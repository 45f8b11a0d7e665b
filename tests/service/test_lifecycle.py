"""Cancellation, deadlines, the bounded queue, health, reflection, metrics and SIGTERM.

Requests that must still be running are held at their first UNet forward by the server's gate
(testbed/gate.py), never assumed to be slow; what must stop is counted, not slept on.
"""

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.client import Client, ClientError
from t2i.domain import GenerateRequest
from t2i.server.convert import request_to_pb

from testbed.gate import FileGate
from testbed.metrics import scrape, value
from testbed.server import ServerProcess

# 300 evaluations: far more than a test lets through the gate.
HELD = GenerateRequest(1, "1girl", "", 64, 64, 150, 5.0, 1, "dpm_2", "normal")
CANCELLED = "request cancelled by the client"  # logged once the engine has the abort queued


def evaluations(server) -> float:
    return value(scrape(server.metrics_port), "t2i_unet_evaluations_total", model="1")


def wait_for(condition, timeout=60.0, interval=0.05):
    """Poll until `condition()` holds; the timeout only guards against a hang."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return False


def running(server) -> float:
    return value(scrape(server.metrics_port), "t2i_running_requests")


def assert_work_stopped(server, drops: int, passed: int, at_most: int) -> None:
    """Once the engine has dropped the request (a positive event: its log line), nothing runs
    and nothing waits at the gate, and at most `at_most` forwards went through it since
    `passed`: the request left the batch instead of finishing its 300 evaluations."""
    server.wait_logged("request dropped", drops + 1)
    assert wait_for(lambda: running(server) == 0), "the request is still being denoised"
    state = server.gate.state()
    assert state["held"] == 0 and state["passed"] - passed <= at_most, state


def test_cancelled_request_is_dropped_from_the_running_batch(server):
    drops, cancels = len(server.logged("request dropped")), len(server.logged(CANCELLED))
    with server.gate, grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.TextToImageServiceStub(channel).GenerateImage.future(request_to_pb(HELD))
        server.gate.wait_held(rows=2)  # its first evaluation is in the UNet, held
        passed, held_at = server.gate.state()["passed"], evaluations(server)
        call.cancel()
        assert call.cancelled()
        server.wait_logged(CANCELLED, cancels + 1)  # the engine has the abort before the forward ends
    # The gate is open again: the held forward ends, and the request goes before its next one.
    assert_work_stopped(server, drops, passed, at_most=1)
    assert evaluations(server) == held_at + 1


def test_deadline_exceeded_request_is_dropped(server, client):
    drops, passed = len(server.logged("request dropped")), server.gate.state()["passed"]
    with server.gate, pytest.raises(ClientError) as error:
        # Held at the gate, it cannot finish within any deadline; it may pass its deadline
        # before or during its first forward, and either way must go.
        client.generate("1girl", width=64, height=64, steps=150, sampler="dpm_2", timeout=1.0)
    assert error.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert_work_stopped(server, drops, passed, at_most=1)


def test_metrics_cover_requests_stages_batches_and_model(server, client):
    before = scrape(server.metrics_port)
    client.generate("1girl", width=64, height=64, steps=3)
    samples = scrape(server.metrics_port)

    def grown(name, **labels):
        return value(samples, name, **labels) - value(before, name, **labels)

    assert grown("t2i_requests_total", method="GenerateImage", code="OK") == 1
    for stage in ("queue_wait", "text_encode", "denoise", "vae_decode", "png_encode"):
        assert grown("t2i_stage_seconds_count", stage=stage) == 1, stage
    assert grown("t2i_batch_size_count", model="1") == 3  # one UNet forward per euler step
    assert grown("t2i_unet_evaluations_total", model="1") == 3
    assert ("t2i_queue_depth", ()) in samples and ("t2i_inflight_requests", ()) in samples
    assert value(samples, "t2i_model_load_seconds", model="1") > 0
    info = [labels for (name, labels), v in samples.items() if name == "t2i_model_info" and v == 1]
    assert any(dict(labels)["attention"] == "sdpa" and dict(labels)["device"] == "cpu" for labels in info)
    with pytest.raises(ClientError):
        client.generate("", width=64, height=64, steps=3)

    def refused() -> float:
        return value(scrape(server.metrics_port), "t2i_requests_total", method="GenerateImage", code="INVALID_ARGUMENT") - value(
            samples, "t2i_requests_total", method="GenerateImage", code="INVALID_ARGUMENT")

    # Counted once the refusal has been sent, so it may reach the client first: poll.
    assert wait_for(lambda: refused() >= 1) and refused() == 1


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"illustrious.texttoimage.v1.TextToImageService", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("illustrious.texttoimage.v1.TextToImageService")
        assert descriptor.package == "illustrious.texttoimage.v1"


def test_health_watch_streams_the_serving_status(server):
    """Watch is a server stream of the health service (Kubernetes gRPC probes and load balancers
    use it): the serving interceptors must leave it working, not only Check."""
    from grpc_health.v1 import health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=wire.SERVICE), timeout=10)
        first = next(stream)
        stream.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_full_queue_answers_resource_exhausted_at_once(data_dir, tmp_path):
    gated = ServerProcess(data_dir, "--no-billing", "--max-batch-size", "1", "--max-queue", "1", gate=tmp_path / "gate")
    with gated as server:
        server.wait_serving()
        with server.gate, grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextToImageServiceStub(channel)
            first = stub.GenerateImage.future(request_to_pb(HELD))
            server.gate.wait_held(rows=2)
            second = stub.GenerateImage.future(request_to_pb(HELD))
            # Accepted and waiting (the queue-depth gauge is updated between forwards, and the
            # forward is held): two requests in flight.
            assert wait_for(lambda: value(scrape(server.metrics_port), "t2i_inflight_requests") == 2)
            with pytest.raises(grpc.RpcError) as error:
                stub.GenerateImage(request_to_pb(HELD), timeout=60)  # the timeout only guards against a hang
            # At once: answered while the first request is still held in its first forward and
            # the second still waits, so the refusal did not wait for room.
            assert server.gate.state()["held"] == 1 and not first.done() and not second.done()
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in error.value.details() and "limit 1" in error.value.details()
            assert dict(error.value.trailing_metadata())["retry-after"] == "1"
            first.cancel()
            second.cancel()


def test_health_goes_serving_after_warm_up_and_sigterm_drains_in_flight_work(tmp_path):
    # The gate is closed before the server starts: its warm-up is held, so NOT_SERVING lasts
    # until the test opens it, however fast the machine builds and loads the demo model.
    gate = FileGate(tmp_path / "gate")
    gate.close()
    server = ServerProcess(tmp_path / "data", "--no-billing", "--grace-period", "60", gate=gate.folder)
    try:
        server.wait_listening()
        gate.wait_for(lambda counts: counts["held"] == 1, timeout=180, what="the warm-up held")
        statuses = {server.health(), server.health(wire.SERVICE)}
        assert statuses == {health_pb2.HealthCheckResponse.NOT_SERVING}
        with Client(server.target) as client:
            with pytest.raises(ClientError) as error:
                client.generate("1girl", width=64, height=64, steps=2)
            assert error.value.code is grpc.StatusCode.UNAVAILABLE
            assert "models are still loading" in error.value.message
            gate.open()
            server.wait_serving()
            assert wait_for(lambda: server.logged("serving"))
            order = [e["msg"] for e in server.logs if e.get("msg") in ("model warmed up", "serving")]
            assert order == ["model warmed up", "serving"], "warm-up must finish before the server reports SERVING"

            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.TextToImageServiceStub(channel)
                with gate:
                    in_flight = stub.GenerateImage.future(
                        request_to_pb(GenerateRequest(1, "1girl", "", 64, 64, 40, 5.0, 3, "euler", "normal"))
                    )
                    gate.wait_held(rows=2)
                    server.process.send_signal(signal.SIGTERM)
                    assert wait_for(lambda: server.health() in (health_pb2.HealthCheckResponse.NOT_SERVING, None))
                    with pytest.raises(ClientError) as refused:
                        client.generate("1girl", width=64, height=64, steps=2, timeout=60)
                    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
                    # Still held: the server drains; it neither dropped nor finished the request.
                    assert not in_flight.done() and server.process.poll() is None
                response = in_flight.result(timeout=120)
                assert len(response.images) == 1 and response.seeds == [3]
        assert server.process.wait(60) == 0
        assert server.logged("draining finished")
    finally:
        server.kill()
