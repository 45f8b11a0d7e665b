"""The jobs queue and its stored results, in the billing database (t2i.billing.schema `jobs`).

One code path for SQLite (the embedded default) and PostgreSQL (several replicas), through
SQLAlchemy Core like the ledger. A replica takes the next job with `claim()`: on PostgreSQL
`SELECT ... FOR UPDATE SKIP LOCKED`, so replicas claiming at once take different jobs without
waiting on each other; on SQLite every write transaction is BEGIN IMMEDIATE (one writer), which
gives the same guarantee. A claimed job is leased to its replica until `lease_expires_at`; the
replica renews the lease while the job runs (`renew()`), and a job whose lease ran out (its
replica died) is claimed again by another, from the start. Only the lease holder can finish a
job (`succeed()`, `fail()`), so a replica that lost its lease cannot overwrite what another did.

Which job is next: among the queued ones (and the running ones whose lease expired), the oldest
of the key with the fewest jobs running, so one key's flood of jobs does not hold back another
key's first one (the engine's fair batching then shares the work between the keys).

A job's events (table `job_events`, numbered per job from 1) are what its watchers replay:
the first, `queued`, is written with the job; the runner holding the job appends the engine's
events (`add_events`), and no one else can, so once a job has ended its events are final.
The images of succeeded jobs go through a ResultStore (results.py).

Ids are unguessable (`job_` and 24 random bytes); every read takes the key, and another key's
job is not found. Money is the ledger's (t2i.billing.ledger): the store keeps the job's price
and reservation id, and the caller reserves, commits and releases.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..billing.ledger import utcnow
from ..billing.schema import JOB_STATUSES, job_events, jobs, webhook_deliveries, webhook_secrets
from .results import DatabaseResults, ResultStore

ID_PREFIX = "job_"
FINISHED = ("succeeded", "failed", "cancelled", "expired")


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives naive datetimes back; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def new_job_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(24)


def idempotent_job_id(key_id: str, idempotency_key: str) -> str:
    """The id of the key's job submitted with this Idempotency-Key: a retry finds the same job.
    Not guessable without the key's own Idempotency-Key, and only that key can read it anyway."""
    digest = hashlib.sha256(f"{key_id}\0{idempotency_key}".encode()).digest()
    return ID_PREFIX + base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


class QueueFull(Exception):
    """The key has as many queued jobs as its tier allows."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs are queued for this key, the most its tier allows ({limit})")
        self.queued, self.limit = queued, limit


class DuplicateJob(Exception):
    """A job of this id exists: the same Idempotency-Key submitted twice at once."""


@dataclass(frozen=True)
class Delivery:
    """One webhook event of a job and its attempts (table webhook_deliveries)."""

    id: str
    job_id: str
    key_id: str
    event: str
    url: str
    payload: bytes
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    created_at: dt.datetime
    last_attempt_at: dt.datetime | None
    last_status: int | None
    last_error: str | None

    @classmethod
    def of(cls, row) -> Delivery:
        values = dict(row._mapping)
        for name in ("next_attempt_at", "created_at", "last_attempt_at"):
            values[name] = aware(values[name])
        return cls(**values)


@dataclass(frozen=True)
class Job:
    id: str
    key_id: str
    status: str
    request: bytes
    cost: int
    reservation_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    attempts: int
    error_status: str | None
    error_message: str | None
    usage: int | None
    balance: int | None
    image_count: int | None
    content_type: str | None
    results_expire_at: dt.datetime | None
    webhook_url: str | None = None
    webhook_events: str | None = None  # comma-separated

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def of(cls, row) -> Job:
        values = dict(row._mapping)
        for name in ("created_at", "started_at", "finished_at", "lease_expires_at", "results_expire_at"):
            values[name] = aware(values[name])
        return cls(**values)


class JobStore:
    def __init__(self, db: Engine, results: ResultStore | None = None) -> None:
        self.db = db
        self.results = results or DatabaseResults()  # the images (results.py)

    def _read(self):
        return self.db.execution_options(read_only=True).begin()

    # --- the caller's side -----------------------------------------------------------------

    def submit(self, key_id: str, request: bytes, cost: int, reservation_id: str | None, max_queued: int,
               job_id: str | None = None, webhook_url: str | None = None, webhook_events: Sequence[str] = ()) -> Job:
        """A new queued job; QueueFull when the key already has `max_queued` queued jobs."""
        now = utcnow()
        job_id = job_id or new_job_id()
        with self.db.begin() as conn:
            queued = conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.key_id == key_id, jobs.c.status == "queued")
            ).scalar_one()
            if queued >= max_queued:
                raise QueueFull(queued, max_queued)
            try:
                conn.execute(insert(jobs).values(
                    id=job_id, key_id=key_id, status="queued", request=request, cost=cost,
                    reservation_id=reservation_id, created_at=now, attempts=0, webhook_url=webhook_url,
                    webhook_events=",".join(webhook_events) if webhook_url else None,
                ))
            except IntegrityError:
                raise DuplicateJob(job_id) from None
            job = Job.of(conn.execute(select(jobs).where(jobs.c.id == job_id)).one())
            conn.execute(insert(job_events).values(job_id=job_id, seq=1, attempt=0, kind="queued",
                                                   payload=queued_event(_position(conn, job)), created_at=now))
            return job

    def queued(self, key_id: str) -> int:
        """The key's jobs waiting to start."""
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.key_id == key_id, jobs.c.status == "queued")).scalar_one()

    def get(self, job_id: str, key_id: str) -> Job | None:
        """The key's job, or None (unknown, or another key's)."""
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.key_id == key_id)).one_or_none()
        return None if row is None else Job.of(row)

    def position(self, job: Job) -> int:
        """1 for the next queued job to be claimed (in submission order, all keys), ..."""
        with self._read() as conn:
            return _position(conn, job)

    def list(self, key_id: str, statuses: Sequence[str] = (), after: str | None = None, limit: int = 50) -> list[Job]:
        """The key's jobs, newest first; `after`: the id the previous page ended with."""
        query = select(jobs).where(jobs.c.key_id == key_id)
        if statuses:
            query = query.where(jobs.c.status.in_(list(statuses)))
        with self._read() as conn:
            if after is not None:
                anchor = conn.execute(select(jobs.c.created_at, jobs.c.id).where(
                    jobs.c.id == after, jobs.c.key_id == key_id)).one_or_none()
                if anchor is None:
                    return []
                query = query.where(or_(jobs.c.created_at < anchor.created_at,
                                        and_(jobs.c.created_at == anchor.created_at, jobs.c.id < anchor.id)))
            rows = conn.execute(query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)).all()
        return [Job.of(row) for row in rows]

    def cancel(self, job_id: str, key_id: str) -> tuple[Job, str] | None:
        """Cancel the key's job: a queued or running one becomes cancelled (its runner sees it
        at its next renew() and stops); a finished one has its images deleted. Returns the job
        after, and its status before (None: not found)."""
        now = utcnow()
        with self.db.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.key_id == key_id)
                               .with_for_update()).one_or_none()
            if row is None:
                return None
            before = row.status
            if before in ("queued", "running"):
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    status="cancelled", finished_at=now, lease_owner=None, lease_expires_at=None))
                _announce(conn, job_id)
            else:
                self.results.delete(conn, [job_id])
                # Previews are pictures of the result too: they lose their JPEG and keep their
                # place, so that the events' numbers (what a watcher resumes by) do not change.
                conn.execute(update(job_events).where(job_events.c.job_id == job_id, job_events.c.kind == "preview")
                             .values(payload=EMPTY_PREVIEW))
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(image_count=0))
            return Job.of(conn.execute(select(jobs).where(jobs.c.id == job_id)).one()), before

    def image(self, job_id: str, key_id: str, position: int) -> tuple[bytes, str] | None:
        """An image of the key's succeeded job and its content type, or None."""
        with self._read() as conn:
            content_type = conn.execute(select(jobs.c.content_type).where(
                jobs.c.id == job_id, jobs.c.key_id == key_id, jobs.c.status == "succeeded")).scalar_one_or_none()
            data = self.results.get(conn, job_id, position) if content_type is not None else None
        return None if data is None else (data, content_type)

    def watch(self, job_id: str, key_id: str, after: int) -> tuple[Job, list[tuple[int, bytes]], int] | None:
        """The key's job, its events numbered above `after` (GenerateImageEvent bytes) and the
        number of its last event; None when not found. The job is read first: once it is
        finished no event is added, so the events read after it are all there will be."""
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.key_id == key_id)).one_or_none()
            if row is None:
                return None
            events = conn.execute(select(job_events.c.seq, job_events.c.payload).where(
                job_events.c.job_id == job_id, job_events.c.seq > after).order_by(job_events.c.seq)).all()
            last = conn.execute(select(func.max(job_events.c.seq)).where(job_events.c.job_id == job_id)).scalar()
        return Job.of(row), [(event.seq, event.payload) for event in events], last or 0

    def progress(self, job: Job) -> bytes | None:
        """The last progress event of the job's current run (GenerateImageEvent bytes), if any."""
        with self._read() as conn:
            return _progress(conn, job)

    def details(self, job_id: str, key_id: str) -> tuple[Job, int, list[Delivery], bytes | None] | None:
        """What GetJob reports, in one read: the key's job, its queue position (0 unless
        queued), its webhook deliveries and, while it runs, its last progress event."""
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id, jobs.c.key_id == key_id)).one_or_none()
            if row is None:
                return None
            job = Job.of(row)
            return (job, _position(conn, job) if job.status == "queued" else 0,
                    _deliveries(conn, job.id) if job.webhook_url else [],
                    _progress(conn, job) if job.status == "running" else None)

    # --- the runners' side -----------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Lease the next job to `owner` (module docstring), or None when none waits."""
        now = utcnow()
        other = jobs.alias("other")
        running = (
            select(func.count()).select_from(other)
            .where(other.c.key_id == jobs.c.key_id, other.c.status == "running")
            .scalar_subquery()
        )
        claimable = or_(jobs.c.status == "queued", and_(jobs.c.status == "running", jobs.c.lease_expires_at < now))
        with self.db.begin() as conn:
            row = conn.execute(
                select(jobs.c.id).where(claimable).order_by(running, jobs.c.created_at, jobs.c.id).limit(1)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if row is None:
                return None
            conn.execute(update(jobs).where(jobs.c.id == row.id).values(
                status="running", lease_owner=owner, lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                started_at=now, attempts=jobs.c.attempts + 1,
            ))
            return Job.of(conn.execute(select(jobs).where(jobs.c.id == row.id)).one())

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease; False when the job is no longer its to run (cancelled, or
        the lease ran out and another replica took it)."""
        now = utcnow()
        with self.db.begin() as conn:
            return conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == "running",
            ).values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))).rowcount == 1

    def succeed(self, job_id: str, owner: str, images: Sequence[bytes], content_type: str, usage: int, balance: int,
                results_ttl: float) -> bool:
        """Store the images and mark the job succeeded, if `owner` still holds it."""
        with self.db.begin() as conn:
            return self.succeed_in(conn, job_id, owner, images, content_type, usage, balance, results_ttl)

    def succeed_in(self, conn, job_id: str, owner: str, images: Sequence[bytes], content_type: str, usage: int, balance: int,
                   results_ttl: float) -> bool:
        """succeed() in the caller's transaction (the ledger's, so that the charge and the
        images are recorded together: t2i.billing.ledger.Ledger.commit_with)."""
        now = utcnow()
        held = conn.execute(update(jobs).where(
            jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == "running",
        ).values(
            status="succeeded", finished_at=now, lease_owner=None, lease_expires_at=None, usage=usage,
            balance=balance, image_count=len(images), content_type=content_type,
            results_expire_at=now + dt.timedelta(seconds=results_ttl),
        )).rowcount == 1
        if held:
            self.results.put(conn, job_id, images)
            _announce(conn, job_id)
        return held

    def add_events(self, owner: str, events: Sequence[tuple[str, int, str, bytes]]) -> None:
        """Append running jobs' events (job id, attempt, kind, GenerateImageEvent bytes) in one
        transaction, those of jobs `owner` still holds: a replica that lost a job adds nothing to
        another's run, nor after the end."""
        now = utcnow()
        job_ids = sorted({event[0] for event in events})
        with self.db.begin() as conn:
            held = set(conn.execute(select(jobs.c.id).where(
                jobs.c.id.in_(job_ids), jobs.c.lease_owner == owner, jobs.c.status == "running",
            ).order_by(jobs.c.id).with_for_update()).scalars())
            if not held:
                return
            last = dict(conn.execute(select(job_events.c.job_id, func.max(job_events.c.seq)).where(
                job_events.c.job_id.in_(held)).group_by(job_events.c.job_id)).all())
            rows = []
            for job_id, attempt, kind, payload in events:
                if job_id in held:
                    last[job_id] = last.get(job_id, 0) + 1
                    rows.append({"job_id": job_id, "seq": last[job_id], "attempt": attempt, "kind": kind,
                                 "payload": payload, "created_at": now})
            conn.execute(insert(job_events), rows)

    def fail(self, job_id: str, owner: str, status: str, message: str) -> bool:
        """Mark the job failed with the error a synchronous call would have answered."""
        now = utcnow()
        with self.db.begin() as conn:
            held = conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == "running",
            ).values(status="failed", finished_at=now, lease_owner=None, lease_expires_at=None, error_status=status,
                     error_message=message[:2000])).rowcount == 1
            if held:
                _announce(conn, job_id)
            return held

    def expire_queued(self, queue_ttl: float) -> list[Job]:
        """Queued jobs older than `queue_ttl` seconds become `expired` (never started: their
        price is the caller's to release). Returns them."""
        now = utcnow()
        with self.db.begin() as conn:
            rows = conn.execute(select(jobs).where(
                jobs.c.status == "queued", jobs.c.created_at < now - dt.timedelta(seconds=queue_ttl))
                .with_for_update(skip_locked=True)).all()
            if rows:
                conn.execute(update(jobs).where(jobs.c.id.in_([r.id for r in rows]), jobs.c.status == "queued")
                             .values(status="expired", finished_at=now))
        return [Job.of(row) for row in rows]

    # --- webhooks (t2i.jobs.webhooks) -----------------------------------------------------------

    def deliveries(self, job_id: str) -> list[Delivery]:
        with self._read() as conn:
            return _deliveries(conn, job_id)

    def claim_deliveries(self, limit: int, hold_seconds: float) -> list[Delivery]:
        """Deliveries due now, held for `hold_seconds` (an attempt's time) so that no other
        replica sends them meanwhile."""
        now = utcnow()
        with self.db.begin() as conn:
            rows = conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.status == "pending",
                                                 webhook_deliveries.c.next_attempt_at <= now)
                .order_by(webhook_deliveries.c.next_attempt_at).limit(limit).with_for_update(skip_locked=True)
            ).all()
            if rows:
                conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id.in_([r.id for r in rows]))
                             .values(next_attempt_at=now + dt.timedelta(seconds=hold_seconds)))
        return [Delivery.of(row) for row in rows]

    def record_attempt(self, delivery_id: str, status: int | None, error: str | None, delivered: bool,
                       next_attempt: dt.datetime | None) -> None:
        """One attempt's outcome: delivered, due again at `next_attempt`, or (None) given up."""
        now = utcnow()
        with self.db.begin() as conn:
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id).values(
                attempts=webhook_deliveries.c.attempts + 1, last_attempt_at=now, last_status=status,
                last_error=(error or "")[:500] or None,
                status="delivered" if delivered else "pending" if next_attempt is not None else "failed",
                next_attempt_at=next_attempt or now,
            ))

    def secret(self, key_id: str, rotate: bool = False) -> str:
        """The key's webhook signing secret, made on first use; `rotate` replaces it."""
        from .webhooks import new_secret

        if not rotate:  # the common case, without taking the write lock
            with self._read() as conn:
                current = conn.execute(select(webhook_secrets.c.secret).where(
                    webhook_secrets.c.key_id == key_id)).scalar_one_or_none()
            if current is not None:
                return current
        now = utcnow()
        with self.db.begin() as conn:
            current = conn.execute(select(webhook_secrets.c.secret).where(webhook_secrets.c.key_id == key_id)
                                   .with_for_update()).scalar_one_or_none()
            if current is not None and not rotate:
                return current
            secret = new_secret()
            if current is None:
                conn.execute(insert(webhook_secrets).values(key_id=key_id, secret=secret, created_at=now))
            else:
                conn.execute(update(webhook_secrets).where(webhook_secrets.c.key_id == key_id)
                             .values(secret=secret, created_at=now))
            return secret

    def expire_results(self, results_ttl: float) -> list[str]:
        """Delete the images of jobs whose results outlived their time to live; those jobs
        become `expired`. Their events go too, and those of jobs that failed or were cancelled
        more than `results_ttl` seconds ago: a job's events are kept as long as its results
        would be. Returns the ids of the jobs whose images were deleted."""
        now = utcnow()
        with self.db.begin() as conn:
            ids = conn.execute(select(jobs.c.id).where(
                jobs.c.status == "succeeded", jobs.c.results_expire_at < now)).scalars().all()
            if ids:
                self.results.delete(conn, ids)
                conn.execute(update(jobs).where(jobs.c.id.in_(ids)).values(status="expired", image_count=0))
            ended = select(jobs.c.id).where(jobs.c.status.in_(FINISHED), jobs.c.status != "succeeded",
                                            jobs.c.finished_at < now - dt.timedelta(seconds=results_ttl))
            conn.execute(delete(job_events).where(or_(job_events.c.job_id.in_(ids), job_events.c.job_id.in_(ended))))
        return list(ids)


def _deliveries(conn, job_id: str) -> list[Delivery]:
    rows = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)
                        .order_by(webhook_deliveries.c.created_at)).all()
    return [Delivery.of(row) for row in rows]


def _progress(conn, job: Job) -> bytes | None:
    return conn.execute(select(job_events.c.payload).where(
        job_events.c.job_id == job.id, job_events.c.attempt == job.attempts, job_events.c.kind == "progress",
    ).order_by(job_events.c.seq.desc()).limit(1)).scalar_one_or_none()


def _position(conn, job: Job) -> int:
    ahead = conn.execute(select(func.count()).select_from(jobs).where(
        jobs.c.status == "queued", jobs.c.created_at < job.created_at)).scalar_one()
    return ahead + 1


def _empty_preview() -> bytes:
    from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

    return pb.GenerateImageEvent(preview=pb.PreviewEvent()).SerializeToString()


def queued_event(position: int) -> bytes:
    """The first event of every job: queued, at this place in the jobs' queue."""
    from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

    return pb.GenerateImageEvent(queued=pb.QueuedEvent(position=position, ahead=position - 1)).SerializeToString()


def _announce(conn, job_id: str) -> None:
    """Queue the webhook of a job that just ended, in the transaction that ended it, if it asked
    for this event: its delivery is as durable as the job's new status."""
    from .webhooks import STATUS_EVENTS, payload

    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
    event = STATUS_EVENTS.get(row.status)
    if not row.webhook_url or event is None or event not in (row.webhook_events or "").split(","):
        return
    now = utcnow()
    conn.execute(insert(webhook_deliveries).values(
        id="msg_" + secrets.token_urlsafe(24), job_id=job_id, key_id=row.key_id, event=event, url=row.webhook_url,
        payload=payload(Job.of(row), event, now), status="pending", attempts=0, next_attempt_at=now, created_at=now,
    ))


EMPTY_PREVIEW = _empty_preview()

assert set(FINISHED) | {"queued", "running"} == set(JOB_STATUSES)
