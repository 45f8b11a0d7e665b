"""What a caller is told when its key is revoked mid-request matches what happened to its money:
"not charged" only when nothing was charged; a revocation that comes after the charge was
recorded but before the image went out refunds that charge and says so; a stream whose result was delivered and charged keeps
that result as its one answer, with no error event after it."""

import asyncio
import contextlib

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.billing.setup import build_billing
from t2i.server.app import Server
from t2i.server.catalog import ModelCatalog
from t2i.server.servicer import TextToImageServicer
from t2i.settings import ServeSettings

REQUEST = pb.GenerateImageRequest(model_id=1, prompt="1girl", height=64, width=64, steps=2, cfg_scale=5.0, seed=1,
                                  sampler_name="euler", scheduler="normal")
BALANCE = 100


@contextlib.asynccontextmanager
async def billed_server(demo_model, tmp_path):
    (tmp_path / "billing.yaml").write_text("revocation_poll_seconds: 0.05\n")
    settings = ServeSettings(grpc_port=0, metrics_port=-1, data_dir=tmp_path, grace_period=2,
                             billing_config=tmp_path / "billing.yaml")
    catalog = ModelCatalog()
    billing = build_billing(settings, catalog)
    server = Server(settings, catalog, [billing], models={1: demo_model})
    record, key = billing.ledger.create_key("soon revoked", BALANCE, "standard")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.TextToImageServiceStub(channel), ((wire.API_KEY_HEADER, key),), record, billing
    finally:
        await server.stop(grace=2)


def hold_after_the_charge(billing) -> tuple[asyncio.Event, asyncio.Event]:
    """Each commit is recorded, then waits until `proceed` is set: a revocation in between comes
    after the charge was made but before the call could answer."""
    recorded, proceed = asyncio.Event(), asyncio.Event()
    commit = billing._money.commit

    async def held(op):
        balance = await commit(op)
        recorded.set()
        await proceed.wait()
        return balance

    billing._money.commit = held
    return recorded, proceed


async def settled_balance(billing, record) -> int:
    """The key's balance once nothing is reserved any more (releases are queued, not awaited)."""
    for _ in range(200):
        key = billing.ledger.get_key(record.id)
        if key.reserved == 0:
            return key.balance
        await asyncio.sleep(0.05)
    raise AssertionError(f"still reserved: {key.reserved}")


async def test_a_revocation_while_the_charge_is_recorded_refunds_it(demo_model, tmp_path):
    async with billed_server(demo_model, tmp_path) as (stub, metadata, record, billing):
        recorded, proceed = hold_after_the_charge(billing)
        call = asyncio.ensure_future(stub.GenerateImage(REQUEST, metadata=metadata, timeout=60))
        await asyncio.wait_for(recorded.wait(), 60)
        assert billing.ledger.get_key(record.id).balance < BALANCE  # the charge is recorded ...
        billing.ledger.revoke(record.id)
        try:
            refused = await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 30)
        finally:
            proceed.set()
        (error,) = refused
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() is grpc.StatusCode.PERMISSION_DENIED, error
        assert "not delivered" in error.details() and "refunded" in error.details(), error.details()
        # ... and, the image not delivered, given back once, as a credit naming the reservation.
        for _ in range(200):
            if billing.ledger.get_key(record.id).balance == BALANCE:
                break
            await asyncio.sleep(0.05)
        _, entries, totals = billing.ledger.usage(record.id)
        assert billing.ledger.get_key(record.id).balance == BALANCE, entries
        (commit,) = [e for e in entries if e["kind"] == "commit"]
        refunds = [e for e in entries if e["kind"] == "credit" and e["reservation_id"] is not None]
        assert [(e["reservation_id"], e["amount"]) for e in refunds] == [(commit["reservation_id"], commit["amount"])]
        assert billing.ledger.verify() == []


async def test_a_stream_revoked_after_its_result_was_charged_ends_with_that_result(demo_model, tmp_path, monkeypatch):
    delivered, hold = asyncio.Event(), asyncio.Event()
    stream = TextToImageServicer.GenerateImageStream

    async def held_after_result(self, request, context):
        async for event in stream(self, request, context):
            yield event
            if event.WhichOneof("event") == "result":
                delivered.set()
                await hold.wait()  # the revocation comes now, after the result was charged and sent

    monkeypatch.setattr(TextToImageServicer, "GenerateImageStream", held_after_result)
    async with billed_server(demo_model, tmp_path) as (stub, metadata, record, billing):
        call = stub.GenerateImageStream(REQUEST, metadata=metadata, timeout=60)
        events = []

        async def read() -> None:
            async for event in call:
                events.append(event)

        reading = asyncio.ensure_future(read())
        try:
            await asyncio.wait_for(delivered.wait(), 60)
            billing.ledger.revoke(record.id)
            await asyncio.wait_for(reading, 30)
        finally:
            hold.set()
        kinds = [event.WhichOneof("event") for event in events]
        assert kinds[-1] == "result" and "error" not in kinds, [(e.WhichOneof("event"), e.error.message) for e in events]
        usage = events[-1].result.stardust_usage
        assert usage > 0 and await settled_balance(billing, record) == BALANCE - usage
