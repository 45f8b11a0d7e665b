"""The one money path under faults, on SQLite and PostgreSQL: one bad op never fails its
batch-mates, a cancelled request's reservation is released whenever it was cancelled, and an
unreachable ledger is UNAVAILABLE with nothing left open once it is back."""

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from t2i import wire

from t2i.billing.database import open_database
from t2i.billing.group_commit import GroupCommitter
from t2i.billing.ledger import CommitOp, Ledger, ReleaseOp, Reservation, ReserveOp
from t2i.billing.schema import api_keys
from t2i.errors import Unavailable
from testbed.api import Api
from testbed.backends import address_of, via
from testbed.proxy import FaultyLink

from .conftest import start_billing_server


def wait_until(condition, timeout: float = 60) -> None:
    """Poll until `condition()` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)


def charged_in_all(ledger: Ledger, key_id: str, opening_balance: int) -> int:
    """What the key paid: its commits less the refunds (credits beyond its opening balance)."""
    _, _, totals = ledger.usage(key_id)
    return totals.get("commit", 0) - (totals.get("credit", 0) - opening_balance)


def lose_the_next_acknowledgment(ledger: Ledger) -> None:
    """The next batch's transaction commits, then its caller sees the connection break: what
    happens when the database's answer to COMMIT is lost with the connection."""
    from sqlalchemy.exc import OperationalError

    apply_batch = ledger.apply_batch

    def committed_unanswered(ops):
        ledger.apply_batch = apply_batch
        apply_batch(ops)
        raise OperationalError("COMMIT", None, ConnectionResetError("connection reset by peer"))

    ledger.apply_batch = committed_unanswered


@pytest.fixture
def ledger(database_url):
    ledger = Ledger(open_database(database_url))
    yield ledger
    ledger.close()


class HeldKey:
    """A write transaction on one key's row, so the committer's next batch waits behind it
    (SQLite: the database write lock; PostgreSQL: the row lock)."""

    def __init__(self, ledger: Ledger, key_id: str) -> None:
        from sqlalchemy import update

        self.connection = ledger.db.connect()
        self.transaction = self.connection.begin()
        self.connection.execute(update(api_keys).where(api_keys.c.id == key_id).values(balance=api_keys.c.balance))

    def release(self) -> None:
        self.transaction.commit()
        self.connection.close()


async def test_one_bad_op_in_a_shared_batch_fails_only_itself(ledger, database_url):
    rich, _ = ledger.create_key("rich", 1000, "standard")
    other, _ = ledger.create_key("other", 1000, "standard")
    victim = ledger.reserve(rich.id, 5, owner="i1")
    to_commit = [ledger.reserve(other.id, 2, owner="i1") for _ in range(5)]
    # Knowing when the committer's thread has a batch in the database: what it submits after
    # that waits for the next batch, all together.
    in_database = threading.Event()
    apply_batch = ledger.apply_batch

    def spied(ops):
        in_database.set()
        return apply_batch(ops)

    ledger.apply_batch = spied
    committer = GroupCommitter(ledger)
    try:
        held = HeldKey(ledger, rich.id)
        first = committer.submit(ReserveOp(rich.id, 1, "i1"))  # its batch waits behind the held row
        assert await asyncio.to_thread(in_database.wait, 60)
        # A commit naming a key that does not exist breaks the transaction it is in (its
        # UPDATE ... RETURNING finds no row); on PostgreSQL an over-long request id does too.
        bad = [committer.submit(CommitOp(Reservation(victim.id, "key_does_not_exist", 5)))]
        if database_url.startswith("postgresql"):
            bad.append(committer.submit(ReserveOp(other.id, 1, "i1", request_id="r" * 300)))
        good = [committer.submit(ReserveOp(other.id, 3, "i1", request_id=f"good-{i}")) for i in range(20)]
        good += [committer.submit(CommitOp(r)) for r in to_commit]
        held.release()
        assert isinstance(first.result(timeout=30), Reservation)
        for future in bad:
            assert future.exception(timeout=30) is not None
        results = [f.result(timeout=30) for f in good]
    finally:
        committer.close()
    assert all(isinstance(r, Reservation) and r.amount == 3 for r in results[:20])
    assert all(isinstance(r, int) for r in results[20:])
    assert ledger.get_key(other.id).balance == 1000 - 5 * 2 - 20 * 3
    assert ledger.verify() == []


async def test_a_reserve_whose_acknowledgment_was_lost_is_released_by_its_id(ledger):
    record, _ = ledger.create_key("in doubt", 100, "standard")
    committer = GroupCommitter(ledger)
    try:
        lose_the_next_acknowledgment(ledger)
        with pytest.raises(Unavailable, match="cannot be reached"):
            await committer.reserve(ReserveOp(record.id, 7, "i1"))
        # The reservation exists, and nobody was told its id: the committer releases it.
        await asyncio.to_thread(wait_until, lambda: ledger.open_reservations() == [])
    finally:
        committer.close()
    _, entries, _ = ledger.usage(record.id)
    assert [(e["kind"], e["amount"]) for e in reversed(entries)] == [("credit", 100), ("reserve", 7), ("release", 7)]
    assert ledger.get_key(record.id).balance == 100 and ledger.verify() == []


async def test_a_commit_whose_acknowledgment_was_lost_is_refunded_once_by_the_release_after_it(ledger):
    record, _ = ledger.create_key("in doubt", 100, "standard")
    reservation = ledger.reserve(record.id, 7, owner="i1")
    committer = GroupCommitter(ledger)
    try:
        lose_the_next_acknowledgment(ledger)
        with pytest.raises(Unavailable):
            await committer.commit(CommitOp(reservation))
        assert ledger.get_key(record.id).balance == 93  # it landed: the caller withholds the image ...
        # ... a plain release cannot undo a commit; the one a failed commit sends does, once.
        assert committer.release(ReleaseOp(reservation.id)).result(timeout=30) is False
        assert committer.release(ReleaseOp(reservation.id, refund=True)).result(timeout=30) is True
        assert committer.release(ReleaseOp(reservation.id, refund=True)).result(timeout=30) is False
    finally:
        committer.close()
    _, entries, _ = ledger.usage(record.id)
    assert [(e["kind"], e["amount"], e["reservation_id"]) for e in reversed(entries)][1:] == [
        ("reserve", 7, reservation.id), ("commit", 7, reservation.id), ("credit", 7, reservation.id)]
    assert ledger.get_key(record.id).balance == 100 and ledger.verify() == []


def test_a_request_cancelled_at_any_moment_leaves_nothing_reserved(data_dir, tmp_path, database_url):
    """200 requests cancelled at random points (authentication, rate limit, reserve, denoise,
    commit), and 20 whose deadline passes during the reserve: soon after the last answer (far
    sooner than the reservations' 30-minute time to live) nothing is reserved, and only
    delivered images were charged."""
    server = start_billing_server(data_dir, tmp_path, database_url)
    ledger = Ledger(open_database(database_url))
    try:
        record, secret = ledger.create_key("fickle", 100_000, "unlimited")
        api = Api(server.target)
        rng = random.Random(7)
        delays = [rng.uniform(0.0, 0.25) for _ in range(200)]

        def cancelled(delay: float) -> bool:
            future = api.generate_future(secret, seed=rng.randrange(1 << 30))
            time.sleep(delay)  # a random moment to cancel at, not a wait for anything
            future.cancel()
            try:
                return future.result(timeout=60).stardust_usage > 0
            except grpc.FutureCancelledError:
                return False
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.CANCELLED, error
                return False

        with ThreadPoolExecutor(8) as pool:
            delivered = sum(pool.map(cancelled, delays))
        for _ in range(20):  # grpc-timeout of 1 ms: the deadline passes inside the reserve
            assert api.generate(secret, timeout=0.001).code is grpc.StatusCode.DEADLINE_EXCEEDED
        # Releases are queued, not awaited: poll. The deadline only guards against a hang (the
        # sweeper's time to live, 30 minutes, cannot be what empties them).
        wait_until(lambda: ledger.open_reservations() == [] and ledger.get_key(record.id).reserved == 0)
        after = ledger.get_key(record.id)
        charged = charged_in_all(ledger, record.id, 100_000)
        assert after.balance == 100_000 - charged
        # Each delivered image was charged; one cancelled after its charge was confirmed may be
        # too (one cancelled while its charge was being recorded is refunded).
        assert charged >= delivered
        assert ledger.verify() == []
        api.close()
    finally:
        server.kill()
        ledger.close()


def test_an_unreachable_ledger_is_unavailable_and_nothing_stays_open(data_dir, tmp_path, postgres_url):
    """PostgreSQL cut off for a few seconds under load: callers get UNAVAILABLE naming the
    ledger (or INTERNAL for an image whose charge could not be recorded), never a bare 500, and
    once it is back every failed release is retried: nothing is left open."""
    ledger = Ledger(open_database(postgres_url))
    with FaultyLink(address_of(postgres_url)) as link:
        server = start_billing_server(data_dir, tmp_path, via(postgres_url, link.address))
        try:
            record, secret = ledger.create_key("during-outage", 10_000, "unlimited")
            api = Api(server.target)
            outcomes, stop = [], threading.Event()

            def load(worker: int) -> None:
                while not stop.is_set():
                    outcomes.append(api.generate(secret, seed=worker, steps=4))

            def answered(code, since: int = 0) -> bool:
                return any(o.code is code for o in outcomes[since:])

            # Each phase lasts until it has shown what it must: served before the cut, refused
            # during it, served again after it.
            with ThreadPoolExecutor(4) as pool:
                for worker in range(4):
                    pool.submit(load, worker)
                wait_until(lambda: answered(grpc.StatusCode.OK))
                link.cut("reset")
                cut_at = len(outcomes)
                wait_until(lambda: answered(grpc.StatusCode.UNAVAILABLE, cut_at))
                link.heal()
                healed_at = len(outcomes)
                wait_until(lambda: answered(grpc.StatusCode.OK, healed_at))
                stop.set()
            codes = {o.code for o in outcomes}
            assert grpc.StatusCode.OK in codes and grpc.StatusCode.UNAVAILABLE in codes, codes
            assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}, codes
            refused = [o.details for o in outcomes if o.code is grpc.StatusCode.UNAVAILABLE]
            assert all("the ledger (postgresql" in d and "cannot be reached" in d for d in refused), refused[:3]
            assert not any("secret" in d or d == "internal error" for d in (o.details for o in outcomes))
            internal = [o.details for o in outcomes if o.code is grpc.StatusCode.INTERNAL]
            assert all("nothing was charged" in d for d in internal), internal
            wait_until(lambda: ledger.open_reservations() == [])
            delivered = sum(o.response.stardust_usage for o in outcomes if o.code is grpc.StatusCode.OK)
            assert charged_in_all(ledger, record.id, 10_000) == delivered
            assert ledger.get_key(record.id).balance == 10_000 - delivered
            assert ledger.verify() == []
            api.close()
        finally:
            server.kill()
            ledger.close()


def test_start_up_waits_for_a_database_that_does_not_answer_then_fails(data_dir, tmp_path, postgres_url):
    with FaultyLink(address_of(postgres_url)) as link:
        link.cut("blackhole")  # connections are accepted, nothing is ever answered
        server = start_billing_server(
            data_dir, tmp_path, via(postgres_url, link.address), extra_config="database_startup_timeout_seconds: 6\n", wait=False
        )
        try:
            status = server.process.wait(timeout=60)
            assert status != 0
            assert server.logged("waiting for the billing database"), server.output()
            assert any("was not reachable within 6 s" in e["msg"] for e in server.logs if e.get("level") == "error"), server.output()
        finally:
            server.kill()


async def test_failed_releases_are_retried_until_they_succeed(postgres_url):
    ledger = Ledger(open_database(postgres_url))
    record, _ = ledger.create_key("retry", 100, "standard")
    reservation = ledger.reserve(record.id, 7, owner="i1")
    with FaultyLink(address_of(postgres_url)) as link:
        through = Ledger(open_database(via(postgres_url, link.address)))
        committer = GroupCommitter(through, where="test ledger")
        try:
            link.cut("reset")
            first = committer.release(ReleaseOp(reservation.id, "retried"))
            assert isinstance(first.exception(timeout=30), Unavailable)
            assert committer.pending_releases == 1 and ledger.open_reservations() != []
            link.heal()
            deadline = time.monotonic() + 60  # only guards against a hang
            while ledger.open_reservations() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert ledger.open_reservations() == [] and committer.pending_releases == 0
        finally:
            committer.close()
            through.close()
    assert ledger.get_key(record.id).balance == 100
    assert ledger.verify() == []
    ledger.close()


def test_requests_refused_while_shutting_down_never_reserve(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    server = start_billing_server(data_dir, tmp_path, database, "--grace-period", "60", gate=True)
    ledger = Ledger(open_database(database))
    try:
        record, secret = ledger.create_key("late", 10_000, "unlimited")
        api = Api(server.target)
        with server.gate:  # in flight, held, for as long as the refusals take
            in_flight = api.generate_future(secret, steps=40)
            server.gate.wait_held(rows=2)
            server.process.send_signal(15)
            # Reported right before it stops admitting, on the loop that handles the calls below.
            wait_until(lambda: server.health(wire.SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING)
            refused = [api.generate(secret, seed=i) for i in range(20)]
            assert {o.code for o in refused} == {grpc.StatusCode.UNAVAILABLE}, {o.details for o in refused}
            assert not in_flight.done()
        assert in_flight.result(timeout=120).stardust_usage > 0
        _, entries, totals = ledger.usage(record.id, limit=100)
        assert [e["kind"] for e in reversed(entries)] == ["credit", "reserve", "commit"]  # nothing for the 20
        api.close()
    finally:
        server.kill()
        ledger.close()
