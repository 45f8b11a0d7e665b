"""Jobs for the servicer: submit, report, cancel, list, images; and the money they move.

The billing interceptor authenticates every job call (the caller's key is `current_tenant`),
and for SubmitJob prices the request and reserves its price first, as for GenerateImage; the
reservation comes here as a `JobCharge` (`submitted_charge`, set in the call's context). This
module stores the job with it; the runner (runner.py) charges it when the images are stored.
Cancelling a queued or running job releases its price here. Without billing there is no
database and no key, so the job calls answer FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass

from ..errors import AlreadyProcessing, InvalidArgument, NotFound, Overloaded
from .store import JOB_STATUSES, DuplicateJob, Job, JobStore, QueueFull

log = logging.getLogger(__name__)

# The job calls' refusal without billing (the OpenAI adapter tells it apart by this text).
NO_BILLING = "jobs need the billing database"
# Jobs one key may watch at once on one replica (each watcher reads the database 4 times a second).
MAX_WATCHERS_PER_KEY = 16
DEFAULT_PAGE = 20
MAX_PAGE = 100
# How often a watcher (WatchJob) looks for a job's new events: about as often as a running job
# stores them (runner.EVENT_FLUSH_SECONDS).
WATCH_POLL_SECONDS = 0.25
# A queue full of one key's jobs empties at the engine's pace: retrying within a second rarely
# helps, and a client that waits this long is not hammering the ledger.
QUEUE_FULL_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class JobCharge:
    """What billing decided for a job being submitted: its price, reserved."""

    key_id: str
    cost: int
    reservation_id: str
    max_queued: int  # the key's tier's cap on queued jobs
    job_id: str  # made before the reservation, so that the journal names the job
    request: bytes  # the GenerateImageRequest as stored (deterministic bytes, webhook included)
    webhook_url: str | None = None  # checked by billing (t2i.jobs.webhooks.check_url)
    webhook_events: tuple[str, ...] = ()


submitted_charge: ContextVar[JobCharge | None] = ContextVar("submitted_charge", default=None)


class JobService:
    def __init__(self, store: JobStore, ledger) -> None:
        self.store = store
        self.ledger = ledger
        self.runner = None  # this replica's runner (runner.py), once billing started it
        self._watchers: dict[str, int] = {}  # key id -> its WatchJob calls on this replica

    async def check_room(self, key_id: str, max_queued: int) -> None:
        """Overloaded (429) when the key's queue is full: asked before its price is reserved
        (submit() asks again, in the transaction that queues the job)."""
        queued = await asyncio.to_thread(self.store.queued, key_id)
        if queued >= max_queued:
            raise Overloaded(f"{QueueFull(queued, max_queued)}; wait for some to start, or cancel some",
                             retry_after=QUEUE_FULL_RETRY_SECONDS)

    async def submit(self, charge: JobCharge) -> tuple[Job, int]:
        """The queued job and its position; Overloaded (429) when the key's queue is full."""
        try:
            job = await asyncio.to_thread(self.store.submit, charge.key_id, charge.request, charge.cost, charge.reservation_id,
                                          charge.max_queued, charge.job_id, charge.webhook_url, charge.webhook_events)
        except QueueFull as full:
            raise Overloaded(f"{full}; wait for some to start, or cancel some", retry_after=QUEUE_FULL_RETRY_SECONDS) from None
        except DuplicateJob:
            # Its twin with the same Idempotency-Key got in first: this one's price goes back,
            # and a retry finds that job.
            raise AlreadyProcessing("a job with the same Idempotency-Key is being submitted; retry to get it") from None
        return job, await asyncio.to_thread(self.store.position, job)

    async def get(self, key_id: str, job_id: str) -> tuple[Job, int, list, bytes | None]:
        """The job, its queue position (0 unless queued), its webhook deliveries and, while it
        runs, its last progress event (GenerateImageEvent bytes)."""
        found = await asyncio.to_thread(self.store.details, job_id, key_id)
        if found is None:
            raise NotFound(f"no job {job_id!r} of this API key")
        return found

    @contextlib.contextmanager
    def watching(self, key_id: str):
        """One more watcher of the key's jobs for the time of the block; Overloaded (429) past
        MAX_WATCHERS_PER_KEY on this replica."""
        if self._watchers.get(key_id, 0) >= MAX_WATCHERS_PER_KEY:
            raise Overloaded(f"this API key already follows {MAX_WATCHERS_PER_KEY} jobs at once on this replica, the "
                             "most it may; close a stream, or poll GET /jobs/{id}", retry_after=1.0)
        self._watchers[key_id] = self._watchers.get(key_id, 0) + 1
        try:
            yield
        finally:
            self._watchers[key_id] -= 1
            if not self._watchers[key_id]:
                del self._watchers[key_id]

    async def watch(self, key_id: str, job_id: str, after: int) -> AsyncIterator[tuple[int, bytes | Job]]:
        """The job's events numbered above `after`, as (number, GenerateImageEvent bytes), as
        they are stored, then (number, the ended job): the end, numbered one past the last event;
        nothing when `after` is the end already. Refusals (NotFound for another key's job, a bad
        `after`) come from this call, before the first event."""
        watched = await asyncio.to_thread(self.store.watch, job_id, key_id, after)
        if watched is None:
            raise NotFound(f"no job {job_id!r} of this API key")
        job, _, last = watched
        end = last + 1 if job.finished else last
        if not 0 <= after <= end:
            raise InvalidArgument("after (REST: Last-Event-ID)", after,
                                  f"must be the id of an event this job's stream sent: 0 (from the start) to {end}")
        return self._follow(key_id, job_id, after, watched)

    async def _follow(self, key_id: str, job_id: str, after: int, watched) -> AsyncIterator[tuple[int, bytes | Job]]:
        while True:
            if watched is None:
                return  # no longer there (jobs are not deleted today; defensive)
            job, events, last = watched
            for number, payload in events:
                yield number, payload
                after = number
            if job.finished:
                if after <= last:
                    yield last + 1, job
                return
            await asyncio.sleep(WATCH_POLL_SECONDS)
            watched = await asyncio.to_thread(self.store.watch, job_id, key_id, after)

    async def cancel(self, key_id: str, job_id: str) -> Job:
        cancelled = await asyncio.to_thread(self.store.cancel, job_id, key_id)
        if cancelled is None:
            raise NotFound(f"no job {job_id!r} of this API key")
        job, before = cancelled
        if before == "running" and self.runner is not None:
            self.runner.stop(job_id)  # if it runs here; elsewhere its runner sees it at its next renewal
        if before in ("queued", "running") and job.reservation_id:
            # Released here, whoever runs it: its runner stops at its next lease renewal and
            # never charges a job that is no longer running.
            await asyncio.to_thread(self.ledger.release, job.reservation_id, "job cancelled")
        return job

    async def list(self, key_id: str, status: str, cursor: str, page_size: int) -> tuple[list[Job], str]:
        if status and status not in JOB_STATUSES:
            raise InvalidArgument("status", status, "must be empty (all) or one of " + ", ".join(JOB_STATUSES))
        if not 0 <= page_size <= MAX_PAGE:
            raise InvalidArgument("pageSize", page_size, f"must be 1 to {MAX_PAGE} (0: {DEFAULT_PAGE})")
        limit = page_size or DEFAULT_PAGE
        found = await asyncio.to_thread(self.store.list, key_id, [status] if status else [], cursor or None, limit + 1)
        page = found[:limit]
        return page, page[-1].id if len(found) > limit else ""

    async def image(self, key_id: str, job_id: str, index: int) -> tuple[bytes, str]:
        found = await asyncio.to_thread(self.store.image, job_id, key_id, index)
        if found is None:
            job = await asyncio.to_thread(self.store.get, job_id, key_id)
            if job is None:
                raise NotFound(f"no job {job_id!r} of this API key")
            if job.status != "succeeded" or not job.image_count:
                raise NotFound(f"job {job_id!r} has no images to fetch: it is {job.status}"
                               + (" (its images were deleted)" if job.status in ("succeeded", "expired") else ""))
            raise NotFound(f"job {job_id!r} has images 0 to {job.image_count - 1}, not {index}")
        return found
