"""Streams of multi-pass requests: progress counts the steps and evaluations of every pass, so a
hires fix's stream keeps moving through its second pass instead of restarting or stopping."""

import asyncio

from t2i.domain import GenerateRequest, HiresFix, Progress
from t2i.engine.engine import AsyncEngine
from t2i.settings import EngineConfig

BASE = dict(model_id=1, prompt="1girl", negative_prompt="", width=64, height=64, steps=3, cfg_scale=5.0, seed=5,
            sampler="euler", scheduler="normal")


async def progress_of(model, params: GenerateRequest) -> list[Progress]:
    # Every progress event (no throttle), so the test sees each step of each pass.
    engine = AsyncEngine({1: model}, EngineConfig(progress_interval_ms=0, admission_window_ms=0))
    engine.start()
    events = []
    try:
        await asyncio.wait_for(engine.generate(params, events=events.append), timeout=120)
    finally:
        await engine.close()
    return [e for e in events if isinstance(e, Progress)]


async def test_a_hires_stream_reports_both_passes_in_one_count(demo_model):
    # dpm_2 takes two evaluations a step (one on the last step to 0), so steps and evaluations differ.
    hires = GenerateRequest(**{**BASE, "sampler": "dpm_2"}, hires_fix=HiresFix(scale=1.5, steps=2, denoise=0.5))
    events = await progress_of(demo_model, hires)
    # One event per evaluation: 3 steps of dpm_2 (2 + 2 + 1 evaluations), then 2 steps of the
    # second pass (2 + 1), counted on from the first pass's totals, never restarting.
    assert [e.evaluations for e in events] == list(range(1, 9)), events
    assert {(e.total_steps, e.total_evaluations) for e in events} == {(5, 8)}
    assert [e.step for e in events] == [0, 1, 1, 2, 3, 3, 4, 5], events


async def test_a_one_pass_stream_is_unchanged(demo_model):
    events = await progress_of(demo_model, GenerateRequest(**BASE))
    assert [(e.step, e.total_steps, e.evaluations, e.total_evaluations) for e in events] == [(1, 3, 1, 3), (2, 3, 2, 3), (3, 3, 3, 3)]
