"""Rate limiting, in-process and through real Redis (shared by replicas)."""

import asyncio
import uuid

import pytest

from t2i.billing.ratelimit import LocalLimiter, RedisLimiter, gcra
from t2i.billing.settings import BillingSettings, Tier
from t2i.errors import Unavailable

FAST = Tier(requests_per_minute=600, burst=3, max_concurrent=2)  # one request per 0.1 s, burst of 3


def test_gcra_allows_a_burst_then_one_per_interval():
    tat, decisions = 0.0, []
    for _ in range(4):
        decision, tat = gcra(tat, now=100.0, interval=1.0, burst=3)
        decisions.append(decision)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after == pytest.approx(1.0)
    later, _ = gcra(tat, now=101.0, interval=1.0, burst=3)
    assert later.allowed


@pytest.fixture(params=["local", "redis"])
def limiter(request):
    settings = BillingSettings(auth_failures_per_minute=600, auth_failure_burst=2)
    if request.param == "local":
        yield LocalLimiter(settings)
        return
    yield RedisLimiter(request.getfixturevalue("redis_url"), settings)


async def test_rate_limit_bursts_refuses_and_recovers(limiter):
    key = f"key_{uuid.uuid4().hex[:8]}"
    results = [await limiter.check_rate(key, FAST) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    refused = results[3]
    assert 0 < refused.retry_after <= 0.11
    assert refused.headers()["x-ratelimit-limit"] == "3" and refused.headers()["x-ratelimit-remaining"] == "0"
    await asyncio.sleep(refused.retry_after + 0.02)
    assert (await limiter.check_rate(key, FAST)).allowed
    assert (await limiter.check_rate(f"key_{uuid.uuid4().hex[:8]}", FAST)).allowed  # other keys unaffected


async def test_concurrency_slots(limiter):
    key = f"key_{uuid.uuid4().hex[:8]}"
    assert await limiter.acquire_slot(key, "a", FAST)
    assert await limiter.acquire_slot(key, "b", FAST)
    assert not await limiter.acquire_slot(key, "c", FAST)
    await limiter.release_slot(key, "a")
    assert await limiter.acquire_slot(key, "c", FAST)


async def test_failed_authentications_block_an_address(limiter):
    address = f"10.0.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    assert (await limiter.auth_blocked(address)).allowed
    for _ in range(3):
        await limiter.auth_failed(address)
    blocked = await limiter.auth_blocked(address)
    assert not blocked.allowed and blocked.retry_after > 0
    assert (await limiter.auth_blocked("192.0.2.1" + address[-2:])).allowed  # other addresses are fine
    await asyncio.sleep(blocked.retry_after + 0.05)
    assert (await limiter.auth_blocked(address)).allowed


async def test_redis_limits_are_shared_between_replicas(redis_url):
    settings = BillingSettings()
    first, second = RedisLimiter(redis_url, settings), RedisLimiter(redis_url, settings)
    key = f"key_{uuid.uuid4().hex[:8]}"
    allowed = [(await limiter.check_rate(key, FAST)).allowed for limiter in (first, second, first, second)]
    assert allowed == [True, True, True, False]
    assert await first.acquire_slot(key, "x", FAST) and await second.acquire_slot(key, "y", FAST)
    assert not await first.acquire_slot(key, "z", FAST)
    await first.close()
    await second.close()


async def test_unreachable_redis_fails_closed_by_default_with_a_clear_message():
    limiter = RedisLimiter("redis://:secret@127.0.0.1:1/0", BillingSettings())
    with pytest.raises(Unavailable) as error:
        await limiter.check_rate("key_x", FAST)
    message = str(error.value)
    assert "(Redis at redis://:***@127.0.0.1:1/0) cannot be reached" in message and "fail-closed" in message
    assert "secret" not in message
    await limiter.close()


async def test_unreachable_redis_can_fail_open():
    limiter = RedisLimiter("redis://127.0.0.1:1/0", BillingSettings(redis_failure_policy="fail-open"))
    assert (await limiter.check_rate("key_x", FAST)).allowed
    assert await limiter.acquire_slot("key_x", "s", FAST)
    assert (await limiter.auth_blocked("1.2.3.4")).allowed
    await limiter.close()
