"""Rate limiting, in-process and through real Redis (shared by replicas)."""

import asyncio
import uuid

import pytest

from t2i.billing.ratelimit import LocalLimiter, RedisLimiter, Verdict, gcra, refusal
from t2i.billing.settings import BillingSettings, Tier
from t2i.errors import Unavailable

FAST = Tier(requests_per_minute=600, burst=3, max_concurrent=2)  # one request per 0.1 s, burst of 3
ROOMY = Tier(requests_per_minute=60000, burst=1000, max_concurrent=2)


async def eventually_allowed(admit, timeout: float = 30) -> None:
    """Poll `admit()` until it is allowed (a refused attempt takes no token and no slot), for
    limits that recover with time; the timeout only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (await admit()).allowed:
        assert asyncio.get_running_loop().time() < deadline, f"still refused after {timeout} s"
        await asyncio.sleep(0.01)


def new_key() -> str:
    return f"key_{uuid.uuid4().hex[:8]}"


def new_address() -> str:
    n = uuid.uuid4().int
    return f"10.{n % 250}.{(n >> 8) % 250}.{(n >> 16) % 250}"


def test_gcra_allows_a_burst_then_one_per_interval():
    tat, results = 0.0, []
    for _ in range(4):
        allowed, tat, retry, reset, remaining = gcra(tat, now=100.0, interval=1.0, burst=3)
        results.append((allowed, retry, remaining))
    assert [r[0] for r in results] == [True, True, True, False]
    assert [r[2] for r in results[:3]] == [2, 1, 0]
    assert results[3][1] == pytest.approx(1.0)
    assert gcra(tat, now=101.0, interval=1.0, burst=3)[0]


@pytest.fixture(params=["local", "redis"])
def limiter(request):
    settings = BillingSettings(auth_failures_per_minute=600, auth_failure_burst=2)
    if request.param == "local":
        return LocalLimiter(settings)
    return RedisLimiter(request.getfixturevalue("redis_url"), settings)


async def test_rate_limit_bursts_refuses_and_recovers(limiter):
    key, address = new_key(), new_address()
    results = []
    for i in range(4):
        decision = await limiter.admit(address, key, FAST, f"slot-{i}")
        results.append(decision)
        await limiter.release_slot(key, f"slot-{i}")
    assert [r.verdict for r in results] == [Verdict.ALLOWED] * 3 + [Verdict.RATE]
    refused = results[3]
    assert 0 < refused.retry_after <= 0.11
    assert refused.headers()["x-ratelimit-limit"] == "3" and refused.headers()["x-ratelimit-remaining"] == "0"
    error = refusal(refused, key, FAST)
    assert str(error) == f"rate limit exceeded: 600 requests per minute (burst 3) for key {key}; retry in 1 s"
    await eventually_allowed(lambda: limiter.admit(address, key, FAST, "later"))
    assert (await limiter.admit(address, new_key(), FAST, "other")).allowed  # other keys unaffected


async def test_concurrency_slots(limiter):
    key, address = new_key(), new_address()
    assert (await limiter.admit(address, key, ROOMY, "a")).allowed
    assert (await limiter.admit(address, key, ROOMY, "b")).allowed
    third = await limiter.admit(address, key, ROOMY, "c")
    assert third.verdict is Verdict.CONCURRENCY and third.retry_after == 1.0
    assert "already has 2 requests in flight" in str(refusal(third, key, ROOMY))
    await limiter.release_slot(key, "a")
    assert (await limiter.admit(address, key, ROOMY, "c")).allowed


async def test_a_refused_request_takes_no_rate_token_and_no_slot(limiter):
    key, address = new_key(), new_address()
    tight = Tier(requests_per_minute=600, burst=2, max_concurrent=1)
    assert (await limiter.admit(address, key, tight, "a")).allowed
    assert (await limiter.admit(address, key, tight, "b")).verdict is Verdict.CONCURRENCY
    await limiter.release_slot(key, "a")
    # The refused attempt consumed nothing: one burst token is still there.
    assert (await limiter.admit(address, key, tight, "c")).allowed


async def test_failed_authentications_block_an_address(limiter):
    address, key = new_address(), new_key()
    assert (await limiter.address_blocked(address)).allowed
    verdicts = [(await limiter.auth_failed(address)).verdict for _ in range(3)]
    assert verdicts == [Verdict.ALLOWED, Verdict.ALLOWED, Verdict.ADDRESS_BLOCKED]
    blocked = await limiter.admit(address, key, ROOMY, "s")
    assert blocked.verdict is Verdict.ADDRESS_BLOCKED and blocked.retry_after > 0
    assert str(refusal(blocked)).startswith("rate limit exceeded: too many failed authentications from this address")
    assert (await limiter.admit(new_address(), key, ROOMY, "t")).allowed  # other addresses are fine
    await eventually_allowed(lambda: limiter.address_blocked(address))


async def test_redis_limits_are_shared_between_replicas(redis_url):
    settings = BillingSettings()
    first, second = RedisLimiter(redis_url, settings), RedisLimiter(redis_url, settings)
    key, address = new_key(), new_address()
    verdicts = []
    for i, limiter in enumerate((first, second, first, second)):
        verdicts.append((await limiter.admit(address, key, FAST, f"s{i}")).verdict)
        await limiter.release_slot(key, f"s{i}")
    assert verdicts == [Verdict.ALLOWED] * 3 + [Verdict.RATE]
    other = new_key()
    assert (await first.admit(address, other, ROOMY, "x")).allowed and (await second.admit(address, other, ROOMY, "y")).allowed
    assert (await first.admit(address, other, ROOMY, "z")).verdict is Verdict.CONCURRENCY
    await first.close()
    await second.close()


async def test_unreachable_redis_fails_closed_by_default_with_a_clear_message():
    limiter = RedisLimiter("redis://:secret@127.0.0.1:1/0", BillingSettings())
    with pytest.raises(Unavailable) as error:
        await limiter.admit("1.2.3.4", "key_x", FAST, "s")
    message = str(error.value)
    assert "(Redis at redis://:***@127.0.0.1:1/0) cannot be reached" in message and "fail-closed" in message
    assert "secret" not in message
    await limiter.close()


async def test_unreachable_redis_can_fail_open():
    limiter = RedisLimiter("redis://127.0.0.1:1/0", BillingSettings(redis_failure_policy="fail-open"))
    assert (await limiter.admit("1.2.3.4", "key_x", FAST, "s")).allowed
    assert (await limiter.auth_failed("1.2.3.4")).allowed
    await limiter.release_slot("key_x", "s")
    await limiter.close()
