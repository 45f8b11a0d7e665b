"""The runner: feeds this replica's engine from the shared job queue.

It claims a job (store.claim) whenever fewer requests wait in the engine than a batch holds
(engine.wants_work) and it holds fewer jobs than `max_batches` of the engine's batches, so that jobs fill the engine's
next batch and the queue, not the edge, balances long and short work across replicas: a replica
takes no more than it can start soon, and the rest waits for whichever replica has room. A job
runs through the same engine path as GenerateImage (`engine.generate`, with the key as tenant:
fair sharing applies), while its lease is renewed every third of the lease time; when a renewal
fails (the job was cancelled, or this replica was too slow and another took it) the generation
is stopped at its next step.

Money: the reservation made at submission is committed (the charge) in the same database
transaction that stores the images and marks the job succeeded, and only if this replica still
holds the job (t2i.billing.ledger.Ledger.commit_with): the charge and what was paid for are
recorded together or not at all, so nothing is charged twice or without its images. A job
that fails releases its reservation. A job whose replica dies first is claimed again by another
replica once its lease runs out and runs from the start; its reservation stays open for it.

Watchers (GET /jobs/{id}/events, on any replica) read the job's events from the store: the
runner appends what the engine reports (queued, started, progress, previews) for all its running
jobs in one write at most every EVENT_FLUSH_SECONDS, and always before a job ends, so a job's
events are complete once its status says it ended (unless a write failed: logged, the job goes on).

A job whose key was revoked after it was submitted fails when it is claimed, as the key's
synchronous call would (PERMISSION_DENIED), and its price is released: nothing is charged to a
revoked key. One already running when the key is revoked finishes, like a synchronous call.

Also here, on every replica: queued jobs past their time to live expire (price released) and
stored results past theirs are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from ..billing.ledger import Reservation, utcnow
from ..domain import Queued
from ..errors import PermissionDenied, ServiceError
from ..server import convert
from ..server.status import failed_event
from . import webhooks
from .store import Job, JobStore

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often an idle runner looks for work
SWEEP_SECONDS = 30.0  # how often expired jobs and results are cleared
MAX_DELIVERIES = 16  # webhook attempts one replica makes at once
# How often a runner looks for webhook deliveries due (and right after one of its jobs ended):
# the look takes the database's write lock, which SQLite's ledger commits wait for.
DELIVERY_POLL_SECONDS = 1.0
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# A running job's events reach the database in one write at most this often (the engine throttles
# progress to a few a second; a job's watchers poll about as often).
EVENT_FLUSH_SECONDS = 0.5


class JobRunner:
    def __init__(self, store: JobStore, ledger, catalog, *, owner: str, lease_seconds: float, results_ttl: float,
                 queue_ttl: float, max_batches: int, weight_of, webhook_allow: webhooks.AllowList = webhooks.AllowList(),
                 first_retry: float | None = None) -> None:
        self.store, self.ledger, self.catalog = store, ledger, catalog
        self.owner = owner
        self.lease_seconds, self.results_ttl, self.queue_ttl = lease_seconds, results_ttl, queue_ttl
        self.max_batches = max_batches  # jobs held here at most: this many of the engine's batches
        # key id -> its tier's weight (fair shares); PermissionDenied when the key was revoked
        self.weight_of = weight_of
        self.running: set[asyncio.Task] = set()
        self._generations: dict[str, asyncio.Future] = {}  # job id -> its generation here
        self.webhook_allow, self.first_retry = webhook_allow, first_retry
        self.deliveries: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._ended = False  # a job ended since the last look for webhook deliveries
        self.events = Events(store, owner)
        self._flush_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())
        self._flush_task = asyncio.create_task(self.events.flush_every(EVENT_FLUSH_SECONDS))

    def stop(self, job_id: str) -> None:
        """The job was cancelled: if it runs here, stop it now (at its next step) rather than
        at its next lease renewal."""
        generation = self._generations.get(job_id)
        if generation is not None:
            generation.cancel()

    def wake(self) -> None:
        """A job was submitted on this replica: look now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop claiming and stop the running jobs; their leases run out and other replicas
        take them (or this one, restarted)."""
        for task in (self._loop_task, self._flush_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in [*self.running, *self.deliveries]:
            task.cancel()
        if self.running or self.deliveries:
            await asyncio.gather(*self.running, *self.deliveries, return_exceptions=True)

    def _has_room(self) -> bool:
        try:
            engine = self.catalog.engine()
        except ServiceError:
            return False  # still starting
        return len(self.running) < self.max_batches * engine.config.max_batch_size and engine.wants_work()

    def _job_ended(self, _task) -> None:
        self._ended = True
        self._wake.set()

    async def _loop(self) -> None:
        last_sweep = last_deliveries = 0.0
        while True:
            try:
                if time.monotonic() - last_sweep > SWEEP_SECONDS:
                    last_sweep = time.monotonic()
                    await self._sweep()
                while self._has_room():
                    job = await asyncio.to_thread(self.store.claim, self.owner, self.lease_seconds)
                    if job is None:
                        break
                    queued = asyncio.Event()
                    task = asyncio.create_task(self._run(job, queued))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)
                    task.add_done_callback(self._job_ended)  # room again, maybe a webhook: look now
                    # The next claim waits until this job is in the engine's queue (or over), so
                    # that the engine's own queue decides whether there is room for another.
                    waiting = asyncio.ensure_future(queued.wait())
                    await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                if len(self.deliveries) < MAX_DELIVERIES and (
                        self._ended or time.monotonic() - last_deliveries >= DELIVERY_POLL_SECONDS):
                    self._ended, last_deliveries = False, time.monotonic()
                    for delivery in await asyncio.to_thread(self.store.claim_deliveries, MAX_DELIVERIES - len(self.deliveries),
                                                            webhooks.DELIVERY_TIMEOUT_SECONDS * 2):
                        task = asyncio.create_task(self._deliver(delivery))
                        self.deliveries.add(task)
                        task.add_done_callback(self.deliveries.discard)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is unreachable, say: try again at the next poll
                log.exception("job runner: claiming failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _sweep(self) -> None:
        for job in await asyncio.to_thread(self.store.expire_queued, self.queue_ttl):
            if job.reservation_id:
                await asyncio.to_thread(self.ledger.release, job.reservation_id, "job expired in the queue")
        expired = await asyncio.to_thread(self.store.expire_results, self.results_ttl)
        if expired:
            log.info("job results expired", extra={"jobs": len(expired)})

    async def _run(self, job: Job, queued: asyncio.Event) -> None:
        engine = self.catalog.engine()
        # The webhook is the job's, not the generation's (validation refuses it on a generation).
        params = dataclasses.replace(convert.request_from_pb(pb.GenerateImageRequest.FromString(job.request)), webhook=None)
        try:
            weight = await asyncio.to_thread(self.weight_of, job.key_id)
        except PermissionDenied as revoked:
            queued.set()
            await self._failed(job, revoked)
            return
        except Exception:
            weight = 1.0  # the key's tier could not be read: an even share
        def event(happened) -> None:
            if isinstance(happened, Queued):
                # A job's `queued` is its place in the jobs' queue (its first event); its wait in
                # this engine's queue is short (the runner fills one batch ahead) and not stored.
                queued.set()
                return
            self.events.add(job, convert.event_to_pb(happened))

        generation = asyncio.ensure_future(engine.generate(
            params, request_id=job.id, tenant=job.key_id, weight=weight, events=event))
        self._generations[job.id] = generation
        renewal = asyncio.create_task(self._renew(job, generation))
        try:
            result = await generation
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this replica is stopping: the lease runs out, another takes the job
            log.info("job stopped: cancelled or taken over", extra={"job_id": job.id})
            return
        except ServiceError as error:
            await self.events.flush()
            await self._failed(job, error)
            return
        finally:
            renewal.cancel()
            self._generations.pop(job.id, None)
        await self.events.flush()
        content_type = CONTENT_TYPES.get(result.output_format or "png", "image/png")
        reservation = Reservation(job.reservation_id, job.key_id, job.cost)

        def store(conn, balance: int) -> bool:
            return self.store.succeed_in(conn, job.id, self.owner, result.images, content_type, job.cost, balance,
                                         self.results_ttl)

        try:
            balance = await asyncio.to_thread(self.ledger.commit_with, reservation, store, model_id=params.model_id,
                                              request_id=job.id)
        except Exception:
            log.exception("job result not recorded; the job runs again once its lease runs out", extra={"job_id": job.id})
            return
        if balance is None:
            log.info("job finished after it was cancelled or taken over; not charged", extra={"job_id": job.id})
            return
        log.info("job succeeded", extra={"job_id": job.id, "attempts": job.attempts, "stardust": job.cost})

    async def _deliver(self, delivery) -> None:
        """One attempt at a webhook event (t2i.jobs.webhooks): checked, signed, POSTed."""
        status, error = None, None
        try:
            await asyncio.to_thread(webhooks.check_url, delivery.url, self.webhook_allow)
            secret = await asyncio.to_thread(self.store.secret, delivery.key_id)
            headers = webhooks.signed_headers(secret, delivery.id, utcnow(), delivery.payload)
            status = await asyncio.to_thread(webhooks.post, delivery.url, headers, delivery.payload)
        except ServiceError as refused:  # the URL now resolves somewhere it may not go
            error = str(refused)
        except OSError as failed:
            error = f"{type(failed).__name__}: {failed}"
        delivered = status is not None and 200 <= status < 300
        next_attempt = None
        if not delivered:
            wait = webhooks.backoff(delivery.attempts + 1, self.first_retry)
            due = utcnow() + dt.timedelta(seconds=wait)
            if due - delivery.created_at <= webhooks.GIVE_UP_AFTER:
                next_attempt = due
        try:
            await asyncio.to_thread(self.store.record_attempt, delivery.id, status, error, delivered, next_attempt)
        except Exception:
            log.exception("webhook attempt not recorded; it is made again", extra={"delivery": delivery.id})
        log.info("webhook attempt", extra={"job_id": delivery.job_id, "event": delivery.event, "status": status,
                                           "error": error, "delivered": delivered})

    async def _renew(self, job: Job, generation: asyncio.Future) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                held = await asyncio.to_thread(self.store.renew, job.id, self.owner, self.lease_seconds)
            except Exception:
                log.exception("job lease renewal failed", extra={"job_id": job.id})
                continue  # the lease has two more thirds to go
            if not held:
                generation.cancel()  # stops at the next step; nothing is charged
                return

    async def _failed(self, job: Job, error: ServiceError) -> None:
        status = failed_event(error).status  # what GenerateImage would have answered
        if await asyncio.to_thread(self.store.fail, job.id, self.owner, status, str(error)):
            if job.reservation_id:
                await asyncio.to_thread(self.ledger.release, job.reservation_id, f"job failed: {status}")
        log.info("job failed", extra={"job_id": job.id, "status": status})


class Events:
    """The running jobs' events on their way to the store (watchers read them there): one write
    for all of them at a time, in order. A flush returns once everything pending when it was
    called is stored (writes are chained: each waits for the one before), so a job that flushes
    before it ends has all its events stored while it still holds its lease."""

    def __init__(self, store: JobStore, owner: str) -> None:
        self.store, self.owner = store, owner
        self.pending: list[tuple[str, int, str, bytes]] = []  # (job id, attempt, kind, event bytes)
        self._writing: asyncio.Future | None = None

    def add(self, job: Job, event: pb.GenerateImageEvent) -> None:
        self.pending.append((job.id, job.attempts, event.WhichOneof("event"), event.SerializeToString()))

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        previous = self._writing

        async def write() -> None:
            if previous is not None:
                await asyncio.wait({previous})
            if batch:
                try:
                    await asyncio.to_thread(self.store.add_events, self.owner, batch)
                except Exception:  # watchers miss these events; the jobs themselves go on
                    log.exception("job events not stored", extra={"events": len(batch)})

        self._writing = current = asyncio.ensure_future(write())
        await asyncio.shield(current)  # a cancelled caller leaves the write to finish

    async def flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush()
