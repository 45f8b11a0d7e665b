"""Device-resident LoRA weights: background loads, LRU eviction under a byte budget, pins, metrics."""

from __future__ import annotations

import threading

import pytest
import torch

from t2i import metrics
from t2i.lora import LoraCache, LoraFileError, LoraRegistry, LoraRequest, load_weights

from .factory import make_lora

CPU = torch.device("cpu")


@pytest.fixture
def registry(demo_model, index, lora_dir):
    for seed, name in enumerate(("a", "b", "c")):
        make_lora(
            demo_model, seed=20 + seed, unet=lambda path, module: "attentions" in path, text_encoders=False
        ).save(lora_dir / f"{name}.safetensors")
    return LoraRegistry(lora_dir, index, model_id="cache-test")


def counter(metric, label):
    return metric.labels(label)._value.get()


class GatedLoader:
    """Wraps the real loader: records the thread it ran on and can hold a load back."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, info, index, device, dtype):
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(30)
        return load_weights(info, index, device, dtype)


def make_cache(index, registry, fits: int, label: str, loader=load_weights):
    size = registry.get("a").resident_bytes(torch.float32)
    return LoraCache(index, CPU, torch.float32, budget_bytes=size * fits, model_label=label, loader=loader)


def test_loads_run_off_the_callers_thread(index, registry):
    loader = GatedLoader()
    loader.gate.clear()
    cache = make_cache(index, registry, 3, "off-thread", loader)
    lease = cache.acquire(registry.get("a"))
    assert not lease.future.done()  # acquire returned while the load is held back
    loader.gate.set()
    weights = lease.future.result(timeout=30)
    assert weights.name == "a" and weights.device == CPU
    assert loader.threads and loader.threads[0] != threading.current_thread().name
    assert loader.threads[0].startswith("lora-load-")
    cache.close()


def test_lru_eviction_under_the_budget(index, registry):
    label = "lru"
    cache = make_cache(index, registry, 2, label)
    hits, misses = counter(metrics.LORA_CACHE_HITS, label), counter(metrics.LORA_CACHE_MISSES, label)
    evictions = counter(metrics.LORA_CACHE_EVICTIONS, label)
    for name in ("a", "b"):
        lease = cache.acquire(registry.get(name))
        lease.future.result(timeout=30)
        lease.release()
    again = cache.acquire(registry.get("a"))  # a is now the most recently used
    again.release()
    assert cache.resident() == ["b", "a"]
    cache.acquire(registry.get("c")).future.result(timeout=30)
    assert cache.resident() == ["a", "c"]  # b, least recently used, went
    size = registry.get("a").resident_bytes(torch.float32)
    assert cache.bytes_resident == 2 * size == metrics.LORA_CACHE_BYTES.labels(label)._value.get()
    assert counter(metrics.LORA_CACHE_HITS, label) - hits == 1
    assert counter(metrics.LORA_CACHE_MISSES, label) - misses == 3
    assert counter(metrics.LORA_CACHE_EVICTIONS, label) - evictions == 1
    cache.close()


def test_pinned_weights_are_never_evicted(index, registry):
    cache = make_cache(index, registry, 2, "pins")
    held = cache.acquire(registry.get("a"))
    held.future.result(timeout=30)
    other = cache.acquire(registry.get("b"))
    other.future.result(timeout=30)
    other.release()
    cache.acquire(registry.get("c")).future.result(timeout=30)
    assert cache.resident() == ["a", "c"]  # a is older but pinned; b was evicted
    # Everything pinned: the next load goes over budget rather than failing the request.
    extra = cache.acquire(registry.get("b"))
    extra.future.result(timeout=30)
    assert cache.resident() == ["a", "c", "b"]
    assert cache.bytes_resident > cache.budget_bytes
    cache.close()


def test_a_request_bundle_and_failed_loads(index, registry, lora_dir):
    cache = make_cache(index, registry, 3, "bundle")
    resolved = registry.resolve([LoraRequest("a", 0.7, 0.2), LoraRequest("b", 1.0, 1.0)])
    bundle = cache.acquire_all(resolved)
    bundle.future.result(timeout=30)
    loaded = bundle.loaded()
    assert [(l.weights.name, l.strength_model, l.strength_clip) for l in loaded] == [
        ("a", 0.7, 0.2),
        ("b", 1.0, 1.0),
    ]
    bundle.release()

    info = registry.get("c")
    (lora_dir / "c.safetensors").unlink()  # gone between registration and load
    failing = cache.acquire_all(registry.resolve([LoraRequest("c")]))
    with pytest.raises(LoraFileError, match="LoRA 'c': cannot read c.safetensors"):
        failing.future.result(timeout=30)
    with pytest.raises(LoraFileError):
        failing.loaded()
    failing.release()
    assert "c" not in cache.resident()
    assert cache.bytes_resident == 2 * info.resident_bytes(torch.float32)
    cache.close()
