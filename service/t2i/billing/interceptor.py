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
ListModels needs a valid key and costs nothing. Health and reflection are open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from .. import metrics
from ..errors import InternalError, InvalidArgument, PermissionDenied, Unauthenticated
from ..logs import request_id_var
from ..server import convert
from ..server.catalog import ModelCatalog
from ..server.interceptors import metadata_value, wrap_unary
from . import pricing
from .group_commit import GroupCommitter
from .ledger import CommitOp, IdempotencyClaim, KeyRecord, Ledger, Replay, Reservation, ReserveOp, utcnow
from .ratelimit import LocalLimiter, RedisLimiter, refusal
from .settings import BillingSettings

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TextToImageService"].full_name
GENERATE = f"/{SERVICE}/GenerateImage"
LIST_MODELS = f"/{SERVICE}/ListModels"
API_KEY_HEADER = "x-illustrious-api-key"
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 255
# Known keys are remembered this long, saving a database read per request. Revocation still
# takes effect at once for generation: the reservation refuses a revoked key.
KEY_CACHE_SECONDS = 5.0


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address: the last x-forwarded-for hop, else the peer.

    The edge appends the address of the peer it saw to whatever x-forwarded-for the client
    sent, so only the last hop is trustworthy; earlier ones are the client's to forge.
    """
    forwarded = metadata_value(context, "x-forwarded-for")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


def default_instance_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


class BillingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, ledger: Ledger, limiter: LocalLimiter | RedisLimiter, settings: BillingSettings, catalog: ModelCatalog,
        instance_id: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.limiter = limiter
        self.settings = settings
        self.catalog = catalog
        self.instance_id = instance_id or default_instance_id(0)
        self.started_at = utcnow()
        # Ledger calls block on the database; they get their own threads so a slow database
        # cannot starve other users of the default executor.
        self._db = ThreadPoolExecutor(8, thread_name_prefix="t2i-ledger")
        # Reserves and commits of concurrent requests share transactions (group commit).
        self._batched = GroupCommitter(ledger)
        self._maintenance: asyncio.Task | None = None
        self._known_keys: dict[str, tuple[KeyRecord, float]] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Release what an earlier run left open, then heartbeat and sweep in the background."""
        await self._call("heartbeat", self.ledger.heartbeat, self.instance_id, self.started_at)
        released = await self._call("sweep", self.ledger.sweep, self.instance_id, self.started_at, self.settings.instance_timeout_seconds)
        log.info("billing ready", extra={"instance": self.instance_id, "released_reservations": released})
        self._maintenance = asyncio.create_task(self._maintain())

    async def _maintain(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._call("heartbeat", self.ledger.heartbeat, self.instance_id, self.started_at)
                rounds += 1
                if rounds % 3 == 0:
                    released = await self._call(
                        "sweep", self.ledger.sweep, self.instance_id, self.started_at, self.settings.instance_timeout_seconds
                    )
                    if released:
                        log.warning("released abandoned reservations", extra={"count": released})
            except Exception:
                log.exception("billing maintenance failed; will retry")

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
        await self.limiter.close()
        self._batched.close()
        self._db.shutdown(wait=True)
        self.ledger.engine.dispose()

    # --- interception --------------------------------------------------------------------------

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        if details.method == GENERATE:
            return wrap_unary(handler, self._generate)
        if details.method == LIST_MODELS:
            return wrap_unary(handler, self._list_models)
        return handler

    async def _list_models(self, inner, request, context):
        _, address = await self._authenticate(context)
        blocked = await self.limiter.address_blocked(address)
        if not blocked.allowed:
            metrics.RATE_LIMITED.labels(limit=blocked.verdict.value).inc()
            raise refusal(blocked)
        return await inner(request, context)

    async def _generate(self, inner, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext):
        key, address = await self._authenticate(context)
        tier = self.settings.tiers.get(key.tier) or self.settings.tiers[self.settings.default_tier]
        slot = request_id_var.get() or uuid.uuid4().hex
        decision = await self.limiter.admit(address, key.id, tier, slot)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(limit=decision.verdict.value).inc()
            raise refusal(decision, key.id, tier)
        try:
            return await self._charged(inner, request, context, key, decision.headers())
        finally:
            await self.limiter.release_slot(key.id, slot)

    async def _charged(self, inner, request, context, key: KeyRecord, headers: dict[str, str]):
        params = convert.request_from_pb(request)
        self.catalog.check(params)
        model = str(params.model_id)
        cost = pricing.price(params, self.catalog.spec(params.model_id).price_multiplier, self.settings)
        claim = self._idempotency_claim(context, request)
        request_id = request_id_var.get()
        if claim is None:
            outcome = await self._timed("reserve", self._batched.reserve(
                ReserveOp(key.id, cost, self.instance_id, params.model_id, request_id)
            ))
        else:
            outcome = await self._call(
                "reserve", self.ledger.reserve, key.id, cost, owner=self.instance_id, model_id=params.model_id,
                request_id=request_id, idempotency=claim,
            )
        if isinstance(outcome, Replay):
            metrics.IDEMPOTENT_REPLAYS.inc()
            response = pb.GenerateImageResponse.FromString(outcome.response)
            response.stardust_usage, response.stardust_balance = outcome.usage, outcome.balance
            return response
        reservation: Reservation = outcome
        metrics.STARDUST_RESERVED.labels(model=model).inc(cost)
        try:
            response = await inner(request, context)
        except BaseException:
            await self._release(reservation, model, "generation failed or was cancelled")
            raise
        try:
            # Shielded: once the image exists, a cancellation must not interrupt the charge.
            if claim is None:
                charge = self._timed("commit", self._batched.commit(CommitOp(reservation, params.model_id, request_id)))
            else:
                charge = self._call(
                    "commit", self.ledger.commit, reservation, model_id=params.model_id, request_id=request_id,
                    idempotent_response=response.SerializeToString(),
                )
            balance = await asyncio.shield(charge)
        except InternalError:
            raise  # the reservation was already resolved (it expired): nothing was charged
        except Exception:
            # No charge recorded means no image delivered; the caller may simply retry.
            log.exception("ledger commit failed", extra={"key_id": key.id})
            await self._release(reservation, model, "the charge could not be recorded")
            raise InternalError("the charge could not be recorded, so the image is withheld; nothing was charged") from None
        metrics.STARDUST_CHARGED.labels(model=model).inc(cost)
        response.stardust_usage = cost
        response.stardust_balance = balance
        await context.send_initial_metadata(tuple(headers.items()))
        return response

    # --- pieces --------------------------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[KeyRecord, str]:
        address = client_address(context)
        key = metadata_value(context, API_KEY_HEADER)
        if not key:
            await self._auth_failed(address, "missing")
            raise Unauthenticated(f"missing API key: send it in the {API_KEY_HEADER} header")
        record = await self._find_key(key)
        if record is None:
            await self._auth_failed(address, "unknown")
            raise Unauthenticated("unknown API key")
        if record.revoked:
            await self._auth_failed(address, "revoked")
            raise PermissionDenied(f"API key {record.id} has been revoked")
        return record, address

    async def _find_key(self, key: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._known_keys.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        record = await self._call("find_key", self.ledger.find_key, key)
        if record is not None and not record.revoked:
            if len(self._known_keys) > 10_000:
                self._known_keys.clear()
            self._known_keys[key] = (record, now + KEY_CACHE_SECONDS)
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
    def _idempotency_claim(context, request: pb.GenerateImageRequest) -> IdempotencyClaim | None:
        value = metadata_value(context, IDEMPOTENCY_HEADER)
        if not value:
            return None
        if len(value) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument("idempotency-key", value, f"must be at most {MAX_IDEMPOTENCY_KEY} characters")
        payload = request.SerializeToString(deterministic=True)
        return IdempotencyClaim(value, IdempotencyClaim.fingerprint_of(GENERATE, payload))

    async def _release(self, reservation: Reservation, model: str, note: str) -> None:
        # Shielded: a cancelled call must still give the money back.
        released = await asyncio.shield(self._call("release", self.ledger.release, reservation.id, note))
        if released:
            metrics.STARDUST_RELEASED.labels(model=model).inc(reservation.amount)

    async def _call(self, operation: str, function, *args, **kwargs):
        """Run a ledger method in a worker thread, timed."""
        loop = asyncio.get_running_loop()
        return await self._timed(operation, loop.run_in_executor(self._db, lambda: function(*args, **kwargs)))

    @staticmethod
    async def _timed(operation: str, awaitable):
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            metrics.LEDGER_LATENCY.labels(operation=operation).observe(time.perf_counter() - started)

