"""An engine that breaks is visible: callers get INTERNAL and are not charged, health goes
NOT_SERVING, and the serving process exits non-zero once the engine gives up."""

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.billing.setup import build_billing
from t2i.server.app import EXIT_ENGINE_FAILED, Server, run_until_signal
from t2i.server.catalog import ModelCatalog
from t2i.settings import EngineConfig, ServeSettings

from ..support.faults import Faults, with_faulty_unet

REQUEST = pb.GenerateImageRequest(model_id=1, prompt="1girl", height=64, width=64, steps=3, cfg_scale=5.0, seed=1,
                                  sampler_name="euler", scheduler="normal")


async def health_of(channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=wire.SERVICE))
    return response.status


async def test_a_broken_device_takes_the_replica_out_and_ends_the_process(demo_model, tmp_path):
    faults = Faults()  # armed after the warm-up
    settings = ServeSettings(grpc_port=0, metrics_port=-1, data_dir=tmp_path, grace_period=5,
                             engine=EngineConfig(max_consecutive_failures=2, max_batch_size=1))
    catalog = ModelCatalog()
    billing = build_billing(settings, catalog)
    server = Server(settings, catalog, [billing], models={1: with_faulty_unet(demo_model, faults)})
    record, key = billing.ledger.create_key("victim", 1000, "standard")
    running = asyncio.ensure_future(run_until_signal(server))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for _ in range(600):
            if server.engine is not None and await health_of(channel) == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        assert await health_of(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.TextToImageServiceStub(channel)
        ok = await stub.GenerateImage(REQUEST, metadata=((wire.API_KEY_HEADER, key),))
        charged = ok.stardust_usage
        assert charged > 0 and ok.stardust_balance == 1000 - charged

        faults.always = True
        codes = []
        for seed in range(2, 5):
            request = pb.GenerateImageRequest()
            request.CopyFrom(REQUEST)
            request.seed = seed
            try:
                await stub.GenerateImage(request, metadata=((wire.API_KEY_HEADER, key),))
            except grpc.aio.AioRpcError as error:
                codes.append((error.code(), error.details()))
            if seed == 3:  # the second failure in a row: the engine has given up
                try:
                    seen = await health_of(channel)
                except grpc.aio.AioRpcError:
                    seen = None  # already shutting down
                assert seen in (health_pb2.HealthCheckResponse.NOT_SERVING, None)
        assert [c for c, _ in codes[:2]] == [grpc.StatusCode.INTERNAL] * 2, codes
        # Once the engine gave up, the replica refuses at once (or is already gone).
        assert codes[2][0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), codes
        status = await asyncio.wait_for(running, timeout=60)
    assert status == EXIT_ENGINE_FAILED
    assert faults.raised == 2
    # Nobody paid for the failures and nothing is left reserved.
    after = billing.ledger.get_key(record.id)
    assert (after.balance, after.reserved) == (1000 - charged, 0)
    assert billing.ledger.verify() == []
