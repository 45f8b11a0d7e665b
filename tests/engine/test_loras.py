"""Per-request LoRAs inside the engine: the batched, unmerged result equals a model with the
LoRA merged into its weights, and a request's image does not depend on its batch-mates' LoRAs."""

import asyncio
import dataclasses

import pytest
import torch

from t2i.domain import GenerateRequest, LoraSpec
from t2i.engine.batching import Batcher
from t2i.engine.core import EngineCore
from t2i.engine.engine import AsyncEngine
from t2i.engine.loras import resolve_loras
from t2i.engine.request import EngineRequest
from t2i.engine.text import prepare_prompt
from t2i.errors import InvalidArgument
from t2i.models.config import ModelSpec
from t2i.models.demo import ensure_demo_model
from t2i.models.loader import load_model
from t2i.settings import EngineConfig

from ..lora.factory import KOHYA_SGM, PEFT, make_lora, merged_copy
from ..support.tolerance import EPS32, max_abs, max_diff, network_reductions, reduction_bound


@pytest.fixture(scope="module")
def lora_model(data_dir, tmp_path_factory):
    """The demo model with a LoRA folder holding three random LoRAs (kohya SGM with text-encoder
    parts, a UNet-only LoCon, a PEFT one)."""
    folder = tmp_path_factory.mktemp("loras")
    spec = ModelSpec(id=1, name="demo+loras", path=ensure_demo_model(data_dir), min_size=64, lora_dir=folder)
    base = load_model(spec.model_copy(update={"lora_dir": None}), torch.device("cpu"))
    files = {
        "style": make_lora(base, seed=1, rank=4, alpha=2.0, naming=KOHYA_SGM),
        "character": make_lora(base, seed=2, rank=8, alpha=4.0, naming=KOHYA_SGM, text_encoders=False, locon_mid=True),
        "peft": make_lora(base, seed=3, rank=4, alpha=None, naming=PEFT),
    }
    for name, lora in files.items():
        lora.save(folder / f"{name}.safetensors")
    return load_model(spec, torch.device("cpu")), base, files


STEPS = 4
TOKENS = 77  # the longest reduction over positions: cross-attention over one 77-token window (latents are 8x8)


def params(seed: int, loras=(), **overrides) -> GenerateRequest:
    base = dict(model_id=1, prompt="(1girl:1.2), masterpiece", negative_prompt="worst quality", height=64, width=64,
                steps=STEPS, cfg_scale=6.0, sampler="euler_ancestral", scheduler="karras")
    return GenerateRequest(seed=seed, loras=tuple(loras), **{**base, **overrides})


def engine_request(model, name: str, p: GenerateRequest) -> EngineRequest:
    prompts = (prepare_prompt(model, p.prompt), prepare_prompt(model, p.negative_prompt, "negativePrompt"))
    request = EngineRequest(request_id=name, params=p, seed=p.seed, prompts=prompts)
    resolved = resolve_loras(model, p.loras)
    if resolved:
        leases = model.lora_cache.acquire_all(resolved)
        leases.future.result(timeout=60)
        request.loras, request.lora_leases = tuple(leases.loaded()), leases
    return request


def latents(model, requests: list[GenerateRequest], stagger: int = 0) -> list[torch.Tensor]:
    core = EngineCore({1: model}, Batcher(8, admission_window=0.0))
    made = [engine_request(model, str(i), p) for i, p in enumerate(requests)]
    pending, steps = list(made), 0
    while pending or core.has_work():
        while pending and steps >= stagger * (len(made) - len(pending)):
            core.add(pending.pop(0))
        result = core.step()
        assert not result.failed, result.failed
        steps += 1
    for r in made:
        if r.lora_leases:
            r.lora_leases.release()
    return [r.run.result for r in made]


def tolerance(model, expected: torch.Tensor, steps: int = STEPS) -> float:
    """How far two float32 runs of the same request may drift apart when their kernels sum in
    other orders (another batch, LoRAs unmerged or merged): one chain of both text encoders and
    `steps` UNet evaluations, at the magnitude of the latents (near 100: the sampler's state
    carries sigma_max-sized noise). The sampler's own arithmetic is elementwise, the same on
    both sides."""
    text_depth, text_terms = network_reductions(*model.text_encoders, positions=TOKENS)
    unet_depth, unet_terms = network_reductions(model.unet, positions=TOKENS)
    return reduction_bound(
        eps=EPS32, magnitude=max_abs(expected), terms=max(text_terms, unet_terms), depth=text_depth + steps * unet_depth
    )


def close(model, a: torch.Tensor, b: torch.Tensor) -> bool:
    return max_diff(a, b) <= tolerance(model, b)


def merged_model(base, loras: list[tuple]):
    """`base` with each (FakeLora, strength_model, strength_clip) merged into a copy of its weights."""
    unet = merged_copy(base.unet, "unet", [(lora, s) for lora, s, _ in loras])
    encoders = tuple(merged_copy(e, c, [(lora, clip) for lora, _, clip in loras])
                     for e, c in zip(base.text_encoders, ("te1", "te2")))
    return dataclasses.replace(base, unet=unet, text_encoders=encoders)


def test_a_lora_request_equals_the_model_with_the_lora_merged(lora_model):
    model, base, files = lora_model
    (unmerged,) = latents(model, [params(7, [LoraSpec("style", 0.8, 0.6)])])
    (merged,) = latents(merged_model(base, [(files["style"], 0.8, 0.6)]), [params(7)])
    assert close(model, unmerged, merged)
    (plain,) = latents(base, [params(7)])
    # The LoRA must change the result far beyond the tolerance for this test to mean anything.
    assert max_diff(plain, unmerged) > 100 * tolerance(model, merged)


def test_two_loras_on_one_request_equal_their_merged_sum_and_strength_zero_is_none(lora_model):
    model, base, files = lora_model
    both = [LoraSpec("style", 0.7), LoraSpec("character", -0.5, 0.0), LoraSpec("peft", 1.2, 0.4)]
    (unmerged,) = latents(model, [params(3, both)])
    oracle = merged_model(base, [(files["style"], 0.7, 0.7), (files["character"], -0.5, 0.0), (files["peft"], 1.2, 0.4)])
    (merged,) = latents(oracle, [params(3)])
    assert close(model, unmerged, merged)
    # Teeth: the oracle without one of the three LoRAs is far outside the tolerance.
    (missing,) = latents(merged_model(base, [(files["style"], 0.7, 0.7), (files["peft"], 1.2, 0.4)]), [params(3)])
    assert max_diff(unmerged, missing) > 100 * tolerance(model, merged)
    (zero,) = latents(model, [params(3, [LoraSpec("style", 0.0, 0.0)])])
    (plain,) = latents(base, [params(3)])
    assert torch.equal(zero, plain)


def test_a_requests_image_does_not_depend_on_its_batch_mates_loras(lora_model):
    model, _, _ = lora_model
    target = params(11, [LoraSpec("character", 0.9)])
    mates = [params(1, [LoraSpec("style", 1.0)]), params(2), params(3, [LoraSpec("character", 0.3), LoraSpec("peft", 0.5)]),
             params(4, [LoraSpec("peft", 1.0)], sampler="dpm_2", scheduler="normal")]
    (alone,) = latents(model, [target])
    together = latents(model, [mates[0], target, *mates[1:]], stagger=1)
    assert close(model, together[1], alone)


def test_bad_lora_lists_are_refused_before_queueing(lora_model, data_dir):
    model, base, _ = lora_model
    engine = AsyncEngine({1: model}, EngineConfig())
    with pytest.raises(InvalidArgument, match=r"invalid loras\[0\]\.name 'stlye'.*style"):
        engine.check(params(1, [LoraSpec("stlye")]))
    with pytest.raises(InvalidArgument, match="at most 5 LoRAs per request"):
        engine.check(params(1, [LoraSpec(f"x{i}") for i in range(6)]))
    with pytest.raises(InvalidArgument, match=r"loras\[0\]\.strength_model inf: must be a finite number from -100 to 100"):
        engine.check(params(1, [LoraSpec("style", float("inf"))]))
    with pytest.raises(InvalidArgument, match=r"not a path"):
        engine.check(params(1, [LoraSpec("../style")]))
    without = AsyncEngine({1: base}, EngineConfig())
    with pytest.raises(InvalidArgument, match="has no LoRA folder"):
        without.check(params(1, [LoraSpec("style")]))


async def test_the_engine_loads_loras_off_the_loop_and_releases_them(lora_model):
    model, _, _ = lora_model
    engine = AsyncEngine({1: model}, EngineConfig(admission_window_ms=5))
    engine.start()
    try:
        results = await asyncio.wait_for(asyncio.gather(
            engine.generate(params(1, [LoraSpec("style")])), engine.generate(params(2, [LoraSpec("peft", 0.5)])),
            engine.generate(params(3)),
        ), timeout=120)
        assert all(r.images for r in results)
        assert model.lora_cache.bytes_resident > 0  # still cached for the next request...
        assert all(not entry.pins for entry in model.lora_cache._entries.values())  # ...but nobody holds them
    finally:
        await engine.close()
