"""A stream that fails after it started ends with an error event carrying what the unary call
would answer, and nothing is charged."""

import asyncio

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.billing.setup import build_billing
from t2i.server.app import Server
from t2i.server.catalog import ModelCatalog
from t2i.settings import ServeSettings

from ..support.faults import Faults, faulty

REQUEST = pb.GenerateImageRequest(model_id=1, prompt="1girl", height=64, width=64, steps=3, cfg_scale=5.0, seed=1,
                                  sampler_name="euler", scheduler="normal")


async def test_a_failure_after_the_stream_started_is_an_error_event_and_free(demo_model, tmp_path):
    settings = ServeSettings(grpc_port=0, metrics_port=-1, data_dir=tmp_path, grace_period=5)
    catalog = ModelCatalog()
    billing = build_billing(settings, catalog)
    server = Server(settings, catalog, [billing], models={1: demo_model})
    record, key = billing.ledger.create_key("unlucky", 100, "standard")
    await server.start()
    try:
        faults = Faults(once=1)
        server.engine.finisher.decode = faulty(server.engine.finisher.decode, faults, "decode")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TextToImageServiceStub(channel)
            metadata = ((wire.API_KEY_HEADER, key),)
            events = [e async for e in stub.GenerateImageStream(REQUEST, metadata=metadata)]
            assert events[0].WhichOneof("event") == "queued" and events[-1].WhichOneof("event") == "error"
            error = events[-1].error
            assert (error.code, error.status) == (500, "INTERNAL") and "image decoding failed" in error.message
            deadline = asyncio.get_running_loop().time() + 60  # the release is queued, not awaited
            while billing.ledger.get_key(record.id).reserved:
                assert asyncio.get_running_loop().time() < deadline, "the reservation was never released"
                await asyncio.sleep(0.05)
            assert billing.ledger.get_key(record.id).balance == 100
            # The same request again succeeds, and is charged once.
            ok = [e async for e in stub.GenerateImageStream(REQUEST, metadata=metadata)][-1].result
            assert ok.stardust_usage > 0 and billing.ledger.get_key(record.id).balance == 100 - ok.stardust_usage
    finally:
        await server.stop(grace=2)
