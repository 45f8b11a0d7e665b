"""The ledger against SQLite and real PostgreSQL: exact balances, exactly-once resolution."""

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import update

from t2i.billing.database import open_database
from t2i.billing.ledger import IdempotencyClaim, Ledger, ReleaseOp, Replay, Reservation, ReservationExpired, utcnow
from t2i.billing.schema import instances, reservations
from t2i.errors import AlreadyProcessing, InsufficientBalance, InternalError, InvalidArgument, NotFound, PermissionDenied


@pytest.fixture
def ledger(database_url):
    db = open_database(database_url)
    yield Ledger(db)
    db.dispose()


def test_keys_are_stored_hashed_and_found_by_key(ledger):
    record, key = ledger.create_key("alice", 100, "standard")
    assert key.startswith("ilx_") and len(key) > 40
    assert record.id.startswith("key_") and record.prefix == key[:8]
    assert ledger.find_key(key) == record
    assert ledger.find_key(key + "x") is None
    with ledger.db.connect() as conn:
        rows = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM api_keys").all()]
    assert key not in repr(rows)  # only the hash and a short prefix are stored
    assert key[8:20] not in repr(rows)


def test_reserve_commit_and_release_move_money_exactly(ledger):
    record, _ = ledger.create_key("a", 10, "standard")
    first = ledger.reserve(record.id, 3, owner="i1", model_id=1, request_id="r1")
    assert ledger.get_key(record.id).balance == 7 and ledger.get_key(record.id).reserved == 3
    assert ledger.commit(first) == 7
    second = ledger.reserve(record.id, 4, owner="i1")
    assert ledger.release(second.id) is True
    key = ledger.get_key(record.id)
    assert (key.balance, key.reserved) == (7, 0)
    _, entries, totals = ledger.usage(record.id)
    assert totals == {"credit": 10, "reserve": 7, "commit": 3, "release": 4}
    assert [e["kind"] for e in entries] == ["release", "reserve", "commit", "reserve", "credit"]
    assert ledger.verify() == []


def test_a_reservation_is_resolved_exactly_once(ledger):
    record, _ = ledger.create_key("a", 10, "standard")
    reservation = ledger.reserve(record.id, 5, owner="i1")
    assert ledger.release(reservation.id) is True
    assert ledger.release(reservation.id) is False  # second release: nothing happens
    with pytest.raises(InternalError, match="nothing was charged"):
        ledger.commit(reservation)  # a released reservation can never be charged
    committed = ledger.reserve(record.id, 5, owner="i1")
    ledger.commit(committed)
    with pytest.raises(InternalError):
        ledger.commit(committed)
    assert ledger.release(committed.id) is False
    assert ledger.get_key(record.id).balance == 5
    assert ledger.verify() == []


def test_insufficient_balance_names_price_and_balance_and_changes_nothing(ledger):
    record, _ = ledger.create_key("a", 1, "standard")
    with pytest.raises(InsufficientBalance, match="insufficient stardust: this request costs 3, balance is 1"):
        ledger.reserve(record.id, 3, owner="i1")
    assert ledger.get_key(record.id).balance == 1
    assert ledger.open_reservations() == []


def test_revoked_and_unknown_keys(ledger):
    record, key = ledger.create_key("a", 10, "standard")
    ledger.revoke(record.id)
    assert ledger.find_key(key).revoked
    with pytest.raises(PermissionDenied, match=record.id):
        ledger.reserve(record.id, 1, owner="i1")
    with pytest.raises(NotFound):
        ledger.topup("key_missing", 5)
    with pytest.raises(NotFound):
        ledger.revoke("key_missing")
    with pytest.raises(InvalidArgument):
        ledger.topup(record.id, 0)


def test_concurrent_reservations_never_overdraw(ledger):
    record, _ = ledger.create_key("a", 30, "standard")
    outcomes = []

    def worker():
        try:
            outcomes.append(ledger.reserve(record.id, 3, owner="i1"))
        except InsufficientBalance:
            outcomes.append(None)

    threads = [threading.Thread(target=worker) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reserved = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(reserved) == 10 and outcomes.count(None) == 30
    for r in reserved:
        ledger.commit(r)
    assert ledger.get_key(record.id).balance == 0
    assert ledger.verify() == []


def test_sweep_releases_what_dead_or_restarted_owners_left(ledger):
    record, _ = ledger.create_key("a", 100, "standard")
    started = utcnow()
    ledger.heartbeat("alive", started)
    ledger.heartbeat("dead", started)
    alive = ledger.reserve(record.id, 1, owner="alive")
    dead = ledger.reserve(record.id, 2, owner="dead")
    mine_before_restart = ledger.reserve(record.id, 4, owner="me")
    expired = ledger.reserve(record.id, 8, owner="alive")
    with ledger.db.begin() as conn:
        conn.execute(update(instances).where(instances.c.id == "dead").values(heartbeat_at=started - dt.timedelta(minutes=5)))
        conn.execute(update(reservations).where(reservations.c.id == expired.id).values(expires_at=started - dt.timedelta(seconds=1)))
    restarted_at = utcnow()
    mine_after_restart = ledger.reserve(record.id, 16, owner="me")
    assert ledger.sweep("me", restarted_at, instance_timeout=60) == 3
    still_open = {r["id"] for r in ledger.open_reservations()}
    assert still_open == {alive.id, mine_after_restart.id}
    assert {dead.id, mine_before_restart.id, expired.id}.isdisjoint(still_open)
    assert ledger.get_key(record.id).balance == 100 - 1 - 16
    assert ledger.verify() == []


def test_a_reservation_can_outlive_the_ledgers_time_to_live(database_url):
    """A job's reservation stays open as long as the job may wait (ReserveOp.ttl); the others
    are released by the sweeper after the ledger's reservation_ttl."""
    db = open_database(database_url)
    ledger = Ledger(db, reservation_ttl=0.0)
    record, _ = ledger.create_key("a", 100, "standard")
    short = ledger.reserve(record.id, 1, owner="jobs")
    long = ledger.reserve(record.id, 2, owner="jobs", ttl=3600)
    deadline = time.monotonic() + 10
    while short.id in {r["id"] for r in ledger.open_reservations()} and time.monotonic() < deadline:
        ledger.sweep("me", utcnow(), instance_timeout=60)
    assert {r["id"] for r in ledger.open_reservations()} == {long.id}
    assert ledger.get_key(record.id).balance == 98 and ledger.verify() == []
    db.dispose()


def test_idempotent_requests_are_charged_once(ledger):
    record, _ = ledger.create_key("a", 10, "standard")
    claim = IdempotencyClaim("retry-1", "fingerprint-a")
    first = ledger.reserve(record.id, 3, owner="i1", idempotency=claim)
    with pytest.raises(AlreadyProcessing, match="still being processed"):
        ledger.reserve(record.id, 3, owner="i1", idempotency=claim)
    ledger.commit(first, idempotent_response=b"stored-response")
    replay = ledger.reserve(record.id, 3, owner="i1", idempotency=claim)
    assert replay == Replay(response=b"stored-response", usage=3, balance=7)
    assert ledger.get_key(record.id).balance == 7
    with pytest.raises(InvalidArgument, match="different request parameters"):
        ledger.reserve(record.id, 3, owner="i1", idempotency=IdempotencyClaim("retry-1", "fingerprint-b"))


def test_a_failed_idempotent_request_can_be_retried(ledger):
    record, _ = ledger.create_key("a", 10, "standard")
    claim = IdempotencyClaim("retry-2", "fp")
    failed = ledger.reserve(record.id, 3, owner="i1", idempotency=claim)
    ledger.release(failed.id)
    retried = ledger.reserve(record.id, 3, owner="i1", idempotency=claim)
    assert isinstance(retried, Reservation)
    ledger.commit(retried, idempotent_response=b"ok")
    assert ledger.get_key(record.id).balance == 7
    # An insufficient balance leaves no idempotency record behind: the key stays usable.
    poor, _ = ledger.create_key("b", 1, "standard")
    with pytest.raises(InsufficientBalance):
        ledger.reserve(poor.id, 3, owner="i1", idempotency=IdempotencyClaim("k", "fp"))
    ledger.topup(poor.id, 5)
    assert isinstance(ledger.reserve(poor.id, 3, owner="i1", idempotency=IdempotencyClaim("k", "fp")), Reservation)


def test_idempotency_records_expire(database_url):
    db = open_database(database_url)
    ledger = Ledger(db, idempotency_ttl=0.0)
    record, _ = ledger.create_key("a", 10, "standard")
    claim = IdempotencyClaim("old", "fp")
    ledger.commit(ledger.reserve(record.id, 3, owner="i1", idempotency=claim), idempotent_response=b"x")
    # Past its time to live the key is treated as new: charged again.
    assert isinstance(ledger.reserve(record.id, 3, owner="i1", idempotency=claim), Reservation)
    db.dispose()


def test_verify_detects_a_tampered_balance(ledger):
    record, _ = ledger.create_key("a", 10, "standard")
    from t2i.billing.schema import api_keys

    with ledger.db.begin() as conn:
        conn.execute(update(api_keys).where(api_keys.c.id == record.id).values(balance=11))
    assert any("stored balance 11, journal says 10" in p for p in ledger.verify())


def test_a_refunded_idempotent_request_is_not_replayed_and_verify_counts_refunds(ledger):
    record, _ = ledger.create_key("a", 10, "standard")
    claim = IdempotencyClaim("refunded", "fp")
    paid = ledger.reserve(record.id, 3, owner="i1", idempotency=claim)
    ledger.commit(paid, idempotent_response=b"withheld")
    (refunded,) = ledger.apply_batch([ReleaseOp(paid.id, refund=True)])
    assert refunded is True and ledger.get_key(record.id).balance == 10 and ledger.verify() == []
    # The refunded result was never paid for: a retry with its key runs (and pays) again.
    assert isinstance(ledger.reserve(record.id, 3, owner="i1", idempotency=claim), Reservation)
    # A second refund of one commit, or a refund naming no commit, is a mismatch verify() names.
    with ledger.db.begin() as conn:
        ledger._journal(conn, record.id, "credit", 3, paid.id, note="refund again")
        ledger._journal(conn, record.id, "credit", 2, "no-such-commit", note="refund of nothing")
    problems = ledger.verify()
    assert any(f"reservation {paid.id} was refunded 2 times" in p for p in problems), problems
    assert any("reservation no-such-commit was refunded without a commit" in p for p in problems), problems


def test_migrations_are_idempotent(database_url):
    """A second start (or replica) finds the schema current and the data where it was."""
    first = Ledger(open_database(database_url))
    record, key = first.create_key("survivor", 42, "standard")
    first.reserve(record.id, 2, owner="i1")
    first.close()
    again = Ledger(open_database(database_url))  # runs the migrations a second time
    try:
        kept = again.find_key(key)
        assert (kept.id, kept.balance, kept.reserved) == (record.id, 40, 2)
        assert len(again.open_reservations()) == 1 and again.verify() == []
    finally:
        again.close()


def test_a_batch_applies_each_op_on_its_own(ledger):
    from t2i.billing.ledger import CommitOp, ReserveOp

    rich, _ = ledger.create_key("rich", 10, "standard")
    poor, _ = ledger.create_key("poor", 2, "standard")
    gone, _ = ledger.create_key("gone", 10, "standard")
    ledger.revoke(gone.id)
    open_one = ledger.reserve(rich.id, 4, owner="i1")
    released = ledger.reserve(rich.id, 1, owner="i1")
    ledger.release(released.id)
    results = ledger.apply_batch([
        ReserveOp(rich.id, 3, "i1"),
        ReserveOp(poor.id, 3, "i1"),
        ReserveOp(gone.id, 1, "i1"),
        CommitOp(open_one),
        CommitOp(released),
        ReserveOp("key_missing", 1, "i1"),
    ])
    assert isinstance(results[0], Reservation) and results[0].amount == 3
    assert isinstance(results[1], InsufficientBalance) and str(results[1]) == "insufficient stardust: this request costs 3, balance is 2"
    assert isinstance(results[2], PermissionDenied)
    assert results[3] == 3  # rich: 10 - 4 - 3 reserved, 4 of them now charged; spendable 3
    assert isinstance(results[4], InternalError)  # a released reservation is never charged
    assert isinstance(results[5], NotFound)
    assert (ledger.get_key(rich.id).balance, ledger.get_key(rich.id).reserved) == (3, 3)
    assert ledger.get_key(poor.id).balance == 2
    assert ledger.verify() == []


async def test_group_commit_batches_concurrent_ops(ledger):
    import asyncio

    from t2i import metrics
    from t2i.billing.group_commit import GroupCommitter
    from t2i.billing.ledger import CommitOp, ReserveOp

    def batches() -> tuple[float, float]:
        """(transactions, ops) the group committer has recorded so far."""
        families = {f.name: f for f in metrics.LEDGER_BATCH.collect()}
        samples = {s.name: s.value for s in families["t2i_ledger_batch_ops"].samples}
        return samples["t2i_ledger_batch_ops_count"], samples["t2i_ledger_batch_ops_sum"]

    record, _ = ledger.create_key("busy", 50, "standard")
    committer = GroupCommitter(ledger)
    transactions_before, ops_before = batches()
    try:
        outcomes = await asyncio.gather(
            *(committer.reserve(ReserveOp(record.id, 3, "i1")) for _ in range(20)), return_exceptions=True
        )
        reservations = [o for o in outcomes if isinstance(o, Reservation)]
        assert len(reservations) == 16  # 50 // 3
        assert all(isinstance(o, InsufficientBalance) for o in outcomes if not isinstance(o, Reservation))
        balances = await asyncio.gather(*(committer.commit(CommitOp(r)) for r in reservations))
        assert set(balances) == {2}
    finally:
        committer.close()
    transactions, ops = batches()
    assert ops - ops_before == 20 + 16
    # Submitted together, they shared transactions: far fewer than one per op.
    assert transactions - transactions_before <= 6, transactions - transactions_before
    record = ledger.get_key(record.id)
    assert (record.balance, record.reserved) == (2, 0)
    assert ledger.verify() == []


def test_the_sqlite_ledger_is_readable_by_its_owner_only(tmp_path):
    import os
    import stat

    path = tmp_path / "billing.sqlite3"
    old_umask = os.umask(0o022)  # what a shell usually has: new files would be 0644
    try:
        ledger = Ledger(open_database(f"sqlite:///{path}"))
        ledger.create_key("someone", 5, "standard")
        files = [p for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")) if p.exists()]
        assert len(files) == 3, files  # WAL mode keeps its companions while a connection is open
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
        assert set(modes.values()) == {0o600}, modes
        ledger.close()
    finally:
        os.umask(old_umask)


def test_commit_with_records_the_charge_and_what_was_paid_for_together(ledger):
    """commit_with's `then` runs in the charge's transaction: declined, neither is recorded."""
    record, _ = ledger.create_key("a", 100, "standard")
    declined = ledger.reserve(record.id, 10, owner="jobs")
    seen = []
    assert ledger.commit_with(declined, lambda conn, balance: seen.append(balance) or False, request_id="j1") is None
    assert seen == [90]  # the balance the charge would have left
    assert ledger.get_key(record.id).balance == 90 and declined.id in {r["id"] for r in ledger.open_reservations()}
    assert ledger.commit_with(declined, lambda conn, balance: True, request_id="j1") == 90
    assert declined.id not in {r["id"] for r in ledger.open_reservations()}
    with pytest.raises(ReservationExpired):
        ledger.commit_with(declined, lambda conn, balance: True)
    _, entries, _ = ledger.usage(record.id)
    assert [e["kind"] for e in entries if e["request_id"] == "j1"] == ["commit"]
    assert ledger.verify() == []
