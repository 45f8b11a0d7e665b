"""Rate limits: requests per minute with a burst (GCRA), concurrent requests per key, and
failed authentications per client address.

GCRA keeps one number per key, the theoretical arrival time (TAT). With an emission interval
T = 60 / requests_per_minute, a request at `now` is allowed when max(TAT, now) + T - now stays
within burst * T; it then becomes the new TAT. Two implementations with one interface:
in-process (the embedded default, one server) and Redis (atomic Lua scripts using Redis' own
clock, so every replica shares one limit).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from .. import metrics
from ..errors import RateLimited, Unavailable
from .settings import BillingSettings, Tier

log = logging.getLogger(__name__)

# A slot of the concurrency cap is forgotten after this long even if never released (a crashed
# replica cannot hold slots forever).
SLOT_LIFETIME = 900.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until a request would be allowed (0 if allowed)
    reset_after: float  # seconds until the burst is fully available again

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(self.remaining, 0)),
            "x-ratelimit-reset": str(math.ceil(self.reset_after)),
        }


def gcra(tat: float, now: float, interval: float, burst: int) -> tuple[Decision, float]:
    """One GCRA step: the decision and the TAT to store (unchanged when refused)."""
    new_tat = max(tat, now) + interval
    debt = new_tat - now
    if debt > burst * interval + 1e-9:
        current = max(tat, now) - now
        return Decision(False, burst, 0, debt - burst * interval, current), tat
    return Decision(True, burst, int((burst * interval - debt) // interval), 0.0, debt), new_tat


def rate_limited(what: str, decision: Decision) -> RateLimited:
    return RateLimited(
        f"rate limit exceeded: {what}; retry in {math.ceil(decision.retry_after)} s",
        retry_after=decision.retry_after,
        headers=decision.headers(),
    )


class LocalLimiter:
    """In-process limits: exact for one server, not shared between replicas."""

    def __init__(self, settings: BillingSettings) -> None:
        self.settings = settings
        self._tat: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}

    async def check_rate(self, key_id: str, tier: Tier) -> Decision:
        decision, self._tat[f"rate:{key_id}"] = gcra(
            self._tat.get(f"rate:{key_id}", 0.0), time.monotonic(), 60.0 / tier.requests_per_minute, tier.burst
        )
        return decision

    async def acquire_slot(self, key_id: str, slot: str, tier: Tier) -> bool:
        now = time.monotonic()
        slots = self._slots.setdefault(key_id, {})
        for stale in [s for s, at in slots.items() if now - at > SLOT_LIFETIME]:
            del slots[stale]
        if len(slots) >= tier.max_concurrent:
            return False
        slots[slot] = now
        return True

    async def release_slot(self, key_id: str, slot: str) -> None:
        self._slots.get(key_id, {}).pop(slot, None)

    async def auth_blocked(self, address: str) -> Decision:
        tat = self._tat.get(f"auth:{address}", 0.0)
        decision, _ = gcra(tat, time.monotonic(), *self._auth_params())
        return decision

    async def auth_failed(self, address: str) -> None:
        key = f"auth:{address}"
        now = time.monotonic()
        interval, burst = self._auth_params()
        # Failures always count, capped so that an attacker cannot push recovery out forever.
        self._tat[key] = min(max(self._tat.get(key, 0.0), now) + interval, now + (burst + 1) * interval)

    def _auth_params(self) -> tuple[float, int]:
        return 60.0 / self.settings.auth_failures_per_minute, self.settings.auth_failure_burst

    async def close(self) -> None:
        pass


# Redis scripts: every decision is one atomic script, timed by Redis' clock (TIME), so all
# replicas agree. Times in milliseconds.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local mode = ARGV[3]
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local debt = new_tat - now
if mode == 'record' then
  local capped = math.min(new_tat, now + (burst + 1) * interval)
  redis.call('SET', KEYS[1], capped, 'PX', math.ceil(capped - now) + 1000)
  return {1, 0, 0, 0}
end
if debt > burst * interval then
  return {0, debt - burst * interval, tat - now, 0}
end
if mode == 'take' then
  redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(debt) + 1000)
end
return {1, 0, debt, math.floor((burst * interval - debt) / interval)}
"""

_ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisLimiter:
    """Limits shared by every replica through Redis."""

    PREFIX = "t2i:ratelimit:"

    def __init__(self, url: str, settings: BillingSettings) -> None:
        import redis.asyncio as redis

        self.settings = settings
        self.url = url
        self.client = redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)
        self._gcra = self.client.register_script(_GCRA)
        self._acquire = self.client.register_script(_ACQUIRE_SLOT)

    async def check_rate(self, key_id: str, tier: Tier) -> Decision:
        return await self._run_gcra(f"rate:{key_id}", 60000.0 / tier.requests_per_minute, tier.burst, "take")

    async def acquire_slot(self, key_id: str, slot: str, tier: Tier) -> bool:
        keys = [self.PREFIX + f"slots:{key_id}"]
        acquired = await self._guarded(
            lambda: self._acquire(keys=keys, args=[slot, tier.max_concurrent, int(SLOT_LIFETIME * 1000)])
        )
        return acquired is None or bool(acquired)

    async def release_slot(self, key_id: str, slot: str) -> None:
        try:
            await self._guarded(lambda: self.client.zrem(self.PREFIX + f"slots:{key_id}", slot))
        except Unavailable:
            pass  # the slot expires on its own after SLOT_LIFETIME

    async def auth_blocked(self, address: str) -> Decision:
        return await self._run_gcra(f"auth:{address}", *self._auth_params(), "peek")

    async def auth_failed(self, address: str) -> None:
        await self._run_gcra(f"auth:{address}", *self._auth_params(), "record")

    def _auth_params(self) -> tuple[float, int]:
        return 60000.0 / self.settings.auth_failures_per_minute, self.settings.auth_failure_burst

    async def _run_gcra(self, name: str, interval_ms: float, burst: int, mode: str) -> Decision:
        result = await self._guarded(lambda: self._gcra(keys=[self.PREFIX + name], args=[interval_ms, burst, mode]))
        if result is None:  # fail-open
            return Decision(True, burst, burst, 0.0, 0.0)
        allowed, retry_ms, reset_ms, remaining = (float(v) for v in result)
        return Decision(bool(allowed), burst, int(remaining), retry_ms / 1000, reset_ms / 1000)

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
