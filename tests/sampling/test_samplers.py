"""Every sampler on analytic toy denoisers in float64, and the CFG++ formulas of the spec."""

import math

import pytest
import torch

from t2i.sampling import (
    SAMPLER_NAMES,
    SamplingRun,
    UnknownNameError,
    count_evaluations,
    get_sigmas,
    sample,
)
from t2i.sampling.guidance import guide
from t2i.sampling.samplers import ancestral_split

from .spec_cfg_pp import SPEC_CFG_PP, SpecNoise, plain_cfg, spec_dpmpp_2s_ancestral_cfg_pp, spec_split
from .toy import COND_MEAN, VARIANCE, exact_ode, gaussian_x0, nonlinear_pair, same_pair, sampler_tolerance

F64 = torch.float64
DETERMINISTIC = ["euler", "euler_cfg_pp", "dpm_2"]
ANCESTRAL = [name for name in SAMPLER_NAMES if name not in DETERMINISTIC]


def start(sigmas, shape=(1, 4, 16, 16), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * float(sigmas[0])


def exact_result(x, sigmas):
    """The exact ODE down to the last non-zero sigma, then the final Euler step every sampler
    takes to 0 (which lands on the x0-prediction there)."""
    last = float(sigmas[-2])
    return gaussian_x0(exact_ode(x, float(sigmas[0]), last, COND_MEAN), last, COND_MEAN)


@pytest.mark.parametrize("name", ["euler", "dpm_2"])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name):
    errors = []
    for steps in (10, 40, 160):
        sigmas = get_sigmas("karras", steps).to(F64)
        x = start(sigmas)
        out = sample(name, same_pair, x, sigmas, cfg_scale=7.0, seed=0)
        errors.append((out - exact_result(x, sigmas)).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    # First order: 4x the steps cut the error about 4x; second order: about 16x.
    expected_ratio = 16 if name == "dpm_2" else 4
    assert errors[1] / errors[2] == pytest.approx(expected_ratio, rel=0.3)


def test_dpm_2_is_more_accurate_than_euler_at_equal_steps():
    sigmas = get_sigmas("karras", 20).to(F64)
    x = start(sigmas)
    exact = exact_result(x, sigmas)
    euler_error = (sample("euler", same_pair, x, sigmas, cfg_scale=1.0, seed=0) - exact).abs().max()
    dpm_2_error = (sample("dpm_2", same_pair, x, sigmas, cfg_scale=1.0, seed=0) - exact).abs().max()
    assert dpm_2_error < euler_error / 5


# dpmpp_2s_ancestral_cfg_pp is left out on purpose: its U2 detail (see the spec) keeps a
# (D - U2) term even when cond == uncond, so it does not sample the data distribution exactly.
@pytest.mark.parametrize("name", [name for name in ANCESTRAL if name != "dpmpp_2s_ancestral_cfg_pp"])
def test_ancestral_samplers_recover_the_data_distribution(name):
    # With cond == uncond an ancestral sampler turns noise into samples of N(mean, variance).
    sigmas = get_sigmas("karras", 100, name).to(F64)
    x = start(sigmas, shape=(1, 4, 64, 64))
    out = sample(name, same_pair, x, sigmas, cfg_scale=3.0, seed=5)
    assert out.mean().item() == pytest.approx(COND_MEAN, abs=0.02)
    assert out.std().item() == pytest.approx(math.sqrt(VARIANCE), rel=0.04)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("scheduler", ["normal", "ddim_uniform", "beta"])
def test_every_sampler_is_finite_deterministic_per_seed_and_keeps_dtype(name, scheduler):
    sigmas = get_sigmas(scheduler, 12, name).to(F64)
    x = start(sigmas)
    first = sample(name, nonlinear_pair, x.clone(), sigmas, cfg_scale=1.5, seed=11)
    again = sample(name, nonlinear_pair, x.clone(), sigmas, cfg_scale=1.5, seed=11)
    assert first.dtype == F64 and first.shape == x.shape
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    other_seed = sample(name, nonlinear_pair, x.clone(), sigmas, cfg_scale=1.5, seed=12)
    assert torch.equal(first, other_seed) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("scheduler", ["normal", "karras", "ddim_uniform"])
def test_evaluation_count_is_what_the_sampler_actually_does(name, scheduler):
    sigmas = get_sigmas(scheduler, 9, name)
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return same_pair(x, sigma)

    sample(name, counting, start(sigmas), sigmas.to(F64), cfg_scale=2.0, seed=0)
    assert len(calls) == count_evaluations(name, sigmas)
    steps = len(sigmas) - 1
    assert count_evaluations(name, sigmas) == (2 * steps - 1 if "2" in name else steps)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_model_is_never_evaluated_at_sigma_zero(name):
    sigmas = get_sigmas("karras", 6, name).to(F64)
    seen = []

    def recording(x, sigma):
        seen.append(float(sigma[0]))
        return nonlinear_pair(x, sigma)

    sample(name, recording, start(sigmas), sigmas, cfg_scale=2.0, seed=0)
    assert min(seen) > 0


# --- the spec's formulas, transcribed independently -----------------------------------------

def float_sigma_pair(x, sigma):
    return nonlinear_pair(x, float(sigma))


@pytest.mark.parametrize("name", list(SPEC_CFG_PP))
@pytest.mark.parametrize("scheduler,steps", [("normal", 10), ("karras", 28), ("beta", 5), ("ddim_uniform", 9)])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5, 2.0])
def test_cfg_pp_samplers_follow_the_spec_formulas(name, scheduler, steps, cfg_scale):
    sigmas = get_sigmas(scheduler, steps).to(F64)
    x = start(sigmas)
    ours = sample(name, float_sigma_pair, x.clone(), sigmas, cfg_scale=cfg_scale, seed=3)
    spec = SPEC_CFG_PP[name](float_sigma_pair, x.clone(), sigmas, plain_cfg(cfg_scale), seed=3)
    assert (ours - spec).abs().max() <= sampler_tolerance(x, sigmas)


def test_dpmpp_2s_ancestral_cfg_pp_mixes_first_denoised_with_midpoint_uncond():
    """The U2 detail: replace U2 by the first evaluation's U in the second update and the
    result must change; with U2 it must match the spec exactly."""
    sigmas = get_sigmas("karras", 8).to(F64)
    x = start(sigmas)
    ours = sample("dpmpp_2s_ancestral_cfg_pp", float_sigma_pair, x.clone(), sigmas, cfg_scale=1.5, seed=9)

    def variant_with_first_uncond(denoiser, x, sigmas, cfg, seed):
        eps = SpecNoise(x, seed)
        for i in range(len(sigmas) - 1):
            s, s1 = float(sigmas[i]), float(sigmas[i + 1])
            c, u = denoiser(x, s)
            d = u + cfg * (c - u)
            if s1 == 0:
                x = d
                continue
            down, up = spec_split(s, s1)
            h = math.log(s) - math.log(down)
            s_s = math.sqrt(s * down)
            x2 = (s_s / s) * (x + d - u) - math.expm1(-h / 2) * d
            c2, u2 = denoiser(x2, s_s)
            d2 = u2 + cfg * (c2 - u2)
            x = (down / s) * (x + d - u) - math.expm1(-h) * d2 + up * eps()
        return x

    wrong = variant_with_first_uncond(float_sigma_pair, x.clone(), sigmas, 1.5, 9)
    right = spec_dpmpp_2s_ancestral_cfg_pp(float_sigma_pair, x.clone(), sigmas, plain_cfg(1.5), 9)
    assert (ours - right).abs().max() <= sampler_tolerance(x, sigmas)
    assert (ours - wrong).abs().max() > 1e-3 > 100 * sampler_tolerance(x, sigmas)


@pytest.mark.parametrize("pp,plain", [("euler_cfg_pp", "euler"), ("euler_ancestral_cfg_pp", "euler_ancestral")])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "simple"])
def test_cfg_pp_reduces_to_the_plain_sampler_when_cond_equals_uncond(pp, plain, scheduler):
    sigmas = get_sigmas(scheduler, 15).to(F64)
    x = start(sigmas)
    a = sample(pp, same_pair, x.clone(), sigmas, cfg_scale=1.7, seed=21)
    b = sample(plain, same_pair, x.clone(), sigmas, cfg_scale=1.7, seed=21)
    assert (a - b).abs().max() <= sampler_tolerance(x, sigmas)
    # ...and they genuinely differ once cond and uncond differ.
    c = sample(pp, nonlinear_pair, x.clone(), sigmas, cfg_scale=1.7, seed=21)
    d = sample(plain, nonlinear_pair, x.clone(), sigmas, cfg_scale=1.7, seed=21)
    assert (c - d).abs().max() > 1e-3 > 100 * sampler_tolerance(x, sigmas)


def test_dpmpp_2s_ancestral_cfg_pp_does_not_reduce_because_of_u2():
    sigmas = get_sigmas("karras", 15).to(F64)
    x = start(sigmas)
    a = sample("dpmpp_2s_ancestral_cfg_pp", same_pair, x.clone(), sigmas, cfg_scale=1.0, seed=4)
    b = sample("dpmpp_2s_ancestral", same_pair, x.clone(), sigmas, cfg_scale=1.0, seed=4)
    assert (a - b).abs().max() > 1e-3


def test_cfg_pp_evaluates_uncond_even_at_cfg_one():
    # At cfg 1 the guided prediction equals cond, but CFG++ still steers with uncond.
    sigmas = get_sigmas("normal", 6).to(F64)
    x = start(sigmas)
    with_uncond = sample("euler_cfg_pp", nonlinear_pair, x.clone(), sigmas, cfg_scale=1.0, seed=0)
    plain = sample("euler", nonlinear_pair, x.clone(), sigmas, cfg_scale=1.0, seed=0)
    assert (with_uncond - plain).abs().max() > 1e-3


# --- helpers and the run state machine -------------------------------------------------------

def test_ancestral_split_conserves_variance():
    for a, b in [(14.6, 11.0), (1.0, 0.5), (0.2, 0.03)]:
        down, up = ancestral_split(a, b)
        assert down**2 + up**2 == pytest.approx(b**2, rel=1e-12)
        assert up == pytest.approx(math.sqrt(b**2 * (a**2 - b**2) / a**2))
        assert 0 < down < b
    assert ancestral_split(0.5, 0.0) == (0.0, 0.0)


def test_guidance_formula():
    c, u = torch.tensor([2.0], dtype=F64), torch.tensor([0.5], dtype=F64)
    assert guide(c, u, 7.5).item() == pytest.approx(0.5 + 7.5 * 1.5)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "euler_ancestral_cfg_pp",
                                  "dpmpp_2s_ancestral_cfg_pp"])
def test_noise_is_drawn_once_per_step_and_never_on_the_final_step(name):
    sigmas = get_sigmas("karras", 10, name)
    draws = []

    def noise():
        draws.append(len(evaluations))
        return torch.zeros((1, 4, 4, 4), dtype=F64)

    evaluations = []
    run = SamplingRun(name, torch.ones((1, 4, 4, 4), dtype=F64), sigmas, 2.0, noise)
    while not run.done:
        x, sigma = run.pending
        evaluations.append(sigma)
        run.advance(*same_pair(x, sigma))
    assert len(draws) == len(sigmas) - 2  # every step but the last one (to sigma 0)
    # Each draw comes after its step's evaluation(s): two-stage samplers draw after two.
    per_step = 2 if "2s" in name or "dpm_2" in name else 1
    assert draws == [per_step * (i + 1) for i in range(len(draws))]


def test_run_reports_progress_and_rejects_extra_advances():
    sigmas = get_sigmas("normal", 4, "dpm_2")
    run = SamplingRun("dpm_2", torch.zeros((1, 4, 2, 2), dtype=F64), sigmas, 1.0, lambda: None)
    assert run.total_evaluations == 7
    while not run.done:
        x, sigma = run.pending
        run.advance(*same_pair(x, sigma))
    assert run.evaluations_done == 7 and run.result is not None
    with pytest.raises(RuntimeError):
        run.advance(x, x)


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(UnknownNameError) as error:
        sample("dpmpp_2m", same_pair, torch.zeros(1, 4, 2, 2), get_sigmas("normal", 3), cfg_scale=1.0, seed=0)
    assert error.value.kind == "sampler"
    for name in SAMPLER_NAMES:
        assert name in str(error.value)
