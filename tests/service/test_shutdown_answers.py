"""What callers hear when the server shuts down: a generation still running when the grace
period ends is answered UNAVAILABLE and not charged (a stream ends with that error event instead
of just stopping), and a generation asked for during the shutdown is UNAVAILABLE, even for a
key whose concurrency cap the running work fills (not RESOURCE_EXHAUSTED)."""

import asyncio
import contextlib
import dataclasses
import threading
import time

import grpc
import pytest
import torch
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.billing.setup import build_billing
from t2i.server.app import Server
from t2i.server.catalog import ModelCatalog
from t2i.settings import ServeSettings

REQUEST = pb.GenerateImageRequest(model_id=1, prompt="1girl", height=64, width=64, steps=20, cfg_scale=5.0, seed=1,
                                  sampler_name="euler", scheduler="normal")
ONE_AT_A_TIME = "default_tier: single\ntiers:\n  single: {requests_per_minute: 6000, burst: 1000, max_concurrent: 1}\n"


class HeldUNet(torch.nn.Module):
    """The real UNet, except that once `armed`, every forward waits for `release`: a
    generation that is certainly still running when the grace period ends."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.armed, self.holding, self.release = threading.Event(), threading.Event(), threading.Event()

    def forward(self, *args, **kwargs):
        if self.armed.is_set():
            self.holding.set()
            self.release.wait(120)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@contextlib.asynccontextmanager
async def shutting_down(demo_model, tmp_path, grace: float):
    """A billed server whose one generation is held in the UNet, then shutting down with
    `grace`: yields (stub, metadata of a key with max_concurrent 1, its record, the ledger, the
    stream of the held generation)."""
    (tmp_path / "billing.yaml").write_text(ONE_AT_A_TIME)
    settings = ServeSettings(grpc_port=0, metrics_port=-1, data_dir=tmp_path, grace_period=grace,
                             billing_config=tmp_path / "billing.yaml")
    unet = HeldUNet(demo_model.unet)
    catalog = ModelCatalog()
    billing = build_billing(settings, catalog)
    server = Server(settings, catalog, [billing], models={1: dataclasses.replace(demo_model, unet=unet)})
    record, key = billing.ledger.create_key("at its cap", 100, "single")
    await server.start()
    stopping = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TextToImageServiceStub(channel)
            metadata = ((wire.API_KEY_HEADER, key),)
            unet.armed.set()
            stream = stub.GenerateImageStream(REQUEST, metadata=metadata)
            assert (await stream.read()).WhichOneof("event") == "queued"
            assert await asyncio.to_thread(unet.holding.wait, 60), "the generation never reached the UNet"
            stopping = asyncio.ensure_future(server.stop())  # what SIGTERM does
            deadline = time.monotonic() + 30
            while server.engine.admission_error() is None:
                assert time.monotonic() < deadline, "the shutdown never began"
                await asyncio.sleep(0.01)
            yield stub, metadata, record, billing.ledger, stream
    finally:
        unet.release.set()
        await (stopping if stopping is not None else server.stop(grace=1))


async def rest_of(stream) -> list[pb.GenerateImageEvent]:
    events = []
    while (event := await stream.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def test_a_stream_still_running_after_the_grace_period_ends_with_an_unavailable_event(demo_model, tmp_path):
    async with shutting_down(demo_model, tmp_path, grace=0.5) as (_, _, record, ledger, stream):
        events = await asyncio.wait_for(rest_of(stream), 30)
        assert events and events[-1].WhichOneof("event") == "error", [e.WhichOneof("event") for e in events]
        error = events[-1].error
        assert (error.code, error.status) == (503, "UNAVAILABLE")
        assert "shutting down" in error.message and "not charged" in error.message, error.message
        assert await stream.code() is grpc.StatusCode.OK
        deadline = time.monotonic() + 10
        while ledger.get_key(record.id).reserved:  # the release is queued, not awaited
            assert time.monotonic() < deadline, "the reservation was never released"
            await asyncio.sleep(0.05)
        assert ledger.get_key(record.id).balance == 100


@pytest.mark.parametrize("call", ["unary", "stream"])
async def test_a_generation_asked_for_during_shutdown_is_unavailable_not_rate_limited(demo_model, tmp_path, call):
    async with shutting_down(demo_model, tmp_path, grace=60) as (stub, metadata, record, ledger, _):
        reserved = ledger.get_key(record.id).reserved  # the held generation's
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if call == "unary":
                await stub.GenerateImage(REQUEST, metadata=metadata, timeout=30)
            else:
                await rest_of(stub.GenerateImageStream(REQUEST, metadata=metadata, timeout=30))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, (refused.value.code(), refused.value.details())
        assert "shutting down" in refused.value.details()
        assert ledger.get_key(record.id).reserved == reserved > 0  # nothing was reserved for it
