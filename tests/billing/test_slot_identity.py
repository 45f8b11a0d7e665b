"""A concurrency slot is the server's own: nothing a caller sends can merge two calls into one
slot, and a call that never ran holds none, even when Redis ran the admission and lost its answer."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from t2i.billing.database import open_database
from t2i.billing.ledger import Ledger
from testbed.api import TINY, Api
from testbed.backends import PrivateRedis
from testbed.proxy import FaultyLink
from testbed.server import ServerProcess

from .conftest import write_configs

SLOTS = "t2i:ratelimit:slots:"


def gated_server(data_dir, tmp_path, database: str, *extra: str, extra_config: str = "") -> ServerProcess:
    models, billing = write_configs(data_dir, tmp_path / "config", extra_config)
    server = ServerProcess(
        data_dir, "--models", str(models), "--billing-config", str(billing), "--database-url", database, *extra,
        gate=tmp_path / "gate",
    )
    return server.wait_serving()


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize("limiter", ["in-process", "redis"])
def test_calls_sharing_one_request_id_take_one_slot_each(data_dir, tmp_path, limiter):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    redis = PrivateRedis() if limiter == "redis" else None
    extra = ("--redis-url", redis.url) if redis else ()
    server = gated_server(data_dir, tmp_path, database, *extra)
    ledger = Ledger(open_database(database))
    try:
        _, secret = ledger.create_key("eight", 10_000, "eight")  # at most 8 in flight
        api = Api(server.target)
        metadata = api.metadata(secret, extra=[("x-request-id", "one-id-for-all")])
        request = pb.GenerateImageRequest(**TINY)
        with server.gate:  # nothing finishes until the gate opens: all 14 are in flight together
            calls = [api.stub.GenerateImage.future(request, metadata=metadata, timeout=120) for _ in range(14)]
            wait_until(lambda: sum(call.done() for call in calls) == 6)
            refused = [call for call in calls if call.done()]
            assert all(call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for call in refused)
            assert all("already has 8 requests in flight" in call.details() for call in refused)
            if redis:
                record = ledger.find_key(secret)
                assert redis.client.zcard(SLOTS + record.id) == 8
        answered = [call for call in calls if call not in refused]
        assert [call.code() for call in answered] == [grpc.StatusCode.OK] * 8
        # The slots went with their calls: 8 more are admitted at once, under the same id.
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda _: api.generate(secret, metadata=[("x-request-id", "one-id-for-all")]), range(8)))
        assert [o.code for o in again] == [grpc.StatusCode.OK] * 8, [o.details for o in again]
        api.close()
    finally:
        server.kill()
        ledger.close()
        if redis:
            redis.close()


def test_a_call_whose_admission_answer_was_lost_frees_its_slot_once_redis_answers(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with PrivateRedis() as redis, FaultyLink(("127.0.0.1", redis.port)) as link:
        # A lease far longer than the test: only the server's own release can free the slot.
        server = gated_server(data_dir, tmp_path, database, "--redis-url", f"redis://{link.address}/0",
                              extra_config="concurrency_slot_lease_seconds: 120\n")
        ledger = Ledger(open_database(database))
        try:
            record, secret = ledger.create_key("eight", 10_000, "eight")
            api = Api(server.target)
            assert api.generate(secret).code is grpc.StatusCode.OK  # the connections are up
            # Redis runs the next admission script (the EVALSHA goes through) and its answer is lost.
            link.cut("deaf", after=b"EVALSHA")
            lost = api.generate(secret)
            assert lost.code is grpc.StatusCode.UNAVAILABLE, lost.details
            link.heal()
            wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 0, timeout=10)
            with ThreadPoolExecutor(8) as pool:  # the key has all 8 of its slots again
                with server.gate:
                    held = [pool.submit(api.generate, secret, seed=i) for i in range(8)]
                    wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 8)
                assert [f.result().code for f in held] == [grpc.StatusCode.OK] * 8
            api.close()
        finally:
            server.kill()
            ledger.close()
