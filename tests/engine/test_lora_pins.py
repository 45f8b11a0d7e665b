"""Every path after a request's LoRAs are loaded gives their pins back: a request the engine
refuses (queue full, shutting down) holds no LoRA memory afterwards."""

import asyncio
import dataclasses
import threading

import pytest
import torch

from t2i.domain import GenerateRequest, LoraSpec
from t2i.engine.engine import AsyncEngine
from t2i.errors import Overloaded
from t2i.lora import LoraCache, LoraRequest, load_weights
from t2i.models.config import ModelSpec
from t2i.models.demo import ensure_demo_model
from t2i.models.loader import load_model
from t2i.settings import EngineConfig

from ..lora.factory import KOHYA_SGM, make_lora

NAMES = [f"l{i}" for i in range(6)]


class GatedLoader:
    """The real loader, held back until the test opens the gate; counts the loads it started."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = 0

    def __call__(self, info, index, device, dtype):
        self.started += 1
        assert self.gate.wait(60), "the test never opened the gate"
        return load_weights(info, index, device, dtype)


@pytest.fixture(scope="module")
def lora_model(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pinned-loras")
    spec = ModelSpec(id=1, name="demo+loras", path=ensure_demo_model(data_dir), min_size=64, lora_dir=folder)
    base = load_model(spec.model_copy(update={"lora_dir": None}), torch.device("cpu"))
    for i, name in enumerate(NAMES):
        make_lora(base, seed=40 + i, rank=4, naming=KOHYA_SGM, text_encoders=False).save(folder / f"{name}.safetensors")
    return load_model(spec, torch.device("cpu"))


def with_cache(model, fits: int, loader) -> tuple:
    """The model with a fresh LoRA cache that holds about `fits` of these LoRAs."""
    size = model.loras.get(NAMES[0]).resident_bytes(torch.float32)
    cache = LoraCache(model.lora_cache.index, torch.device("cpu"), torch.float32, size * fits, model_label="pins", loader=loader)
    return dataclasses.replace(model, lora_cache=cache), cache


def params(seed: int, loras=()) -> GenerateRequest:
    return GenerateRequest(model_id=1, prompt="1girl", negative_prompt="", height=64, width=64, steps=2, cfg_scale=5.0,
                           seed=seed, sampler="euler", scheduler="normal", loras=tuple(loras))


def pins(cache: LoraCache) -> int:
    return sum(entry.pins for entry in cache._entries.values())


async def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_a_request_refused_after_its_loras_loaded_releases_them(lora_model):
    loader = GatedLoader()
    model, cache = with_cache(lora_model, fits=3, loader=loader)
    # Not started: nothing drains the queue, so what is queued stays queued.
    engine = AsyncEngine({1: model}, EngineConfig(max_queue=1))
    loading = asyncio.ensure_future(engine.generate(params(1, [LoraSpec(NAMES[0])])))
    await wait_for(lambda: loader.started == 1)  # it passed admission and is loading
    queued = asyncio.ensure_future(engine.generate(params(2)))  # takes the last place in the queue
    await wait_for(lambda: len(engine._inbox) == 1)
    loader.gate.set()
    with pytest.raises(Overloaded, match="queue is full"):
        await asyncio.wait_for(loading, 60)
    assert pins(cache) == 0, "a refused request kept its LoRA pinned"
    queued.cancel()
    await engine.close()


async def test_rounds_of_refused_lora_calls_leave_the_cache_within_its_budget(lora_model):
    """The issue's case: a cache for ~3 LoRAs, rounds of 6 calls with other LoRAs against a full
    queue. They are refused before anything is read, and nothing stays pinned or over budget."""
    loader = GatedLoader()
    loader.gate.set()
    model, cache = with_cache(lora_model, fits=3, loader=loader)
    engine = AsyncEngine({1: model}, EngineConfig(max_queue=1))
    queued = asyncio.ensure_future(engine.generate(params(0)))
    await wait_for(lambda: len(engine._inbox) == 1)
    for _ in range(2):
        outcomes = await asyncio.gather(
            *(engine.generate(params(i, [LoraSpec(name)])) for i, name in enumerate(NAMES)), return_exceptions=True
        )
        assert all(isinstance(o, Overloaded) for o in outcomes), outcomes
        assert pins(cache) == 0 and loader.started == 0 and cache.bytes_resident == 0
    queued.cancel()
    await engine.close()


def test_unpinned_weights_over_budget_are_evicted_when_their_pins_go(lora_model):
    """When every resident LoRA was pinned, a load went ahead over budget; once the pins go,
    the cache is back under its budget without waiting for the next load."""
    model, cache = with_cache(lora_model, fits=2, loader=load_weights)
    leases = [cache.acquire_all(model.loras.resolve([LoraRequest(name, 1.0, 1.0)])) for name in NAMES[:4]]
    for lease in leases:
        lease.future.result(timeout=60)
    assert cache.bytes_resident > cache.budget_bytes  # all pinned: over budget, as designed
    for lease in leases:
        lease.release()
    assert pins(cache) == 0
    assert cache.bytes_resident <= cache.budget_bytes
    assert cache.resident() == NAMES[2:4]  # the least recently acquired went first
