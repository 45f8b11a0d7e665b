"""Rate limits: requests per minute with a burst (GCRA), concurrent requests per key, and
failed authentications per client address.

GCRA keeps one number per key, the theoretical arrival time (TAT). With an emission interval
T = 60 / requests_per_minute, a request at `now` is allowed when max(TAT, now) + T - now stays
within burst * T; it then becomes the new TAT.

Two implementations with one interface: in-process (the embedded default, one server) and
Redis (one atomic Lua script per decision, on Redis' own clock, so every replica shares one
limit). A request with a valid key costs one decision (`admit`: address not blocked, rate,
concurrency slot, all or nothing) and one `release_slot`; a failed authentication costs one
`auth_failed`, which also says whether the address is now blocked.

A concurrency slot is a lease, not a promise: it expires `slot_lease` seconds after it was
last renewed. `maintain()`, which the billing interceptor calls every third of a lease,
renews the slots of the requests still running and retries releases that failed, so a slot
never outlives its request by more than a lease, even if Redis vanished at the moment of the
release (a Redis blip once left every slot of a key taken for 15 minutes).
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
import inspect
import logging
import math
import time
from dataclasses import dataclass

from .. import metrics
from ..errors import RateLimited, Unavailable
from .settings import BillingSettings, Tier

log = logging.getLogger(__name__)

# The in-process limiter forgets at most this many client addresses (least recently seen first):
# its table of failed authentications must not grow with every address that ever called.
MAX_TRACKED_ADDRESSES = 100_000


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    ADDRESS_BLOCKED = "auth_failures"  # too many failed authentications from the address
    RATE = "rate"  # requests per minute
    CONCURRENCY = "concurrency"  # requests in flight


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    limit: int
    remaining: int
    retry_after: float  # seconds until a request would be allowed (0 if allowed)
    reset_after: float  # seconds until the burst is fully available again

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOWED

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(self.remaining, 0)),
            "x-ratelimit-reset": str(math.ceil(self.reset_after)),
        }


def gcra(tat: float, now: float, interval: float, burst: int) -> tuple[bool, float, float, float, int]:
    """One GCRA step: (allowed, TAT to store, retry_after, reset_after, remaining)."""
    new_tat = max(tat, now) + interval
    debt = new_tat - now
    if debt > burst * interval + 1e-9:
        return False, tat, debt - burst * interval, max(tat, now) - now, 0
    return True, new_tat, 0.0, debt, int((burst * interval - debt + 1e-9) // interval)


class LocalLimiter:
    """In-process limits: exact for one server, not shared between replicas."""

    def __init__(self, settings: BillingSettings) -> None:
        self.settings = settings
        self._tat: dict[str, float] = {}
        self._auth: OrderedDict[str, float] = OrderedDict()  # address -> TAT, least recent first
        self._slots: dict[str, dict[str, float]] = {}  # key -> slot -> lease expiry

    async def admit(self, address: str, key_id: str, tier: Tier, slot: str) -> Decision:
        now = time.monotonic()
        interval, burst = self._auth_params()
        allowed, _, retry, reset, _ = gcra(self._auth.get(address, 0.0), now, interval, burst)
        if not allowed:
            return Decision(Verdict.ADDRESS_BLOCKED, burst, 0, retry, reset)
        rate_interval = 60.0 / tier.requests_per_minute
        allowed, tat, retry, reset, remaining = gcra(self._tat.get(key_id, 0.0), now, rate_interval, tier.burst)
        if not allowed:
            return Decision(Verdict.RATE, tier.burst, 0, retry, reset)
        slots = self._slots.setdefault(key_id, {})
        for stale in [s for s, expiry in slots.items() if expiry <= now]:
            del slots[stale]
        if len(slots) >= tier.max_concurrent:
            return Decision(Verdict.CONCURRENCY, tier.burst, remaining, 1.0, reset)
        slots[slot] = now + self.settings.concurrency_slot_lease_seconds
        self._tat[key_id] = tat
        return Decision(Verdict.ALLOWED, tier.burst, remaining, 0.0, reset)

    async def release_slot(self, key_id: str, slot: str) -> None:
        slots = self._slots.get(key_id, {})
        slots.pop(slot, None)
        if not slots:
            self._slots.pop(key_id, None)

    async def maintain(self, live: set[tuple[str, str]]) -> None:
        expiry = time.monotonic() + self.settings.concurrency_slot_lease_seconds
        for key_id, slot in live:
            slots = self._slots.get(key_id)
            if slots is not None and slot in slots:
                slots[slot] = expiry

    async def address_blocked(self, address: str) -> Decision:
        interval, burst = self._auth_params()
        allowed, _, retry, reset, remaining = gcra(self._auth.get(address, 0.0), time.monotonic(), interval, burst)
        return Decision(Verdict.ALLOWED if allowed else Verdict.ADDRESS_BLOCKED, burst, remaining, retry, reset)

    async def auth_failed(self, address: str) -> Decision:
        """Count a failed authentication; the decision says whether the address was blocked."""
        now = time.monotonic()
        interval, burst = self._auth_params()
        tat = self._auth.get(address, 0.0)
        allowed, _, retry, reset, remaining = gcra(tat, now, interval, burst)
        # Failures always count, capped so that an attacker cannot push recovery out forever.
        self._auth[address] = min(max(tat, now) + interval, now + (burst + 1) * interval)
        self._auth.move_to_end(address)
        while len(self._auth) > MAX_TRACKED_ADDRESSES:
            self._auth.popitem(last=False)
        return Decision(Verdict.ALLOWED if allowed else Verdict.ADDRESS_BLOCKED, burst, remaining, retry, reset)

    def _auth_params(self) -> tuple[float, int]:
        return 60.0 / self.settings.auth_failures_per_minute, self.settings.auth_failure_burst

    async def close(self) -> None:
        pass


# Redis scripts, times in milliseconds from Redis' TIME so that all replicas agree.
_PREAMBLE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local function debt_of(key, interval)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  return tat, tat + interval - now
end
"""

# KEYS: auth, rate, slots. ARGV: auth interval, auth burst, rate interval, rate burst, slot,
# max concurrent, slot lease. Returns {verdict, retry ms, reset ms, remaining}; verdict
# 0 allowed, 1 address blocked, 2 rate, 3 concurrency. Nothing is taken unless all pass.
# A slot's score is the end of its lease: expired slots are dropped before counting.
_ADMIT = _PREAMBLE + """
local auth_interval, auth_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local atat, adebt = debt_of(KEYS[1], auth_interval)
if adebt > auth_burst * auth_interval then
  return {1, adebt - auth_burst * auth_interval, atat - now, 0}
end
local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat, debt = debt_of(KEYS[2], interval)
if debt > burst * interval then
  return {2, debt - burst * interval, tat - now, 0}
end
local remaining = math.floor((burst * interval - debt) / interval)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
  return {3, 1000, debt, remaining}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), ARGV[5])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[7]))
redis.call('SET', KEYS[2], tat + interval, 'PX', math.ceil(debt) + 1000)
return {0, 0, debt, remaining}
"""

# KEYS: auth. ARGV: interval, burst, record (1 or 0). Returns {verdict, retry, reset, remaining}.
_AUTH = _PREAMBLE + """
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat, debt = debt_of(KEYS[1], interval)
if ARGV[3] == '1' then
  local capped = math.min(tat + interval, now + (burst + 1) * interval)
  redis.call('SET', KEYS[1], capped, 'PX', math.ceil(capped - now) + 1000)
end
if debt > burst * interval then
  return {1, debt - burst * interval, tat - now, 0}
end
return {0, 0, debt, math.floor((burst * interval - debt) / interval)}
"""

# KEYS: slot sets. ARGV: lease ms, then for each key its slot. Extends each listed slot that
# still exists to now + lease (XX: a released or expired slot is not brought back).
_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
"""

_VERDICTS = [Verdict.ALLOWED, Verdict.ADDRESS_BLOCKED, Verdict.RATE, Verdict.CONCURRENCY]


class _Coalescer:
    """Redis calls made in the same event-loop turn travel together in one pipeline (one round
    trip, one parse), much as the ledger's group commit shares transactions."""

    def __init__(self, client) -> None:
        self.client = client
        self.pending: list[tuple] = []
        self._flushes: set[asyncio.Task] = set()  # referenced until done, so none is collected mid-way

    async def call(self, add):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.pending:
            loop.call_soon(self._start_flush)
        self.pending.append((add, future))
        return await future

    def _start_flush(self) -> None:
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        pipeline = self.client.pipeline(transaction=False)
        try:
            for add, _ in batch:
                queued = add(pipeline)  # scripts queue through a coroutine, plain commands directly
                if inspect.isawaitable(queued):
                    await queued
            results = await pipeline.execute(raise_on_error=False)
            if len(results) != len(batch):
                raise RuntimeError(f"redis pipeline answered {len(results)} of {len(batch)} calls")
        except Exception as error:
            results = [error] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class RedisLimiter:
    """Limits shared by every replica through Redis."""

    PREFIX = "t2i:ratelimit:"

    def __init__(self, url: str, settings: BillingSettings) -> None:
        import redis.asyncio as redis

        self.settings = settings
        self.url = url
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # A pooled connection that broke while Redis was away is replaced on its first use
        # (one reconnect) instead of failing the first requests after Redis is back.
        self.client = redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._admit = self.client.register_script(_ADMIT)
        self._auth = self.client.register_script(_AUTH)
        self._renew = self.client.register_script(_RENEW)
        self._calls = _Coalescer(self.client)
        self._unreleased: set[tuple[str, str]] = set()  # releases that failed, retried by maintain()
        self._releasing: set[asyncio.Task] = set()  # first tries of those releases, referenced until done

    async def admit(self, address: str, key_id: str, tier: Tier, slot: str) -> Decision:
        keys = [self.PREFIX + f"auth:{address}", self.PREFIX + f"rate:{key_id}", self.PREFIX + f"slots:{key_id}"]
        args = [*self._auth_params(), 60000.0 / tier.requests_per_minute, tier.burst, slot, tier.max_concurrent,
                self._lease_ms()]
        try:
            result = await self._guarded(lambda: self._calls.call(lambda p: self._admit(keys=keys, args=args, client=p)))
        except BaseException:
            # Redis may have run the script, and taken the slot, before its answer was lost. The
            # call will not run, so the slot goes now, or at the first maintain() that reaches
            # Redis, instead of blocking the key until its lease ends.
            self._release_later(key_id, slot)
            raise
        limit = self.settings.auth_failure_burst if result and int(result[0]) == 1 else tier.burst
        return self._decision(result, limit)

    async def release_slot(self, key_id: str, slot: str) -> None:
        try:
            await self._zrem(key_id, slot)
        except Exception as error:  # retried by maintain(); the lease ends it anyway
            log.warning("could not release a concurrency slot; will retry", extra={"key_id": key_id, "error": str(error)[:200]})
            self._unreleased.add((key_id, slot))

    def _release_later(self, key_id: str, slot: str) -> None:
        self._unreleased.add((key_id, slot))  # maintain() retries it until Redis answers
        task = asyncio.ensure_future(self._zrem(key_id, slot))
        self._releasing.add(task)

        def done(task: asyncio.Task) -> None:
            self._releasing.discard(task)
            if not task.cancelled() and task.exception() is None:
                self._unreleased.discard((key_id, slot))

        task.add_done_callback(done)

    async def _zrem(self, key_id: str, slot: str) -> None:
        await self._calls.call(lambda p: p.zrem(self.PREFIX + f"slots:{key_id}", slot))

    async def maintain(self, live: set[tuple[str, str]]) -> None:
        """Renew the leases of the slots still in use and retry failed releases (one round trip
        each, all slots together). Errors are logged: the next round tries again."""
        for key_id, slot in list(self._unreleased):
            try:
                await self._zrem(key_id, slot)
                self._unreleased.discard((key_id, slot))
            except Exception:
                break  # Redis is still away; the next round retries
        if not live:
            return
        ordered = sorted(live)
        keys = [self.PREFIX + f"slots:{key_id}" for key_id, _ in ordered]
        args = [self._lease_ms(), *(slot for _, slot in ordered)]
        try:
            await self._calls.call(lambda p: self._renew(keys=keys, args=args, client=p))
        except Exception as error:
            metrics.RATE_LIMITER_ERRORS.inc()
            log.warning("could not renew concurrency slots", extra={"slots": len(ordered), "error": str(error)[:200]})

    def _lease_ms(self) -> int:
        return int(self.settings.concurrency_slot_lease_seconds * 1000)

    async def address_blocked(self, address: str) -> Decision:
        return await self._auth_call(address, record=False)

    async def auth_failed(self, address: str) -> Decision:
        return await self._auth_call(address, record=True)

    async def _auth_call(self, address: str, record: bool) -> Decision:
        keys, args = [self.PREFIX + f"auth:{address}"], [*self._auth_params(), "1" if record else "0"]
        result = await self._guarded(lambda: self._calls.call(lambda p: self._auth(keys=keys, args=args, client=p)))
        return self._decision(result, self.settings.auth_failure_burst)

    def _auth_params(self) -> tuple[float, int]:
        return 60000.0 / self.settings.auth_failures_per_minute, self.settings.auth_failure_burst

    @staticmethod
    def _decision(result, limit: int) -> Decision:
        if result is None:  # Redis unreachable and the policy is fail-open
            return Decision(Verdict.ALLOWED, limit, limit, 0.0, 0.0)
        verdict, retry_ms, reset_ms, remaining = (float(v) for v in result)
        return Decision(_VERDICTS[int(verdict)], limit, int(remaining), retry_ms / 1000, reset_ms / 1000)

    async def _guarded(self, call):
        """Run one Redis call; when Redis is unreachable apply the failure policy: None means
        "allow" (fail-open), Unavailable means "refuse" (fail-closed)."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            metrics.RATE_LIMITER_ERRORS.inc()
            where = _redacted(self.url)
            if self.settings.redis_failure_policy == "fail-open":
                log.warning("rate limiter unreachable; allowing the request (fail-open)", extra={"redis": where, "error": str(error)})
                return None
            log.error("rate limiter unreachable; refusing the request (fail-closed)", extra={"redis": where, "error": str(error)})
            raise Unavailable(
                f"the rate limiter (Redis at {where}) cannot be reached, so requests are refused "
                "(redis_failure_policy: fail-closed); try again shortly"
            ) from None

    async def close(self) -> None:
        await self.client.aclose()


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def create_limiter(redis_url: str | None, settings: BillingSettings) -> LocalLimiter | RedisLimiter:
    return RedisLimiter(redis_url, settings) if redis_url else LocalLimiter(settings)


def refusal(decision: Decision, key_id: str | None = None, tier: Tier | None = None) -> RateLimited:
    """The RESOURCE_EXHAUSTED error for a refused decision, with Retry-After and limit headers."""
    retry = max(1, math.ceil(decision.retry_after))
    if decision.verdict is Verdict.ADDRESS_BLOCKED:
        what = "too many failed authentications from this address"
    elif decision.verdict is Verdict.RATE:
        what = f"{tier.requests_per_minute:g} requests per minute (burst {tier.burst}) for key {key_id}"
    else:
        what = f"key {key_id} already has {tier.max_concurrent} requests in flight, the most it may have"
    return RateLimited(f"rate limit exceeded: {what}; retry in {retry} s", retry_after=decision.retry_after, headers=decision.headers())
