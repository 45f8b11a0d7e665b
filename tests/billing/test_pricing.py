"""The price formula (billing/pricing.py) on the cost model (t2i.cost)."""

import pytest

from t2i.billing.pricing import evaluations, price
from t2i.billing.settings import BillingSettings
from t2i.domain import GenerateRequest
from t2i.sampling import SigmaTable

SETTINGS = BillingSettings()
SDXL = SigmaTable.sdxl()


def request(width=768, height=768, steps=28, sampler="euler", scheduler="normal", images=1) -> GenerateRequest:
    return GenerateRequest(1, "p", "", height, width, steps, 7.0, -1, sampler, scheduler, num_images=images)


def test_documented_example_costs_three():
    # 768x768, 28 euler steps, the documented prompt takes two chunks: ceil(0.5625 * (28 * 1.06 + 5) / 7).
    assert price(request(), 1.0, SDXL, SETTINGS, context_chunks=2) == 3
    assert price(request(), 1.0, SDXL, SETTINGS, context_chunks=1) == 3


def test_two_stage_samplers_cost_about_twice_per_step():
    assert evaluations(request(sampler="dpm_2"), SDXL) == 55
    assert evaluations(request(sampler="dpmpp_2s_ancestral_cfg_pp"), SDXL) == 55
    assert price(request(sampler="dpm_2"), 1.0, SDXL, SETTINGS, 2) == 6  # ceil(0.5625 * (55 * 1.06 + 5) / 7) = ceil(5.09)
    assert price(request(sampler="euler_ancestral_cfg_pp"), 1.0, SDXL, SETTINGS, 2) == 3


def test_price_counts_evaluations_not_steps():
    assert evaluations(request(scheduler="ddim_uniform"), SDXL) == 29  # ddim_uniform gives 29 steps for 28
    assert price(request(scheduler="ddim_uniform", width=1024, height=1024), 1.0, SDXL, SETTINGS) == 5  # ceil(34 / 7)
    # A multiplier that puts the two counts on either side of a whole stardust: 29 evaluations
    # price ceil(1.05 * 34 / 7) = ceil(5.1) = 6, where 28 would price ceil(1.05 * 33 / 7) = 5.
    assert price(request(scheduler="ddim_uniform", width=1024, height=1024), 1.05, SDXL, SETTINGS) == 6
    assert price(request(width=1024, height=1024), 1.05, SDXL, SETTINGS) == 5


def test_price_scales_with_pixels_chunks_images_and_model_multiplier():
    assert price(request(width=1024, height=1024), 1.0, SDXL, SETTINGS) == 5  # ceil(33 / 7)
    assert price(request(width=2048, height=2048, steps=30), 1.0, SDXL, SETTINGS) == 20  # 4 MP * 35 / 7, exactly
    assert price(request(), 1.0, SDXL, SETTINGS, context_chunks=8) == 4  # ceil(0.5625 * (28 * 1.42 + 5) / 7)
    assert price(request(), 2.0, SDXL, SETTINGS) == 6  # ceil(5.30)
    assert price(request(), 0.5, SDXL, SETTINGS) == 2  # ceil(1.33)
    assert price(request(images=3), 1.0, SDXL, SETTINGS) == 9  # per image


def test_minimum_price_and_exact_arithmetic():
    assert price(request(width=64, height=64, steps=1), 1.0, SDXL, SETTINGS) == 1
    # 1.1 * 4 MP * 35 / 7 is exactly 22: no float error may round it up to 23.
    assert price(request(width=2048, height=2048, steps=30), 1.1, SDXL, SETTINGS) == 22
    assert price(request(width=2048, height=2048, steps=30), 1.11, SDXL, SETTINGS) == 23


def test_rate_is_configurable():
    cheaper = BillingSettings(megapixel_evaluations_per_stardust=14)
    assert price(request(), 1.0, SDXL, cheaper) == 2  # ceil(1.33)


@pytest.mark.parametrize("tier", ["missing"])
def test_default_tier_must_exist(tier):
    with pytest.raises(ValueError, match="default_tier"):
        BillingSettings(default_tier=tier)


def test_price_counts_on_the_models_own_sigma_table():
    """A model trained on another number of timesteps gets other ddim_uniform/beta schedules:
    pricing must count what the engine will run on that model, not on SDXL's table."""
    import torch

    from t2i.sampling import SamplingRun, compute_sigmas, scaled_linear_betas

    short = SigmaTable(scaled_linear_betas(timesteps=500))
    for scheduler, sampler in (("ddim_uniform", "euler"), ("beta", "dpm_2"), ("karras", "dpmpp_2s_ancestral")):
        r = request(scheduler=scheduler, sampler=sampler)
        sigmas = compute_sigmas(short, scheduler, r.steps, sampler)
        run = SamplingRun(sampler, torch.zeros(1, 4, 2, 2), sigmas, 5.0, noise=None)
        assert evaluations(r, short) == run.total_evaluations
    assert evaluations(request(scheduler="ddim_uniform"), short) != evaluations(request(scheduler="ddim_uniform"), SDXL)


def test_the_documented_prompt_takes_two_chunks(demo_model):
    from t2i.edge.launcher import DOCUMENTED_EXAMPLE
    from t2i.engine.text import prepare_prompt

    chunks = [len(prepare_prompt(demo_model, DOCUMENTED_EXAMPLE[f]).chunks[0]) for f in ("prompt", "negative_prompt")]
    assert chunks == [2, 1]


@pytest.mark.parametrize("steps", [1, 7, 28, 38, 139, 150])
def test_a_v_prediction_zero_terminal_snr_request_with_rescale_costs_what_an_epsilon_one_does(steps):
    """The engine runs the same evaluations on the zero-terminal-SNR table (the schedules keep
    their lengths: beta's repeats are of integer timesteps), and RescaleCFG adds no forward."""
    from dataclasses import replace

    from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

    zero_snr = SigmaTable.sdxl(zero_terminal_snr=True)
    for sampler in SAMPLER_NAMES:
        for scheduler in SCHEDULER_NAMES:
            plain = request(steps=steps, sampler=sampler, scheduler=scheduler)
            rescaled = replace(plain, cfg_rescale=0.7)
            assert evaluations(rescaled, zero_snr) == evaluations(plain, SDXL), (sampler, scheduler)
            assert price(rescaled, 1.0, zero_snr, SETTINGS, 2) == price(plain, 1.0, SDXL, SETTINGS, 2)
