"""The billing interceptor: the only place in the server that knows about API keys and money.

For GenerateImage, in this order:
1. authenticate: the client address must not be blocked for failed authentications; a
   missing or unknown key is UNAUTHENTICATED, a revoked one PERMISSION_DENIED;
2. rate-limit: requests per minute with a burst, and concurrent requests, per key;
3. validate and price the request (nothing is reserved for a request that would be refused);
4. reserve the price (FAILED_PRECONDITION when the balance is short), or answer an idempotent
   retry from its stored result without charging again;
5. run the generation;
6. commit the reservation and fill stardust_usage / stardust_balance on success, or release
   it on any error, cancellation or deadline.
ListModels and ListLoras need a valid key and cost nothing. Health and reflection are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from .. import metrics, wire
from ..errors import InternalError, InvalidArgument, NotFound, PermissionDenied, ServiceError, Unauthenticated
from ..jobs import webhooks
from ..jobs.runner import JobRunner
from ..jobs.service import JobCharge, JobService, submitted_charge
from ..jobs.store import JobStore, idempotent_job_id, new_job_id
from ..logs import request_id_var
from ..server import convert
from ..server.catalog import ModelCatalog, checked_call
from ..server.interceptors import metadata_value, wrap_stream, wrap_unary
from ..server.status import failed_event
from ..settings import ServeSettings
from ..tenancy import Tenant, current_tenant
from . import pricing
from .addresses import client_address, parse_networks
from .group_commit import GroupCommitter
from .keycache import KeyCache
from .database import redact, unavailable_error
from .ledger import CommitOp, IdempotencyClaim, KeyRecord, Ledger, ReleaseOp, Replay, Reservation, ReservationExpired, ReserveOp, utcnow
from .ratelimit import LocalLimiter, RedisLimiter, refusal
from .settings import BillingSettings

log = logging.getLogger(__name__)

# Known keys are remembered this long, saving a database read per request. Revocation evicts
# them within a poll (revocation_poll_seconds), and a reservation refuses a revoked key anyway.
KEY_CACHE_SECONDS = 5.0
# The owner of jobs' reservations: no instance, so the instance sweeper leaves them to their
# expiry (a job outlives the replica that took it), and beyond the queue's time to live a job
# may run this long.
JOBS_OWNER = "jobs"
JOB_RUN_ALLOWANCE_SECONDS = 3600.0
# Jobs one replica holds at once, besides its synchronous calls, in batches: one running and the
# next waiting in the engine (engine.wants_work stops the claims once a batch waits).
JOB_BATCHES_PER_REPLICA = 2


@dataclass(frozen=True)
class Admitted:
    """A generation that passed authentication and the rate limits."""

    key: KeyRecord
    headers: dict[str, str]  # x-ratelimit-* for the response
    task: asyncio.Task


@dataclass(frozen=True)
class Charge:
    """A priced generation and its reservation (or, for an idempotent retry, its replay)."""

    model_id: int
    cost: int
    idempotent: bool
    request_id: str | None
    outcome: Reservation | Replay

    @property
    def reservation(self) -> Reservation:
        return self.outcome

    @property
    def replay(self) -> Replay | None:
        return self.outcome if isinstance(self.outcome, Replay) else None

    def replay_response(self) -> pb.GenerateImageResponse:
        response = pb.GenerateImageResponse.FromString(self.outcome.response)
        response.stardust_usage, response.stardust_balance = self.outcome.usage, self.outcome.balance
        return response


def api_key_of(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's API key: the x-illustrious-api-key metadata, or `Authorization: Bearer <key>`
    (what OpenAI's clients send). Both may be sent only with the same key; an Authorization of
    another scheme, or a Bearer without a key, is refused when it is the only credential
    (Unauthenticated naming what was wrong, never the key)."""
    header = metadata_value(context, wire.API_KEY_HEADER)
    authorization = metadata_value(context, wire.AUTHORIZATION_HEADER)
    if authorization is None:
        return header
    scheme, _, bearer = authorization.strip().partition(" ")
    bearer = bearer.strip()
    if scheme.lower() != wire.BEARER_SCHEME or not bearer:
        if header:
            return header  # another scheme (a proxy's, say) beside our own header: not ours to judge
        shown = scheme[:20] if scheme.isascii() and scheme.isalnum() else "?"
        raise Unauthenticated(
            f"unsupported Authorization header (scheme {shown!r}{'' if bearer else ', no credentials'}): "
            f"send Authorization: Bearer <API key>, or the key in the {wire.API_KEY_HEADER} header"
        )
    if header and header != bearer:
        raise Unauthenticated(
            f"the {wire.API_KEY_HEADER} header and Authorization: Bearer carry two different API keys: send one key"
        )
    return bearer


def default_instance_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


class BillingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, ledger: Ledger, limiter: LocalLimiter | RedisLimiter, settings: BillingSettings, catalog: ModelCatalog,
        instance_id: str | None = None, trusted_proxies: str = ServeSettings.trusted_proxies,
        webhook_allow: str = ServeSettings.webhook_allow,
    ) -> None:
        self.ledger = ledger
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.webhook_allow = webhooks.AllowList.parse(webhook_allow)
        self.limiter = limiter
        self.settings = settings
        self.catalog = catalog
        self.instance_id = instance_id or default_instance_id(0)
        self.started_at = utcnow()
        # Ledger calls block on the database; they get their own threads so a slow database
        # cannot starve other users of the default executor.
        self._db = ThreadPoolExecutor(8, thread_name_prefix="t2i-ledger")
        # Every reserve, commit and release goes through the group committer (one money path).
        self._money = GroupCommitter(ledger, where=redact(ledger.db.url.render_as_string(hide_password=False)))
        self._loops: list[asyncio.Task] = []
        self._keys = KeyCache(KEY_CACHE_SECONDS)
        # Requests in flight: their tasks per key (so revocation can stop them) and their
        # concurrency slots (whose leases are renewed while they run).
        self._inflight: dict[str, set[asyncio.Task]] = {}
        self._revoked: set[str] = set()
        self._slots: set[tuple[str, str]] = set()
        # Jobs: stored in this database, fed to the engine by the runner started with billing.
        self.job_store = JobStore(ledger.db)
        catalog.jobs = JobService(self.job_store, ledger)
        self.runner: JobRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Release what an earlier run left open, then, in the background: heartbeat and sweep,
        renew concurrency slots, and watch for revoked keys."""
        await self._call("heartbeat", self.ledger.heartbeat, self.instance_id, self.started_at)
        released = await self._call("sweep", self.ledger.sweep, self.instance_id, self.started_at, self.settings.instance_timeout_seconds)
        log.info("billing ready", extra={"instance": self.instance_id, "released_reservations": released})
        self._revocations_since = utcnow()
        self._loops = [
            asyncio.create_task(self._every(self.settings.heartbeat_seconds, self._heartbeat, "heartbeat")),
            # Renewals at a third of the lease at most, and failed releases retried every second.
            asyncio.create_task(self._every(min(1.0, self.settings.concurrency_slot_lease_seconds / 3), self._renew_slots, "slot leases")),
            asyncio.create_task(self._every(self.settings.revocation_poll_seconds, self._watch_revocations, "revocations")),
        ]
        self.runner = JobRunner(
            self.job_store, self.ledger, self.catalog, owner=self.instance_id, lease_seconds=self.settings.job_lease_seconds,
            results_ttl=self.settings.job_results_ttl_seconds, queue_ttl=self.settings.job_queue_ttl_seconds,
            max_batches=JOB_BATCHES_PER_REPLICA, weight_of=self._job_weight,
            webhook_allow=self.webhook_allow, first_retry=self.settings.webhook_first_retry_seconds,
        )
        self.runner.start()
        self.catalog.jobs.runner = self.runner

    @staticmethod
    async def _every(seconds: float, step, what: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except Exception:
                log.exception(f"billing maintenance ({what}) failed; will retry")

    async def _heartbeat(self) -> None:
        await self._call("heartbeat", self.ledger.heartbeat, self.instance_id, self.started_at)
        self._beats = getattr(self, "_beats", 0) + 1
        if self._beats % 3 == 0:
            released = await self._call(
                "sweep", self.ledger.sweep, self.instance_id, self.started_at, self.settings.instance_timeout_seconds
            )
            if released:
                log.warning("released abandoned reservations", extra={"count": released})

    async def _renew_slots(self) -> None:
        await self.limiter.maintain(set(self._slots))

    async def _watch_revocations(self) -> None:
        """Keys revoked anywhere (any replica, `t2i keys revoke`) stop working here within a
        poll: cached entries go, and the key's queued and running requests are stopped
        (answered PERMISSION_DENIED, released, not charged)."""
        # A margin for clocks that disagree between the machine that revoked and this one.
        since = self._revocations_since - dt.timedelta(seconds=30)
        self._revocations_since = utcnow()
        revoked = set(await self._call("revocations", self.ledger.revoked_since, since))
        if not revoked:
            return
        self._keys.evict(revoked)
        for key_id in revoked & set(self._inflight):
            tasks = self._inflight.get(key_id, set())
            log.info("stopping the requests of a revoked key", extra={"key_id": key_id, "requests": len(tasks)})
            self._revoked.add(key_id)
            for task in tasks:
                task.cancel()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
        for loop in self._loops:
            loop.cancel()
        await self.limiter.close()
        self._money.close()
        self._db.shutdown(wait=True)
        self.ledger.close()

    # --- interception --------------------------------------------------------------------------

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        if details.method == wire.GENERATE_METHOD:
            return wrap_unary(handler, self._generate)
        if details.method == wire.GENERATE_STREAM_METHOD:
            return wrap_stream(handler, self._generate_stream)
        if details.method in (wire.LIST_MODELS_METHOD, wire.LIST_LORAS_METHOD):
            return wrap_unary(handler, self._list_models)
        if details.method == wire.SUBMIT_JOB_METHOD:
            return wrap_unary(handler, self._submit_job)
        if details.method in wire.JOB_METHODS:
            return wrap_unary(handler, self._keyed)
        if details.method == wire.WATCH_JOB_METHOD:
            return wrap_stream(handler, self._keyed_stream)
        return handler

    # --- jobs (t2i.jobs) -------------------------------------------------------------------------

    async def _keyed(self, inner, request, context):
        """A job call on the caller's own jobs: a valid key, which the servicer reads as the tenant."""
        token = current_tenant.set(await self._caller(context))
        try:
            return await inner(request, context)
        finally:
            current_tenant.reset(token)

    async def _keyed_stream(self, inner, request, context):
        """WatchJob: as _keyed, for a stream."""
        token = current_tenant.set(await self._caller(context))
        try:
            async for message in inner(request, context):
                yield message
        finally:
            # A dropped stream is closed by the loop in another context, where reset() raises.
            with contextlib.suppress(ValueError):
                current_tenant.reset(token)

    async def _caller(self, context) -> Tenant:
        """A call that generates nothing (job calls, the lists): a valid key, from an address
        not blocked for failed authentications."""
        key, address = await self._authenticate(context)
        blocked = await self.limiter.address_blocked(address)
        if not blocked.allowed:
            metrics.RATE_LIMITED.labels(limit=blocked.verdict.value).inc()
            raise refusal(blocked)
        return Tenant(key.id, self._tier(key).weight)

    def _job_weight(self, key_id: str) -> float:
        """A claimed job's fair-share weight; PermissionDenied when its key was revoked since."""
        try:
            record = self.ledger.get_key(key_id)
        except NotFound:
            record = None
        if record is None or record.revoked:
            raise PermissionDenied("the API key that submitted this job was revoked; the job did not run, and its price "
                                   "was released")
        return self._tier(record).weight

    def _price(self, checked) -> int:
        """The price of a checked request (pricing.py), as it will run."""
        loaded = self.catalog.model(checked.params.model_id)
        return pricing.price(checked.params, loaded.spec.price_multiplier, loaded.sigma_table, self.settings,
                             checked.context_chunks)

    def _tier(self, key: KeyRecord):
        return self.settings.tiers.get(key.tier) or self.settings.tiers[self.settings.default_tier]

    async def _submit_job(self, inner, request, context):
        """SubmitJob: admitted and priced as GenerateImage is, its price reserved for as long as
        the job may wait and run (a queued job cannot overdraw); the runner charges it."""
        async with self._admitted(context) as admitted:
            params = convert.request_from_pb(request)
            webhook = params.webhook
            # The webhook is the job's: the generation is checked and priced without it.
            checked = self.catalog.check(dataclasses.replace(params, webhook=None))
            self.catalog.admission_check()
            events: tuple[str, ...] = ()
            if webhook is not None:
                events = webhooks.check_events(webhook.events)
                await asyncio.to_thread(webhooks.check_url, webhook.url, self.webhook_allow)
                await self._call("webhook secret", self.job_store.secret, admitted.key.id)  # signed from the start
            idempotency_key = self._idempotency_key(context)
            stored = request.SerializeToString(deterministic=True)  # the job's request, as kept and compared
            if idempotency_key is None:
                job_id = new_job_id()
            else:
                # A retry with the same Idempotency-Key finds its job instead of making another.
                job_id = idempotent_job_id(admitted.key.id, idempotency_key)
                existing = await self._call("job", self.job_store.get, job_id, admitted.key.id)
                if existing is not None:
                    if existing.request != stored:
                        raise InvalidArgument("idempotency-key", idempotency_key, "was used for a job with different "
                                              "request parameters; use a new key for a new request")
                    metrics.IDEMPOTENT_REPLAYS.inc()
                    await context.send_initial_metadata(tuple(admitted.headers.items()))
                    position = await self._call("job", self.job_store.position, existing)
                    return convert.job_to_pb(existing, position)
            await self.catalog.jobs.check_room(admitted.key.id, self._tier(admitted.key).max_queued_jobs)
            params = checked.params
            cost = self._price(checked)
            ttl = self.settings.job_queue_ttl_seconds + JOB_RUN_ALLOWANCE_SECONDS
            reservation = await self._timed("reserve", self._money.reserve(
                ReserveOp(admitted.key.id, cost, JOBS_OWNER, params.model_id, job_id, None, ttl)))
            charge = submitted_charge.set(
                JobCharge(admitted.key.id, cost, reservation.id, self._tier(admitted.key).max_queued_jobs, job_id, stored,
                          webhook.url if webhook is not None else None, events))
            try:
                response = await inner(request, context)
            except BaseException:
                self._release(Charge(params.model_id, cost, False, job_id, reservation), "job not queued")
                raise
            finally:
                submitted_charge.reset(charge)
            await context.send_initial_metadata(tuple(admitted.headers.items()))
        if self.runner is not None:
            self.runner.wake()
        return response

    async def _list_models(self, inner, request, context):
        await self._caller(context)
        return await inner(request, context)

    @contextlib.asynccontextmanager
    async def _admitted(self, context: grpc.aio.ServicerContext) -> AsyncIterator[Admitted]:
        """Authenticate and rate-limit a generation; while it runs, hold its concurrency slot
        and let revocation find its task."""
        key, address = await self._authenticate(context)
        tier = self._tier(key)
        # The slot is named by the server, never after anything the caller sends: calls sharing one
        # x-request-id must still take one slot each (a shared name would count them once).
        slot = uuid.uuid4().hex
        decision = await self.limiter.admit(address, key.id, tier, slot)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(limit=decision.verdict.value).inc()
            raise refusal(decision, key.id, tier)
        task = asyncio.current_task()
        self._slots.add((key.id, slot))
        self._inflight.setdefault(key.id, set()).add(task)
        tenant = current_tenant.set(Tenant(key.id, tier.weight))  # the engine's fair share follows the key
        try:
            yield Admitted(key, decision.headers(), task)
        finally:
            tasks = self._inflight.get(key.id, set())
            tasks.discard(task)
            if not tasks:
                self._inflight.pop(key.id, None)
                self._revoked.discard(key.id)
            self._slots.discard((key.id, slot))
            try:
                await self.limiter.release_slot(key.id, slot)
            finally:
                # Last: a stream dropped mid-write is closed by the loop in another context, where
                # reset() raises; by then the slot is already given back.
                current_tenant.reset(tenant)

    def _revocation(self, admitted: Admitted, charged: bool | None = False) -> PermissionDenied | None:
        """The error for a generation stopped because its key was revoked (None: the caller
        cancelled it); un-cancels the task, so the answer still goes out. `charged`: whether its
        charge was recorded (None: it was being recorded when the revocation came), for the
        message to say what happened to the money."""
        if admitted.key.id not in self._revoked:
            return None
        admitted.task.uncancel()
        if charged is None:
            outcome = ("it was stopped while its charge was being recorded; its image was not delivered, so it was not "
                       "charged (a charge already recorded is refunded)")
        elif charged:
            outcome = "its result had already been delivered and charged"
        else:
            outcome = "it was stopped and not charged"
        return PermissionDenied(f"API key {admitted.key.id} was revoked while this request was running; {outcome}")

    async def _reserve(self, request, context, key: KeyRecord) -> Charge:
        """Price the request and reserve its price (or find its idempotent replay). Everything
        that can refuse the request is asked first: a request the engine would refuse (bad
        field, shutting down, queue full) never reserves."""
        checked = self.catalog.check(convert.request_from_pb(request))
        checked_call.set((request, checked))  # the engine uses this check (server/catalog.py)
        self.catalog.admission_check()
        params = checked.params  # with a picture's own size filled in: what runs is what is priced
        cost = self._price(checked)
        claim = self._idempotency_claim(context, request)
        request_id = request_id_var.get()
        outcome = await self._timed("reserve", self._money.reserve(
            ReserveOp(key.id, cost, self.instance_id, params.model_id, request_id, claim)
        ))
        if isinstance(outcome, Reservation):
            metrics.STARDUST_RESERVED.labels(model=str(params.model_id)).inc(cost)
        else:
            metrics.IDEMPOTENT_REPLAYS.inc()
        return Charge(params.model_id, cost, claim is not None, request_id, outcome)

    async def _commit(self, charge: Charge, key: KeyRecord, response: pb.GenerateImageResponse) -> None:
        """Charge the reservation and fill the response's usage and balance. Raises when no
        charge could be recorded (the caller then withholds the image); never releases."""
        commit = CommitOp(charge.reservation, charge.model_id, charge.request_id,
                          response.SerializeToString() if charge.idempotent else None)
        try:
            # Shielded: once the image exists, a cancellation must not interrupt the charge.
            balance = await asyncio.shield(self._timed("commit", self._money.commit(commit)))
        except ReservationExpired:
            raise  # the sweeper released it after its time to live: nothing was charged
        except Exception:
            # No charge recorded means no image delivered; the caller may simply retry.
            log.exception("ledger commit failed", extra={"key_id": key.id})
            raise InternalError("the charge could not be recorded, so the image is withheld; nothing was charged") from None
        metrics.STARDUST_CHARGED.labels(model=str(charge.model_id)).inc(charge.cost)
        response.stardust_usage, response.stardust_balance = charge.cost, balance

    async def _generate(self, inner, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext):
        async with self._admitted(context) as admitted:
            charged: bool | None = False
            try:
                charge = await self._reserve(request, context, admitted.key)
                if charge.replay is not None:
                    await context.send_initial_metadata(tuple(admitted.headers.items()))
                    return charge.replay_response()
                try:
                    response = await inner(request, context)
                    charged = None  # a cancellation from here on may come after the charge is made
                    await self._commit(charge, admitted.key, response)
                    charged = True
                except BaseException:
                    # After a commit that did not answer (charged is None), a charge it made
                    # anyway is refunded: the image is not delivered.
                    self._release(charge, "generation failed or was cancelled", refund=charged is None)
                    raise
                await context.send_initial_metadata(tuple(admitted.headers.items()))
                return response
            except asyncio.CancelledError:
                revoked = self._revocation(admitted, charged)
                if revoked is None:
                    raise
                if charged:
                    return response  # charged before the revocation: the image is the caller's
                raise revoked from None

    async def _generate_stream(self, inner, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext):
        """The same money flow for GenerateImageStream: reserved before the first event,
        charged when the result event comes (whose usage and balance it fills), released on an
        error event, a failed charge, a disconnect or a revocation (then an error event)."""
        async with self._admitted(context) as admitted:
            charge = await self._reserve(request, context, admitted.key)
            await context.send_initial_metadata(tuple(admitted.headers.items()))
            if charge.replay is not None:
                yield pb.GenerateImageEvent(result=charge.replay_response())
                return
            charged: bool | None = False
            try:
                async for event in inner(request, context):
                    if event.WhichOneof("event") == "result":
                        charged = None  # a cancellation from here on may come after the charge is made
                        try:
                            await self._commit(charge, admitted.key, event.result)
                        except ServiceError as error:
                            # Still None: the commit did not answer, and the release refunds it if it landed.
                            yield convert.event_to_pb(failed_event(error))
                            return
                        charged = True
                    yield event
            except asyncio.CancelledError:
                revoked = self._revocation(admitted, charged)
                if revoked is None:
                    raise
                if not charged:  # after a result, the stream has had its one answer
                    yield convert.event_to_pb(failed_event(revoked))
            finally:
                if not charged:
                    self._release(charge, "generation failed or was cancelled", refund=charged is None)

    # --- pieces --------------------------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[KeyRecord, str]:
        address = client_address(context, self.trusted_proxies)
        try:
            key = api_key_of(context)
        except Unauthenticated:
            await self._auth_failed(address, "malformed")
            raise
        if not key:
            await self._auth_failed(address, "missing")
            raise Unauthenticated(
                f"missing API key: send it in the {wire.API_KEY_HEADER} header or as Authorization: Bearer <key>"
            )
        record = await self._find_key(key)
        if record is None:
            await self._auth_failed(address, "unknown")
            raise Unauthenticated("unknown API key")
        if record.revoked:
            await self._auth_failed(address, "revoked")
            raise PermissionDenied(f"API key {record.id} has been revoked")
        return record, address

    async def _find_key(self, key: str) -> KeyRecord | None:
        cached = self._keys.get(key)
        if cached is not None:
            return cached
        record = await self._call("find_key", self.ledger.find_key, key)
        if record is not None and not record.revoked:
            self._keys.put(key, record)
        return record

    async def _auth_failed(self, address: str, reason: str) -> None:
        """Count the failure against the address; once it is over its limit, refuse with 429
        instead of answering the guess."""
        metrics.AUTH_FAILURES.labels(reason=reason).inc()
        decision = await self.limiter.auth_failed(address)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(limit=decision.verdict.value).inc()
            raise refusal(decision)

    @staticmethod
    def _idempotency_key(context) -> str | None:
        value = metadata_value(context, wire.IDEMPOTENCY_HEADER)
        if not value:
            return None
        if len(value) > wire.MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument("idempotency-key", value, f"must be at most {wire.MAX_IDEMPOTENCY_KEY} characters")
        return value

    @classmethod
    def _idempotency_claim(cls, context, request: pb.GenerateImageRequest) -> IdempotencyClaim | None:
        value = cls._idempotency_key(context)
        if value is None:
            return None
        payload = request.SerializeToString(deterministic=True)
        return IdempotencyClaim(value, IdempotencyClaim.fingerprint_of(wire.GENERATE_METHOD, payload))

    def _release(self, charge: Charge, note: str, *, refund: bool = False) -> None:
        """Give the money back (with `refund`, even a commit that landed unacknowledged). Not
        awaited: the group committer retries it until it succeeds, whatever happens to this call."""
        reservation = charge.reservation

        def released(future) -> None:
            if not future.cancelled() and future.exception() is None and future.result():
                metrics.STARDUST_RELEASED.labels(model=str(charge.model_id)).inc(reservation.amount)

        self._money.release(ReleaseOp(reservation.id, note, refund)).add_done_callback(released)

    async def _call(self, operation: str, function, *args, **kwargs):
        """Run a ledger method in a worker thread, timed; an unreachable ledger is Unavailable."""
        loop = asyncio.get_running_loop()
        try:
            return await self._timed(operation, loop.run_in_executor(self._db, lambda: function(*args, **kwargs)))
        except Exception as error:
            unreachable = unavailable_error(error, self._money.where)
            if unreachable is None:
                raise
            log.error("the ledger cannot be reached", extra={"operation": operation, "error": str(error)[:300]})
            raise unreachable from None

    @staticmethod
    async def _timed(operation: str, awaitable):
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            metrics.LEDGER_LATENCY.labels(operation=operation).observe(time.perf_counter() - started)

