"""Concurrency slots in Redis are leases: a Redis blip cannot leave a key locked out, and a
long request keeps its slot for as long as it runs."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from t2i.billing.database import open_database
from t2i.billing.ledger import Ledger
from testbed.api import Api
from testbed.backends import PrivateRedis
from testbed.proxy import FaultyLink

from .conftest import start_billing_server

SLOTS = "t2i:ratelimit:slots:"


def wait_until(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds it took for `condition()` to hold; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started


def test_releases_that_failed_during_a_redis_blip_are_retried(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with PrivateRedis() as redis, FaultyLink(("127.0.0.1", redis.port)) as link:
        # A lease far longer than the test: only the retried releases can free the slots.
        server = start_billing_server(data_dir, tmp_path, database, "--redis-url", f"redis://{link.address}/0",
                                      extra_config="concurrency_slot_lease_seconds: 120\n")
        ledger = Ledger(open_database(database))
        try:
            record, secret = ledger.create_key("eight", 10_000, "eight")
            api = Api(server.target)
            futures = [api.generate_future(secret, seed=i, steps=30) for i in range(8)]
            wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 8, timeout=30)
            link.cut("reset")
            answers = [f.exception(timeout=120) for f in futures]
            assert all(a is None for a in answers), answers  # the generations themselves succeed
            assert redis.client.zcard(SLOTS + record.id) == 8, "the releases could not reach Redis"
            link.heal()
            seconds = wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 0, timeout=10)
            assert seconds < 5
            with ThreadPoolExecutor(8) as pool:
                again = list(pool.map(lambda i: api.generate(secret, seed=100 + i), range(8)))
            assert [o.code for o in again] == [grpc.StatusCode.OK] * 8, [o.details for o in again]
            api.close()
        finally:
            server.kill()
            ledger.close()


def test_a_running_request_keeps_its_slot_beyond_the_lease_and_frees_it_at_once(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with PrivateRedis() as redis:
        server = start_billing_server(data_dir, tmp_path, database, "--redis-url", redis.url,
                                      extra_config="concurrency_slot_lease_seconds: 1.5\n")
        ledger = Ledger(open_database(database))
        try:
            record, secret = ledger.create_key("single", 10_000, "single")
            api = Api(server.target)
            long = api.generate_future(secret, width=256, height=256, steps=150)
            wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 1, timeout=30)
            time.sleep(4.0)  # well past two leases: only renewals keep the slot
            assert not long.done(), "the long request must still be running for this test to mean anything"
            assert redis.client.zcard(SLOTS + record.id) == 1
            second = api.generate(secret)
            assert second.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "requests in flight" in second.details
            long.cancel()
            wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 0, timeout=5)
            assert api.generate(secret).code is grpc.StatusCode.OK
            api.close()
        finally:
            server.kill()
            ledger.close()
