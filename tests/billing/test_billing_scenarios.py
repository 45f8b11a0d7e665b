"""The money guarantees under pressure, with SQLite and with PostgreSQL: concurrent spending,
a server killed mid-batch, and two replicas sharing one balance and one rate limit."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from t2i.billing.database import open_database
from t2i.billing.ledger import Ledger
from t2i.billing.pricing import price
from t2i.billing.settings import BillingSettings
from t2i.domain import GenerateRequest
from t2i.sampling import SigmaTable

from testbed.api import Api
from .conftest import PRICE_MULTIPLIER, start_billing_server

SLOW_COST = price(
    GenerateRequest(1, "1girl", "", 256, 256, 150, 5.0, 0, "euler", "normal"), PRICE_MULTIPLIER, SigmaTable.sdxl(), BillingSettings()
)


def wait_until(condition, timeout: float = 60) -> None:
    """Poll until `condition()` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def ledger_for(database_url):
    dbs = []

    def make() -> Ledger:
        db = open_database(database_url)
        dbs.append(db)
        return Ledger(db)

    yield make
    for db in dbs:
        db.dispose()


def test_balance_for_k_images_serves_exactly_k_of_5k_concurrent_requests(data_dir, tmp_path, database_url, ledger_for):
    k, cost = 4, 1
    server = start_billing_server(data_dir, tmp_path, database_url)
    try:
        ledger = ledger_for()
        record, secret = ledger.create_key("exact", k * cost, "unlimited")
        api = Api(server.target)
        with ThreadPoolExecutor(5 * k) as pool:
            outcomes = list(pool.map(lambda i: api.generate(secret, seed=i), range(5 * k)))
        codes = [o.code for o in outcomes]
        assert codes.count(grpc.StatusCode.OK) == k
        assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 4 * k, codes
        refusals = {o.details for o in outcomes if o.code is grpc.StatusCode.FAILED_PRECONDITION}
        assert all(d.startswith("insufficient stardust: this request costs 1, balance is ") for d in refusals)
        # All k were reserved before any finished, so each reports what is left to spend: 0.
        assert [o.response.stardust_balance for o in outcomes if o.response] == [0] * k
        final = ledger.get_key(record.id)
        assert (final.balance, final.reserved) == (0, 0)
        assert ledger.verify() == []
        api.close()
    finally:
        server.kill()


def test_killed_server_leaves_no_open_reservation_after_restart(data_dir, tmp_path, database_url, ledger_for):
    ledger = ledger_for()
    record, secret = ledger.create_key("victim", 100, "unlimited")
    server = start_billing_server(data_dir, tmp_path / "a", database_url, "--instance-id", "replica-a", gate=True)
    api = Api(server.target)
    done = api.generate(secret)  # one completed, charged image before the crash
    assert done.code is grpc.StatusCode.OK
    server.gate.close()  # none of the four can finish before the kill
    futures = [api.generate_future(secret, width=256, height=256, steps=150, seed=i) for i in range(4)]
    wait_until(lambda: len(ledger.open_reservations()) == 4)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    assert all(f.exception(timeout=30) is not None for f in futures)
    crashed = ledger.get_key(record.id)
    assert crashed.reserved == 4 * SLOW_COST and crashed.balance == 100 - 1 - 4 * SLOW_COST
    api.close()

    restarted = start_billing_server(data_dir, tmp_path / "b", database_url, "--instance-id", "replica-a")
    try:
        assert ledger.open_reservations() == []
        after = ledger.get_key(record.id)
        assert (after.balance, after.reserved) == (99, 0)  # only the delivered image is charged
        _, _, totals = ledger.usage(record.id)
        assert totals["commit"] == 1 and totals["release"] == 4 * SLOW_COST
        assert ledger.verify() == []
        assert restarted.logged("billing ready")[0]["released_reservations"] == 4
    finally:
        restarted.kill()


def test_a_dead_replica_is_swept_by_another_instance(data_dir, tmp_path, postgres_url, redis_url):
    """Kubernetes case: the replacement pod has a new name, so the dead pod's reservations are
    released once its heartbeat is stale (2 s in the test config)."""
    db = open_database(postgres_url)
    ledger = Ledger(db)
    record, secret = ledger.create_key("victim", 50, "unlimited")
    common = ("--redis-url", redis_url)
    dead = start_billing_server(data_dir, tmp_path / "dead", postgres_url, "--instance-id", "pod-1", *common, gate=True)
    api = Api(dead.target)
    dead.gate.close()  # it cannot finish before the kill
    future = api.generate_future(secret, width=256, height=256, steps=150)
    wait_until(lambda: ledger.open_reservations() != [])
    dead.process.send_signal(signal.SIGKILL)
    dead.process.wait(30)
    assert future.exception(timeout=30) is not None
    assert ledger.open_reservations() != []
    survivor = start_billing_server(data_dir, tmp_path / "new", postgres_url, "--instance-id", "pod-2", *common)
    try:
        # Released once pod-1's heartbeat is stale (2 s), by the survivor's start-up sweep or
        # its periodic one, whichever comes after that: poll (the reservation's own time to
        # live is 30 minutes, so only the sweep of a dead instance can do it).
        wait_until(lambda: ledger.open_reservations() == [])
        assert ledger.get_key(record.id).balance == 50
        assert ledger.verify() == []
    finally:
        survivor.kill()
        api.close()
        db.dispose()


def test_two_replicas_share_one_balance_and_one_rate_limit(data_dir, tmp_path, postgres_url, redis_url):
    db = open_database(postgres_url)
    ledger = Ledger(db)
    common = ("--redis-url", redis_url)
    first = start_billing_server(data_dir, tmp_path / "1", postgres_url, "--instance-id", "r1", *common)
    second = start_billing_server(data_dir, tmp_path / "2", postgres_url, "--instance-id", "r2", *common)
    try:
        apis = [Api(first.target), Api(second.target)]
        # One balance: 6 images' worth, 18 concurrent requests spread over both replicas.
        record, secret = ledger.create_key("shared", 6, "unlimited")
        with ThreadPoolExecutor(18) as pool:
            outcomes = list(pool.map(lambda i: apis[i % 2].generate(secret, seed=i), range(18)))
        assert sum(o.code is grpc.StatusCode.OK for o in outcomes) == 6
        assert ledger.get_key(record.id).balance == 0
        # ...and in turn: 4 more images' worth, 8 requests alternating between the replicas.
        ledger.topup(record.id, 4)
        codes = [apis[i % 2].generate(secret, seed=100 + i).code for i in range(8)]
        assert codes == [grpc.StatusCode.OK] * 4 + [grpc.StatusCode.FAILED_PRECONDITION] * 4
        assert ledger.get_key(record.id).balance == 0
        # One rate limit: burst 2 for the tight tier, whichever replica is asked.
        tight, tight_secret = ledger.create_key("tight", 100, "tight")
        codes = [apis[i % 2].generate(tight_secret, seed=i).code for i in range(4)]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert ledger.get_key(tight.id).balance == 98
        assert ledger.verify() == []
        for api in apis:
            api.close()
    finally:
        first.kill()
        second.kill()
        db.dispose()


def test_unreachable_redis_refuses_requests_and_says_why(data_dir, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    server = start_billing_server(data_dir, tmp_path, database_url, "--redis-url", "redis://127.0.0.1:1/0")
    db = open_database(database_url)
    try:
        ledger = Ledger(db)
        record, secret = ledger.create_key("r", 10, "standard")
        outcome = Api(server.target).generate(secret)
        assert outcome.code is grpc.StatusCode.UNAVAILABLE
        assert "the rate limiter (Redis at redis://127.0.0.1:1/0) cannot be reached" in outcome.details
        assert ledger.get_key(record.id).balance == 10
    finally:
        server.kill()
        db.dispose()
