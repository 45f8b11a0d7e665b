"""Faults inside the engine: each fails exactly the requests it concerns, the loop never dies
silently, and a broken device makes the engine give up (so the process is replaced)."""

import asyncio

import pytest

from t2i.domain import GenerateRequest
from t2i.engine.engine import AsyncEngine
from t2i.errors import InternalError, Unavailable
from t2i.sampling import samplers
from t2i.settings import EngineConfig

from testbed.gate import Gate

from ..support.faults import Faults, InjectedFault, faulty, with_faulty_unet

SMALL = dict(model_id=1, prompt="1girl", negative_prompt="", height=64, width=64, steps=3, cfg_scale=5.0,
             sampler="euler", scheduler="normal")


def params(seed: int, **overrides) -> GenerateRequest:
    return GenerateRequest(seed=seed, **{**SMALL, **overrides})


class Health:
    """Records what the engine reports about its health."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.events: list[tuple[bool, str]] = []
        engine.on_health(lambda serving, reason: self.events.append((serving, reason)))


async def started(model, **config) -> tuple[AsyncEngine, Health]:
    engine = AsyncEngine({1: model}, EngineConfig(**{"admission_window_ms": 20, **config}))
    health = Health(engine)
    engine.start()
    return engine, health


async def until(condition, timeout: float = 60, what: str = "") -> None:
    """Poll `condition()` on the loop; the timeout only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def outcomes(engine: AsyncEngine, requests: list[GenerateRequest]) -> list:
    return await asyncio.wait_for(
        asyncio.gather(*(engine.generate(p) for p in requests), return_exceptions=True), timeout=120
    )


async def test_a_failed_unet_forward_fails_its_batch_only_and_the_engine_serves_on(demo_model):
    faults = Faults(once=1)
    # Batches of exactly two, formed by count, never by timing: the admission window waits until
    # two requests are waiting (however slowly the second arrives), so the failed forward holds both.
    engine, health = await started(with_faulty_unet(demo_model, faults), max_batch_size=2,
                                   admission_window_ms=600_000, admission_gap_ms=600_000)
    try:
        first = await outcomes(engine, [params(1), params(2)])
        assert all(isinstance(o, InternalError) for o in first), first
        assert "generation failed: InjectedFault" in str(first[0])
        after = await outcomes(engine, [params(3), params(4)])
        assert [a.seeds for a in after] == [[3], [4]] and all(a.images for a in after), after
        assert faults.raised == 1 and not engine.fatal.is_set() and health.events == []
    finally:
        await engine.close()


async def test_a_failing_sampler_fails_only_its_own_request(demo_model, monkeypatch):
    faults = Faults(always=True)
    real = samplers.SAMPLERS["dpm_2"]

    def breaking_program(*args):
        inner = real(*args)
        prediction = yield next(inner)
        faults.check("sampler advance")
        yield inner.send(prediction)

    monkeypatch.setitem(samplers.SAMPLERS, "dpm_2", breaking_program)
    engine, health = await started(demo_model)
    try:
        results = await outcomes(engine, [params(1), params(2, sampler="dpm_2"), params(3)])
        assert results[0].images and results[2].images, results
        assert isinstance(results[1], InternalError) and "sampling failed" in str(results[1])
        assert health.events == [] and not engine.fatal.is_set()
    finally:
        await engine.close()


@pytest.mark.parametrize("stage", ["decode", "encode"])
async def test_a_failed_decode_or_encode_fails_that_request_only(demo_model, stage):
    faults = Faults(once=1)
    engine, health = await started(demo_model)
    setattr(engine.finisher, stage, faulty(getattr(engine.finisher, stage), faults, stage))
    try:
        results = await outcomes(engine, [params(1), params(2)])
        failed = [r for r in results if isinstance(r, InternalError)]
        assert len(failed) == 1 and ("decoding" in str(failed[0]) if stage == "decode" else "encoding" in str(failed[0]))
        assert sum(1 for r in results if not isinstance(r, Exception)) == 1
        again = await outcomes(engine, [params(3)])
        assert again[0].images
        assert health.events == []
    finally:
        await engine.close()


async def test_an_unattributed_loop_failure_fails_everything_then_the_loop_restarts(demo_model, monkeypatch):
    engine, health = await started(demo_model, max_batch_size=2)
    faults = Faults()
    schedule = engine.core.batcher.schedule
    monkeypatch.setattr(engine.core.batcher, "schedule", faulty(schedule, faults, "schedule"))
    try:
        # Two run, two wait; then the loop breaks with all four in the engine. The engine is
        # stepped one forward at a time until then, and the fault is armed while a forward is
        # held, so none can finish first.
        batcher = engine.core.batcher
        with Gate().on(demo_model.unet) as gate:
            tasks = [asyncio.ensure_future(engine.generate(params(i, steps=40))) for i in range(4)]
            while True:
                # Held in a forward, the engine thread leaves the batcher alone: read it then.
                counts = await asyncio.to_thread(gate.wait_for, lambda s: s["held"] == 1)
                if len(batcher.running) == 2 and len(batcher.waiting) == 2:
                    break
                gate.let_through(1)
                await asyncio.to_thread(gate.wait_for, lambda s, passed=counts["passed"]: s["passed"] > passed)
            faults.once = 1
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        assert all(isinstance(r, InternalError) and "not charged" in str(r) for r in results), results
        await until(lambda: len(health.events) == 2, what="the restart reported")  # right after the answers went out
        assert [serving for serving, _ in health.events] == [False, True]
        assert "InjectedFault" in health.events[0][1]
        served = await outcomes(engine, [params(9)])
        assert served[0].images, "the restarted loop serves again"
    finally:
        await engine.close()


async def test_repeated_loop_failures_make_the_engine_give_up(demo_model, monkeypatch):
    engine, health = await started(demo_model, max_loop_failures=2)
    faults = Faults(always=True)
    monkeypatch.setattr(engine.core.batcher, "schedule", faulty(engine.core.batcher.schedule, faults, "schedule"))
    try:
        for seed in (1, 2):
            (result,) = await outcomes(engine, [params(seed)])
            assert isinstance(result, InternalError)
        await until(engine.fatal.is_set, what="the engine gave up")
        assert "2 times" in engine.fatal_reason
        assert health.events[-1][0] is False
        with pytest.raises(Unavailable, match="engine failed"):
            await engine.generate(params(3))
    finally:
        await engine.close()


async def test_a_broken_device_makes_the_engine_give_up(demo_model):
    faults = Faults(always=True)
    engine, health = await started(with_faulty_unet(demo_model, faults), max_consecutive_failures=3, max_batch_size=1)
    try:
        results = await outcomes(engine, [params(i) for i in range(5)])
        # A request that reaches the engine only after it gave up (its three forwards can fail
        # before the last requests are checked) is refused as UNAVAILABLE instead: either way failed.
        assert all(isinstance(r, (InternalError, Unavailable)) for r in results), results
        assert sum(isinstance(r, InternalError) for r in results) >= 3, results
        assert faults.raised == 3, "no forward is tried after the engine gave up"
        assert engine.fatal.is_set() and "3 UNet evaluations in a row failed" in engine.fatal_reason
        assert health.events and health.events[-1][0] is False
        assert isinstance(engine.admission_error(), Unavailable)
    finally:
        await engine.close()


def test_injected_faults_are_what_the_tests_think(demo_model):
    """The wrapper is transparent when it does not fire and raises when it does."""
    faults = Faults(once=1)
    wrapped = with_faulty_unet(demo_model, faults)
    assert wrapped.unet.config == demo_model.unet.config
    with pytest.raises(InjectedFault):
        wrapped.unet(None)
