"""A billed request is checked once: billing checks it to price it (prompts tokenised, the
picture's header read) and the engine runs on that check instead of making its own. In process,
with the real server, billing interceptor and engine, over a real gRPC socket."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc
from PIL import Image

from t2i import wire
from t2i.billing.setup import build_billing, open_ledger
from t2i.engine import pictures
from t2i.engine.engine import AsyncEngine
from t2i.server.app import Server
from t2i.server.catalog import ModelCatalog
from t2i.settings import ServeSettings


def picture() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_billed_request_is_checked_and_its_picture_header_read_once(demo_model, tmp_path, monkeypatch, streamed):
    checks, headers = [], []
    check, read_header = AsyncEngine.check, pictures.read_header
    monkeypatch.setattr(AsyncEngine, "check", lambda self, params: checks.append(params) or check(self, params))
    monkeypatch.setattr(pictures, "read_header", lambda *a, **k: headers.append(a[1]) or read_header(*a, **k))
    settings = ServeSettings(grpc_port=0, metrics_port=-1, compat_port=-1, data_dir=tmp_path)

    async def run() -> tuple[int, int]:
        catalog = ModelCatalog()
        billing = build_billing(settings, catalog)
        server = Server(settings, catalog, [billing], models={1: demo_model})
        await server.start()
        try:
            ledger = open_ledger(tmp_path, None)
            _, key = ledger.create_key("once", balance=10_000, tier=default_tier())
            ledger.close()
            checks.clear(), headers.clear()
            request = pb.GenerateImageRequest(
                model_id=1, prompt="1girl", steps=2, cfg_scale=5, sampler_name="euler", scheduler="normal", seed=1,
                init_image=picture(), denoise=0.5)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.TextToImageServiceStub(channel)
                metadata = ((wire.API_KEY_HEADER, key),)
                if streamed:
                    events = [e async for e in stub.GenerateImageStream(request, metadata=metadata)]
                    assert events[-1].WhichOneof("event") == "result"
                else:
                    response = await stub.GenerateImage(request, metadata=metadata)
                    assert response.stardust_usage > 0
            return len(checks), headers.count("initImage")
        finally:
            await server.stop(grace=5)

    assert asyncio.run(run()) == (1, 1)


def default_tier() -> str:
    from t2i.billing.settings import BillingSettings

    return BillingSettings().default_tier
