"""Concurrency slots in Redis are leases: a Redis blip cannot leave a key locked out, and a
long request keeps its slot for as long as it runs.

Requests that must still be running are held by the server's gate (testbed/gate.py); lease
times are read from Redis (a slot's score is the end of its lease, in Redis TIME milliseconds).
"""

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


def wait_until(condition, timeout: float = 60, step: float = 0.05) -> None:
    """Poll until `condition()` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(step)


def redis_ms(redis) -> int:
    seconds, micros = redis.client.time()
    return seconds * 1000 + micros // 1000


def lease_end(redis, key_id: str) -> int:
    """The end of the key's one slot lease (Redis ms)."""
    ((_, score),) = redis.client.zrange(SLOTS + key_id, 0, -1, withscores=True)
    return int(score)


def test_releases_that_failed_during_a_redis_blip_are_retried(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    with PrivateRedis() as redis, FaultyLink(("127.0.0.1", redis.port)) as link:
        # A lease far longer than the test (and than the wait below): only the retried releases
        # can free the slots.
        server = start_billing_server(data_dir, tmp_path, database, "--redis-url", f"redis://{link.address}/0",
                                      extra_config="concurrency_slot_lease_seconds: 3600\n", gate=True)
        ledger = Ledger(open_database(database))
        try:
            record, secret = ledger.create_key("eight", 10_000, "eight")
            api = Api(server.target)
            with server.gate:  # all eight stay in flight until the link is cut
                futures = [api.generate_future(secret, seed=i, steps=30) for i in range(8)]
                wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 8)
                link.cut("reset")
            answers = [f.exception(timeout=120) for f in futures]
            assert all(a is None for a in answers), answers  # the generations themselves succeed
            assert redis.client.zcard(SLOTS + record.id) == 8, "the releases could not reach Redis"
            link.heal()
            wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 0)
            with ThreadPoolExecutor(8) as pool:
                again = list(pool.map(lambda i: api.generate(secret, seed=100 + i), range(8)))
            assert [o.code for o in again] == [grpc.StatusCode.OK] * 8, [o.details for o in again]
            api.close()
        finally:
            server.kill()
            ledger.close()


def test_a_running_request_keeps_its_slot_beyond_the_lease_and_frees_it_at_once(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    lease_ms = 2000
    with PrivateRedis() as redis:
        server = start_billing_server(data_dir, tmp_path, database, "--redis-url", redis.url,
                                      extra_config=f"concurrency_slot_lease_seconds: {lease_ms / 1000}\n", gate=True)
        ledger = Ledger(open_database(database))
        try:
            record, secret = ledger.create_key("single", 10_000, "single")
            api = Api(server.target)
            with server.gate:
                long = api.generate_future(secret, steps=150)
                server.gate.wait_held(rows=2)  # running, and held there until the gate opens
                first_lease_end = lease_end(redis, record.id)
                # Until Redis' clock is a whole lease past the end of the first lease: only
                # renewals can have kept the slot.
                wait_until(lambda: redis_ms(redis) > first_lease_end + lease_ms)
                assert not long.done()
                assert lease_end(redis, record.id) > redis_ms(redis), "the slot's lease was not renewed"
                second = api.generate(secret)
                assert second.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "requests in flight" in second.details
                renewed_end = lease_end(redis, record.id)
                long.cancel()
                wait_until(lambda: redis.client.zcard(SLOTS + record.id) == 0)
                # At once: gone before the lease it had at the cancel would have ended.
                assert redis_ms(redis) < renewed_end, "the slot expired instead of being released"
            assert api.generate(secret).code is grpc.StatusCode.OK
            api.close()
        finally:
            server.kill()
            ledger.close()
