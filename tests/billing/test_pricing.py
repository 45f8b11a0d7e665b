import pytest

from t2i.billing.pricing import evaluations, price
from t2i.billing.settings import BillingSettings
from t2i.domain import GenerateRequest
from t2i.sampling import SigmaTable

SETTINGS = BillingSettings()
SDXL = SigmaTable.sdxl()


def request(width=768, height=768, steps=28, sampler="euler", scheduler="normal") -> GenerateRequest:
    return GenerateRequest(1, "p", "", height, width, steps, 7.0, -1, sampler, scheduler)


def test_documented_example_costs_three():
    assert price(request(), 1.0, SDXL, SETTINGS) == 3


def test_two_stage_samplers_cost_about_twice_per_step():
    assert evaluations(request(sampler="dpm_2"), SDXL) == 55
    assert evaluations(request(sampler="dpmpp_2s_ancestral_cfg_pp"), SDXL) == 55
    assert price(request(sampler="dpm_2"), 1.0, SDXL, SETTINGS) == 6  # ceil(0.5625 * 55 / 6) = ceil(5.16)
    assert price(request(sampler="euler_ancestral_cfg_pp"), 1.0, SDXL, SETTINGS) == 3


def test_price_counts_evaluations_not_steps():
    assert evaluations(request(scheduler="ddim_uniform"), SDXL) == 29  # ddim_uniform gives 29 steps for 28
    assert price(request(scheduler="ddim_uniform", width=1024, height=1024), 1.0, SDXL, SETTINGS) == 5  # ceil(29/6)


def test_price_scales_with_pixels_and_model_multiplier():
    assert price(request(width=1024, height=1024), 1.0, SDXL, SETTINGS) == 5  # ceil(28 / 6)
    assert price(request(width=2048, height=2048, steps=30), 1.0, SDXL, SETTINGS) == 20  # 4 MP * 30 / 6
    assert price(request(), 2.0, SDXL, SETTINGS) == 6  # ceil(5.25)
    assert price(request(), 0.5, SDXL, SETTINGS) == 2  # ceil(1.3125)


def test_minimum_price_and_exact_arithmetic():
    assert price(request(width=64, height=64, steps=1), 1.0, SDXL, SETTINGS) == 1
    # 1024x1024 x 6 evaluations / 6 is exactly 1.0: no float error may round it up to 2.
    assert price(request(width=1024, height=1024, steps=6), 1.0, SDXL, SETTINGS) == 1
    assert price(request(width=1024, height=1024, steps=6), 1.1, SDXL, SETTINGS) == 2


def test_rate_is_configurable():
    cheaper = BillingSettings(megapixel_evaluations_per_stardust=12)
    assert price(request(), 1.0, SDXL, cheaper) == 2  # ceil(1.3125)


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
