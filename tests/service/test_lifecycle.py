"""Cancellation, deadlines, the bounded queue, health, reflection, metrics and SIGTERM."""

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

from testbed.metrics import scrape, value
from testbed.server import ServerProcess

SLOW = GenerateRequest(1, "1girl", "", 512, 512, 150, 5.0, 1, "dpm_2", "normal")  # ~300 evaluations


def evaluations(server) -> float:
    return value(scrape(server.metrics_port), "t2i_unet_evaluations_total", model="1")


def wait_for(condition, timeout=30.0, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return False


def running(server) -> float:
    return value(scrape(server.metrics_port), "t2i_running_requests")


def assert_work_stops(server):
    """No UNet evaluations happen any more: the dropped request left the batch."""
    assert wait_for(lambda: running(server) == 0, timeout=10), "the request is still being denoised"
    before = evaluations(server)
    time.sleep(0.5)
    assert evaluations(server) == before


def test_cancelled_request_is_dropped_from_the_running_batch(server):
    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.TextToImageServiceStub(channel).GenerateImage.future(request_to_pb(SLOW))
        assert wait_for(lambda: running(server) == 1), "the slow request never started"
        started = evaluations(server)
        call.cancel()
        assert call.cancelled()
    assert_work_stops(server)
    assert evaluations(server) - started < 100, "most of the work must not have been done"
    assert wait_for(lambda: server.logged("request dropped"))


def test_deadline_exceeded_request_is_dropped(server, client):
    before = evaluations(server)
    with pytest.raises(ClientError) as error:
        client.generate("1girl", width=512, height=512, steps=150, sampler="dpm_2", timeout=1.0)
    assert error.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert_work_stops(server)
    assert evaluations(server) - before < 150


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
    refused = scrape(server.metrics_port)
    assert value(refused, "t2i_requests_total", method="GenerateImage", code="INVALID_ARGUMENT") - value(
        samples, "t2i_requests_total", method="GenerateImage", code="INVALID_ARGUMENT") == 1


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


def test_full_queue_answers_resource_exhausted_at_once(data_dir):
    with ServerProcess(data_dir, "--no-billing", "--max-batch-size", "1", "--max-queue", "1") as server:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextToImageServiceStub(channel)
            first = stub.GenerateImage.future(request_to_pb(SLOW))
            assert wait_for(lambda: running(server) == 1)
            second = stub.GenerateImage.future(request_to_pb(SLOW))
            assert wait_for(lambda: value(scrape(server.metrics_port), "t2i_queue_depth") == 1)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                stub.GenerateImage(request_to_pb(SLOW), timeout=30)
            assert time.monotonic() - started < 2
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in error.value.details() and "limit 1" in error.value.details()
            assert dict(error.value.trailing_metadata())["retry-after"] == "1"
            first.cancel()
            second.cancel()


def test_health_goes_serving_after_warm_up_and_sigterm_drains_in_flight_work(tmp_path):
    # A fresh data dir: the demo model is built first, so NOT_SERVING lasts long enough to see.
    server = ServerProcess(tmp_path, "--no-billing", "--grace-period", "60")
    try:
        server.wait_listening()
        statuses = {server.health(), server.health(wire.SERVICE)}
        assert statuses == {health_pb2.HealthCheckResponse.NOT_SERVING}
        with Client(server.target) as client:
            with pytest.raises(ClientError) as error:
                client.generate("1girl", width=64, height=64, steps=2)
            assert error.value.code is grpc.StatusCode.UNAVAILABLE
            assert "models are still loading" in error.value.message
            server.wait_serving()
            assert wait_for(lambda: server.logged("serving"))
            order = [e["msg"] for e in server.logs if e.get("msg") in ("model warmed up", "serving")]
            assert order == ["model warmed up", "serving"], "warm-up must finish before the server reports SERVING"

            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.TextToImageServiceStub(channel)
                in_flight = stub.GenerateImage.future(
                    request_to_pb(GenerateRequest(1, "1girl", "", 256, 256, 40, 5.0, 3, "euler", "normal"))
                )
                assert wait_for(lambda: running(server) == 1)
                server.process.send_signal(signal.SIGTERM)
                assert wait_for(lambda: server.health() in (health_pb2.HealthCheckResponse.NOT_SERVING, None), timeout=10)
                with pytest.raises(ClientError) as refused:
                    client.generate("1girl", width=64, height=64, steps=2, timeout=10)
                assert refused.value.code is grpc.StatusCode.UNAVAILABLE
                response = in_flight.result(timeout=120)
                assert len(response.images) == 1 and response.seeds == [3]
        assert server.process.wait(60) == 0
        assert server.logged("draining finished")
    finally:
        server.kill()
