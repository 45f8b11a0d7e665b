import math

import numpy as np
import pytest
import scipy.stats
import torch

from t2i.sampling import SCHEDULER_NAMES, SigmaTable, UnknownNameError, compute_sigmas, get_sigmas
from t2i.sampling import scaled_linear_betas

TABLE = SigmaTable.sdxl()
STEP_COUNTS = [1, 2, 3, 7, 10, 28, 38, 76, 150]

EPS32 = torch.finfo(torch.float32).eps
LOG_SIGMAS = TABLE.sigmas.double().log()
MAX_LOG_SIGMA = LOG_SIGMAS.abs().max().item()  # |ln sigma| <= 3.6
# Interpolating the table at t: float32 rounds t by up to eps * t, which moves ln sigma by the
# table's slope there times that; the largest t * slope over the table.
MAX_T_SLOPE = (torch.arange(1, 1000, dtype=torch.float64) * LOG_SIGMAS.diff().abs()).max().item()
# float32 interpolation in log space against float64: the exponent carries four roundings of
# values up to MAX_LOG_SIGMA (two logs, the weights, the sum), plus the rounding of t; exp adds
# one ulp and the result's rounding half of one. As a relative error of sigma:
INTERPOLATION_RTOL = EPS32 * (4 * MAX_LOG_SIGMA / 2 + MAX_T_SLOPE + 1.5)


def test_sdxl_table_matches_the_documented_constants():
    assert TABLE.sigmas.dtype == torch.float32
    assert len(TABLE.sigmas) == 1000
    assert TABLE.sigma_min == pytest.approx(0.0291672, rel=1e-5)
    assert TABLE.sigma_max == pytest.approx(14.614641, rel=1e-6)
    # Independent float64 computation of the same formula.
    t = np.arange(1000, dtype=np.float64)
    betas = (math.sqrt(0.00085) + t * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    abar = np.cumprod(1 - betas)
    expected = np.sqrt((1 - abar) / abar).astype(np.float32)
    assert np.array_equal(TABLE.sigmas.numpy(), expected)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_every_schedule_is_descending_positive_and_ends_in_zero(scheduler, steps):
    sigmas = get_sigmas(scheduler, steps)
    assert sigmas.dtype == torch.float32
    assert sigmas[-1] == 0
    assert torch.all(sigmas[:-1] > 0)
    assert torch.all(sigmas[:-1] > sigmas[1:]), "sigmas must be strictly decreasing"
    assert sigmas[0] <= TABLE.sigma_max * (1 + 1e-5)
    assert sigmas[-2] >= TABLE.sigma_min * (1 - 1e-5)
    if scheduler == "ddim_uniform":
        # One sigma per stride of 1000 // n from timestep 1: at least n, more when the
        # stride does not divide 999 evenly (n = 150 gives 167).
        assert len(sigmas) - 1 == len(range(1, 1000, 1000 // steps)) >= steps
    elif scheduler == "beta":
        assert 1 <= len(sigmas) - 1 <= steps
    else:
        assert len(sigmas) == steps + 1


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "sgm_uniform", "simple", "beta"])
def test_schedules_start_at_sigma_max(scheduler):
    assert get_sigmas(scheduler, 28)[0].item() == pytest.approx(TABLE.sigma_max, rel=1e-5)


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential"])
def test_full_range_schedules_end_at_sigma_min(scheduler):
    assert get_sigmas(scheduler, 28)[-2].item() == pytest.approx(TABLE.sigma_min, rel=1e-5)


def _sigma_at(t: float) -> float:
    """Independent float64 version of the spec's log-linear interpolation."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    logs = TABLE.sigmas.double().log()
    return math.exp((1 - w) * logs[lo].item() + w * logs[hi].item())


@pytest.mark.parametrize("steps", [1, 5, 28])
def test_normal_interpolates_linspace_timesteps(steps):
    sigmas = get_sigmas("normal", steps)
    ts = np.linspace(999, 0, steps)
    expected = [_sigma_at(t) for t in ts]
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=INTERPOLATION_RTOL)


@pytest.mark.parametrize("steps", [1, 5, 28])
def test_sgm_uniform_drops_the_last_linspace_point(steps):
    sigmas = get_sigmas("sgm_uniform", steps)
    expected = [_sigma_at(999 - 999 * k / steps) for k in range(steps)]
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=INTERPOLATION_RTOL)
    # It never reaches the table's minimum, unlike normal.
    assert sigmas[-2] > TABLE.sigma_min * 2


@pytest.mark.parametrize("steps", [3, 28, 38, 76, 122])
def test_simple_uses_exact_integer_strides(steps):
    sigmas = get_sigmas("simple", steps)
    expected = TABLE.sigmas[[999 - (k * 1000) // steps for k in range(steps)]]
    assert torch.equal(sigmas[:-1], expected)


def test_ddim_uniform_can_return_one_step_more():
    sigmas = get_sigmas("ddim_uniform", 28)
    assert len(sigmas) == 30  # 29 sigmas + the final 0
    stride = 1000 // 28
    expected_t = list(range(1, 1000, stride))[::-1]
    assert expected_t[0] == 981
    assert torch.equal(sigmas[:-1], TABLE.sigmas[expected_t])
    assert sigmas[0] < TABLE.sigma_max  # does not start at sigma_max
    assert len(get_sigmas("ddim_uniform", 10)) == 11  # stride 100 divides evenly: n sigmas


def test_ddim_uniform_with_more_steps_than_timesteps_has_stride_one():
    sigmas = compute_sigmas(TABLE, "ddim_uniform", 2000)
    assert len(sigmas) == 1000  # timesteps 1..999, then 0


def _beta_timesteps(n):
    u = 1 - np.arange(n) / n
    return np.rint(999 * scipy.stats.beta.ppf(u, 0.6, 0.6)).astype(int)


def test_beta_drops_repeated_timesteps():
    n = 150
    raw = _beta_timesteps(n)
    assert len(set(raw.tolist())) < n, "the test needs a step count that produces duplicates"
    kept = [t for i, t in enumerate(raw) if i == 0 or t != raw[i - 1]]
    sigmas = get_sigmas("beta", n)
    assert len(sigmas) == len(kept) + 1 < n + 1
    assert torch.equal(sigmas[:-1], TABLE.sigmas[kept])


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_beta_matches_spec_without_duplicates(steps):
    raw = _beta_timesteps(steps)
    assert len(set(raw.tolist())) == steps
    assert torch.equal(get_sigmas("beta", steps)[:-1], TABLE.sigmas[raw])


def test_karras_and_exponential_follow_their_closed_forms():
    n = 28
    ramp = np.linspace(0, 1, n)
    rho = 7
    high, low = TABLE.sigma_max ** (1 / rho), TABLE.sigma_min ** (1 / rho)
    karras = (high + ramp * (low - high)) ** rho
    # float32 against float64: the base high + ramp * (low - high) carries six roundings (high,
    # low, their difference, the ramp point, the product, the sum) of values up to `high` in a
    # result of at least `low`: up to 6/2 * high/low eps relative; the power multiplies that by
    # rho and adds one ulp, the final rounding another.
    karras_rtol = EPS32 * (rho * 6 / 2 * high / low + 2)
    np.testing.assert_allclose(get_sigmas("karras", n)[:-1].numpy(), karras, rtol=karras_rtol)
    exponential = np.exp(np.linspace(math.log(TABLE.sigma_max), math.log(TABLE.sigma_min), n))
    # The exponent: three roundings (the two end points, the linspace point) of values up to
    # MAX_LOG_SIGMA; exp adds one ulp and the final rounding half of one.
    exponential_rtol = EPS32 * (3 * MAX_LOG_SIGMA / 2 + 1.5)
    np.testing.assert_allclose(get_sigmas("exponential", n)[:-1].numpy(), exponential, rtol=exponential_rtol)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral"])
@pytest.mark.parametrize("steps", [1, 5, 28])
def test_dpm_2_quirk_drops_the_last_nonzero_sigma_of_an_n_plus_1_schedule(scheduler, sampler, steps):
    longer = get_sigmas(scheduler, steps + 1)
    quirked = get_sigmas(scheduler, steps, sampler)
    assert torch.equal(quirked, torch.cat([longer[:-2], longer[-1:]]))
    if scheduler in ("normal", "karras", "exponential", "sgm_uniform", "simple"):
        assert len(quirked) == steps + 1  # still n steps
        # ...but it stops at a larger final sigma than the plain n+1 schedule.
        assert quirked[-2] > longer[-2]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "euler_cfg_pp"])
def test_quirk_only_for_dpm_2_samplers(sampler):
    assert torch.equal(get_sigmas("karras", 12, sampler), get_sigmas("karras", 12))


def test_unknown_scheduler_lists_the_valid_names():
    with pytest.raises(UnknownNameError) as error:
        get_sigmas("linear", 10)
    message = str(error.value)
    assert "'linear'" in message
    for name in SCHEDULER_NAMES:
        assert name in message


def test_unknown_sampler_in_get_sigmas_is_rejected():
    with pytest.raises(UnknownNameError, match="valid samplers are: euler, euler_cfg_pp"):
        get_sigmas("normal", 10, "dpmpp_2m")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_invalid_step_counts_are_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("normal", steps)


def test_timestep_is_the_nearest_integer_in_log_space():
    for t in (0, 1, 500, 998, 999):
        assert TABLE.timestep(float(TABLE.sigmas[t])) == t
    # Just above the log-midpoint between two entries rounds up, just below rounds down.
    lo, hi = TABLE.sigmas[400].double().log().item(), TABLE.sigmas[401].double().log().item()
    mid = (lo + hi) / 2
    assert TABLE.timestep(math.exp(mid + 1e-4)) == 401
    assert TABLE.timestep(math.exp(mid - 1e-4)) == 400
    # Beyond the table's ends it clamps to the first and last timestep.
    assert TABLE.timestep(100.0) == 999
    assert TABLE.timestep(1e-4) == 0
    with pytest.raises(ValueError):
        TABLE.timestep(0.0)


def test_a_different_eps_model_table_drives_every_scheduler():
    # A 500-step model with its own betas: schedules must follow its table, not SDXL's.
    table = SigmaTable(scaled_linear_betas(0.0001, 0.02, timesteps=500))
    assert table.last_timestep == 499
    for scheduler in SCHEDULER_NAMES:
        sigmas = compute_sigmas(table, scheduler, 20)
        assert sigmas[-1] == 0 and torch.all(sigmas[:-1] > sigmas[1:])
        assert sigmas[0] <= table.sigma_max * (1 + 1e-5)
    assert compute_sigmas(table, "normal", 20)[0].item() == pytest.approx(table.sigma_max, rel=1e-5)
    assert compute_sigmas(table, "simple", 20)[0].item() == table.sigma_max
