"""The jobs queue on SQLite and on real PostgreSQL: submission caps, claims and leases, one
claim per job when replicas claim at once, fairness between keys, owner-only finishing,
cancellation, listing, stored images and their expiry."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time

import pytest
from sqlalchemy import update

from t2i.billing.database import open_database
from t2i.billing.ledger import Ledger
from t2i.billing.schema import jobs
from t2i.jobs.store import ID_PREFIX, JobStore, QueueFull


@pytest.fixture
def store(database_url):
    db = open_database(database_url)
    ledger = Ledger(db)
    keys = [ledger.create_key(name, 1000, "standard")[0].id for name in ("a", "b")]
    yield JobStore(db), keys
    db.dispose()


_SUBMITTED = itertools.count()


def submit(store: JobStore, key: str, n: int = 1, cap: int = 100) -> list[str]:
    """`n` jobs, each submitted a second after the one before (whatever the clock's resolution:
    the queue's order is the submission time's)."""
    ids = []
    for _ in range(n):
        job_id = store.submit(key, b"request", 5, None, cap).id
        with store.db.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=next(_SUBMITTED))))
        ids.append(job_id)
    return ids


def test_submit_get_and_another_keys_job_is_not_found(store):
    store, (a, b) = store
    job = store.submit(a, b"the request", 7, "reservation-1", 10)
    assert job.id.startswith(ID_PREFIX) and len(job.id) >= len(ID_PREFIX) + 32
    assert (job.status, job.cost, job.reservation_id, job.attempts) == ("queued", 7, "reservation-1", 0)
    assert store.get(job.id, a).request == b"the request"
    assert store.get(job.id, b) is None
    assert store.get("job_nope", a) is None
    assert store.position(job) == 1


def test_the_queued_cap_is_per_key(store):
    store, (a, b) = store
    submit(store, a, 2, cap=2)
    with pytest.raises(QueueFull) as full:
        submit(store, a, cap=2)
    assert (full.value.queued, full.value.limit) == (2, 2)
    submit(store, b, cap=2)  # another key's queue is its own
    claimed = store.claim("replica-1", 30)
    assert claimed.key_id == a
    submit(store, a, cap=2)  # a running job no longer counts as queued


def test_claim_leases_renew_and_only_the_holder_finishes(store):
    store, (a, _) = store
    (job_id,) = submit(store, a)
    job = store.claim("replica-1", 30)
    assert (job.id, job.status, job.lease_owner, job.attempts) == (job_id, "running", "replica-1", 1)
    assert job.lease_expires_at > dt.datetime.now(dt.UTC)
    assert store.claim("replica-2", 30) is None  # leased: nobody else takes it
    assert store.renew(job_id, "replica-1", 30) and not store.renew(job_id, "replica-2", 30)
    assert not store.succeed(job_id, "replica-2", [b"x"], "image/png", 5, 995, 60)
    assert store.succeed(job_id, "replica-1", [b"one", b"two"], "image/png", 5, 995, 60)
    done = store.get(job_id, a)
    assert (done.status, done.usage, done.balance, done.image_count, done.lease_owner) == ("succeeded", 5, 995, 2, None)
    assert store.image(job_id, a, 1) == (b"two", "image/png")
    assert store.image(job_id, a, 2) is None
    assert not store.fail(job_id, "replica-1", "INTERNAL", "late")  # finished: nothing changes


def test_an_expired_lease_is_claimed_again_by_another_replica(store):
    store, (a, _) = store
    (job_id,) = submit(store, a)
    store.claim("dead-replica", 30)
    with store.db.begin() as conn:  # its replica died: the lease ran out
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(
            lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    again = store.claim("replica-2", 30)
    assert (again.id, again.lease_owner, again.attempts) == (job_id, "replica-2", 2)
    assert not store.renew(job_id, "dead-replica", 30)  # the old holder learns it lost it
    assert not store.succeed(job_id, "dead-replica", [b"x"], "image/png", 5, 995, 60)
    assert store.fail(job_id, "replica-2", "INVALID_ARGUMENT", "invalid steps 0")
    failed = store.get(job_id, a)
    assert (failed.status, failed.error_status, failed.error_message) == ("failed", "INVALID_ARGUMENT", "invalid steps 0")


def test_replicas_claiming_at_once_take_each_job_once(store):
    store, (a, b) = store
    submitted = set(submit(store, a, 10) + submit(store, b, 10))
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def replica(name: str) -> None:
        start.wait()
        while (job := store.claim(name, 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=replica, args=(f"replica-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(claimed) == sorted(submitted)  # every job, none twice


def test_the_key_with_fewer_running_jobs_goes_first(store):
    store, (a, b) = store
    flood = submit(store, a, 3)
    (late,) = submit(store, b)  # younger than all of a's
    assert store.claim("r", 30).id == flood[0]
    assert store.claim("r", 30).id == late  # a has one running, b none: b's first job passes a's queue
    assert store.claim("r", 30).id == flood[1]


def test_cancel_a_queued_a_running_and_a_finished_job(store):
    store, (a, b) = store
    queued, running, finished = submit(store, a, 3)
    assert store.cancel(queued, b) is None  # another key's
    job, before = store.cancel(queued, a)
    assert (before, job.status) == ("queued", "cancelled")
    assert store.claim("r", 30).id == running
    job, before = store.cancel(running, a)
    assert (before, job.status, job.lease_owner) == ("running", "cancelled", None)
    assert not store.renew(running, "r", 30)  # its runner stops at its next renewal
    assert not store.succeed(running, "r", [b"x"], "image/png", 5, 995, 60)
    assert store.claim("r", 30).id == finished
    assert store.succeed(finished, "r", [b"x"], "image/png", 5, 995, 60)
    job, before = store.cancel(finished, a)
    assert (before, job.status, job.image_count) == ("succeeded", "succeeded", 0)
    assert store.image(finished, a, 0) is None


def test_listing_newest_first_by_status_and_pages(store):
    store, (a, b) = store
    ids = submit(store, a, 5)
    submit(store, b, 2)
    store.claim("r", 30)  # the oldest, ids[0]
    assert [j.id for j in store.list(a)] == ids[::-1]
    assert [j.id for j in store.list(a, ["running"])] == [ids[0]]
    first = store.list(a, limit=2)
    second = store.list(a, after=first[-1].id, limit=2)
    third = store.list(a, after=second[-1].id, limit=2)
    assert [j.id for j in first + second + third] == ids[::-1]
    assert store.list(a, after="job_unknown") == []
    assert store.list(b, after=ids[0]) == []  # a's id is no anchor for b


def test_results_expire_after_their_time_to_live(store):
    store, (a, _) = store
    short, long = submit(store, a, 2)
    store.claim("r", 30)
    store.succeed(short, "r", [b"x"], "image/png", 5, 995, results_ttl=0.0)
    store.claim("r", 30)
    store.succeed(long, "r", [b"y"], "image/png", 5, 990, results_ttl=3600)
    deadline = time.monotonic() + 10
    while (expired := store.expire_results(3600)) == [] and time.monotonic() < deadline:
        time.sleep(0.01)  # the clock must pass the expiry instant (it is "now" plus 0 s)
    assert expired == [short]
    assert store.get(short, a).status == "expired" and store.image(short, a, 0) is None
    assert store.image(long, a, 0) == (b"y", "image/png")


def progress(step: int) -> bytes:
    from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

    return pb.GenerateImageEvent(progress=pb.ProgressEvent(step=step, total_steps=3)).SerializeToString()


def test_events_are_numbered_kept_for_the_holder_only_and_final_once_it_ended(store):
    store, (a, b) = store
    (job_id,) = submit(store, a)
    job, events, last = store.watch(job_id, a, 0)
    assert [n for n, _ in events] == [1] and last == 1 and job.status == "queued"  # the queued event, with the job
    assert store.watch(job_id, b, 0) is None  # another key's job
    job = store.claim("r1", 30)
    store.add_events("r1", [(job_id, 1, "progress", progress(1)), (job_id, 1, "progress", progress(2))])
    store.add_events("r2", [(job_id, 1, "progress", progress(9))])  # not its job: nothing added
    _, events, last = store.watch(job_id, a, 1)
    assert [(n, payload) for n, payload in events] == [(2, progress(1)), (3, progress(2))] and last == 3
    assert store.progress(store.get(job_id, a)) == progress(2)
    # Taken over after its lease ran out: the new run's progress is its own.
    with store.db.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(
            lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    again = store.claim("r2", 30)
    assert again.attempts == 2 and store.progress(again) is None
    store.add_events("r1", [(job_id, 1, "progress", progress(3))])  # the old holder: dropped
    store.add_events("r2", [(job_id, 2, "progress", progress(1))])
    assert store.progress(store.get(job_id, a)) == progress(1)
    assert store.succeed(job_id, "r2", [b"x"], "image/png", 5, 995, 60)
    store.add_events("r2", [(job_id, 2, "progress", progress(3))])  # ended: nothing more
    done, events, last = store.watch(job_id, a, 0)
    assert done.status == "succeeded" and [n for n, _ in events] == [1, 2, 3, 4] and last == 4


def preview(step: int) -> bytes:
    from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

    return pb.GenerateImageEvent(preview=pb.PreviewEvent(step=step, jpeg=b"jpeg", width=8, height=8)).SerializeToString()


def test_deleting_a_finished_jobs_images_blanks_its_previews_and_keeps_the_numbers(store):
    store, (a, _) = store
    kept, deleted = submit(store, a, 2)
    for job_id in (kept, deleted):
        store.claim("r", 30)
        store.add_events("r", [(job_id, 1, "progress", progress(1)), (job_id, 1, "preview", preview(1))])
        store.succeed(job_id, "r", [b"x"], "image/png", 5, 995, 3600)
    store.cancel(deleted, a)  # a finished job: its images go, and its previews' pictures
    _, events, last = store.watch(deleted, a, 0)
    assert [n for n, _ in events] == [1, 2, 3] and last == 3 and store.image(deleted, a, 0) is None
    assert events[1][1] == progress(1) and b"jpeg" not in events[2][1]
    assert store.watch(kept, a, 0)[1][2][1] == preview(1) and store.image(kept, a, 0) == (b"x", "image/png")


def test_events_are_kept_as_long_as_the_results(store):
    store, (a, _) = store
    failed, running = submit(store, a, 2)
    store.claim("r", 30)
    store.fail(failed, "r", "INTERNAL", "boom")
    store.claim("r", 30)
    store.add_events("r", [(running, 1, "progress", progress(1))])
    assert len(store.watch(failed, a, 0)[1]) == 1
    store.expire_results(3600)  # ended just now: kept
    assert len(store.watch(failed, a, 0)[1]) == 1
    deadline = time.monotonic() + 10
    while store.watch(failed, a, 0)[1] and time.monotonic() < deadline:
        store.expire_results(0.0)  # the clock must pass the end instant
        time.sleep(0.01)
    assert store.watch(failed, a, 0)[1] == []
    assert len(store.watch(running, a, 0)[1]) == 2  # a running job's events stay


def test_a_database_of_the_first_schema_is_upgraded_with_its_money_kept(database_url):
    """A ledger made before jobs existed (revision 0001) gains the jobs tables at start-up."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from t2i.billing.database import MIGRATIONS

    first = open_database(database_url, migrate=False)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with first.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    assert "jobs" not in inspect(first).get_table_names()
    record, _ = Ledger(first).create_key("before-jobs", 1234, "standard")
    first.dispose()
    upgraded = open_database(database_url)
    assert {"jobs", "job_images", "job_events"} <= set(inspect(upgraded).get_table_names())
    assert Ledger(upgraded).get_key(record.id).balance == 1234
    assert JobStore(upgraded).submit(record.id, b"r", 1, None, 10).status == "queued"
    upgraded.dispose()
