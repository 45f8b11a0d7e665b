"""The engine on a v-prediction, zero-terminal-SNR model (the demo UNet read as one): the
forward's output is read as a velocity, timesteps come from the model's own table, a run starts
from that table's sigma_max, a request's latent does not depend on its v-pred batch-mates, and
RescaleCFG guides the sampler and the preview alike."""

import math
from dataclasses import replace

import pytest
import torch

from t2i.engine import core as core_module
from t2i.engine.core import EngineCore
from t2i.engine.batching import Batcher
from t2i.engine.denoise import UNetInput, evaluate, size_conditioning
from t2i.models.kind import ModelKind
from t2i.sampling import SigmaTable, guide, initial_noise, rescale_cfg

from ..support.tolerance import EPS32, elementwise_bound, max_abs, max_diff
from .test_core import encode, engine_request, params, run_core, unet_tolerance

NOOB = ModelKind("v_prediction", True, "models file")


@pytest.fixture(scope="module")
def noob_model(demo_model):
    """The demo weights served as a NoobAI-style model: v-prediction on the zero-terminal-SNR table."""
    return replace(demo_model, kind=NOOB, sigma_table=SigmaTable.sdxl(zero_terminal_snr=True))


def recorded_timesteps(model):
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    return seen, handle


def test_the_forward_output_is_read_as_a_velocity_at_the_models_own_timesteps(demo_model, noob_model):
    (cond,) = encode(demo_model, "1girl")
    time_ids = size_conditioning(64, 64, demo_model.device)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 40
    sigma = float(noob_model.sigma_table.sigmas[900])  # a sigma the two tables put at different timesteps
    # The same weights read as epsilon, on the zero-terminal-SNR table: the same forward.
    as_epsilon = replace(demo_model, sigma_table=noob_model.sigma_table)
    seen, handle = recorded_timesteps(demo_model)
    try:
        v_x0, _ = evaluate(noob_model, [UNetInput(x, sigma, cond, cond, time_ids)])[0]
        eps_x0, _ = evaluate(as_epsilon, [UNetInput(x, sigma, cond, cond, time_ids)])[0]
        evaluate(demo_model, [UNetInput(x, sigma, cond, cond, time_ids)])
    finally:
        handle.remove()
    assert seen[0] == seen[1] == [900.0, 900.0]
    assert seen[2] == [float(SigmaTable.sdxl().timestep(sigma))] * 2 != seen[0]  # the ordinary table's
    # The raw output, recovered from the epsilon reading, then read as v by the formula.
    output = (x - eps_x0) / sigma
    expected = x / (sigma**2 + 1) - output * sigma / math.sqrt(sigma**2 + 1)
    # Both readings and the recovery are a few float32 roundings of values up to |x| + sigma |output|;
    # the recovered output's error is divided by sigma and multiplied back by about as much.
    bound = elementwise_bound(eps=EPS32, magnitude=max_abs(x) + sigma * max_abs(output), operations=16)
    assert max_diff(v_x0, expected) <= bound
    assert max_diff(v_x0, eps_x0) > 1e3 * bound


def test_a_run_starts_from_the_zero_terminal_snr_sigma_max(noob_model):
    request = engine_request(noob_model, "r", params(sampler="euler", scheduler="karras"))
    EngineCore._start_sampling(noob_model, request)
    x, sigma = request.run.pending
    assert sigma == pytest.approx(noob_model.sigma_table.sigma_max, rel=1e-6) and sigma > 4000
    noise = initial_noise(request.seed, (1, 4, 8, 8))
    assert torch.equal(x, noise * math.sqrt(1 + sigma * sigma))


def test_a_v_prediction_request_gives_the_same_latent_alone_and_among_v_prediction_requests(noob_model):
    target = params(cfg_rescale=0.7, sampler="dpmpp_2s_ancestral", scheduler="normal", steps=5)
    others = [
        params(seed=1, sampler="euler_ancestral_cfg_pp", cfg_scale=1.5, cfg_rescale=0.5, steps=6),
        params(seed=2, sampler="dpm_2", scheduler="beta", steps=4),
        params(seed=3, sampler="euler", scheduler="ddim_uniform", cfg_rescale=1.0, steps=7),
    ]
    (alone,), _ = run_core(noob_model, [target])
    together, sizes = run_core(noob_model, [others[0], target, *others[1:]], stagger=1)
    assert torch.isfinite(alone).all()
    assert max(sizes[1]) >= 3, "the target must actually share forwards with others"
    evaluations = 2 * target.steps - 1
    tolerance = unet_tolerance(noob_model, max_abs(alone), evaluations=evaluations, text=True)
    assert max_diff(together[1], alone) <= tolerance
    (other_seed,), _ = run_core(noob_model, [replace(target, seed=12)])
    assert max_diff(other_seed, alone) > 100 * tolerance


def test_rescale_cfg_guides_the_sampler_and_the_preview(noob_model, monkeypatch):
    recorded = []
    real = core_module.evaluate

    def recording(model, batch):
        outputs = real(model, batch)
        recorded.append((batch, outputs))
        return outputs

    monkeypatch.setattr(core_module, "evaluate", recording)
    core = EngineCore({1: noob_model}, Batcher(2, admission_window=0.0))
    request = engine_request(noob_model, "r", params(sampler="euler", cfg_rescale=0.7, preview_every_steps=1, steps=3))
    request.events = lambda event: None  # a streamed call: previews are taken
    core.add(request)
    core.step()
    ((batch, ((cond, uncond),)),) = recorded
    x, sigma = batch[0].x, batch[0].sigma
    guided = rescale_cfg(x, sigma, cond, uncond, 6.0, 0.7)
    assert torch.equal(request.preview_latent, guided)
    assert max_diff(request.preview_latent, guide(cond, uncond, 6.0)) > 0
    # The sampler stepped with the same guided prediction: euler lands at x + d * (s1 - s).
    s1 = request.run.pending[1]
    expected = x + (x - guided) / sigma * (s1 - sigma)
    assert torch.equal(request.run.pending[0], expected)
