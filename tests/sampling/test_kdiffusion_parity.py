"""k-diffusion as an independent oracle: same sigmas, same noise draws, float64, within the
rounding bound of elementwise float64 arithmetic (toy.sampler_tolerance)."""

import pytest
import torch

from t2i.sampling import SigmaTable, get_sigmas, sample
from t2i.sampling.guidance import guide

from .kdiffusion_oracle import SAMPLER_FUNCTIONS, load_kdiffusion_sampling, run_kdiffusion
from .toy import nonlinear_pair, sampler_tolerance

K = load_kdiffusion_sampling()
TABLE = SigmaTable.sdxl()

ORACLE_SAMPLERS = tuple(SAMPLER_FUNCTIONS)
SEED = 1234


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run_oracle(name, x, sigmas, cfg_scale):
    def model(x_in, sigma):
        return guide(*nonlinear_pair(x_in, sigma), cfg_scale)

    return run_kdiffusion(name, model, x, sigmas, SEED)


@pytest.mark.parametrize("name", list(ORACLE_SAMPLERS))
@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "simple", "ddim_uniform", "beta", "sgm_uniform"])
@pytest.mark.parametrize("steps,cfg_scale", [(7, 5.5), (28, 7.5)])
def test_samplers_match_kdiffusion(name, scheduler, steps, cfg_scale):
    sigmas = get_sigmas(scheduler, steps, name).to(torch.float64)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * sigmas[0]
    ours = sample(name, nonlinear_pair, x.clone(), sigmas, cfg_scale=cfg_scale, seed=SEED)
    oracle = _run_oracle(name, x.clone(), sigmas, cfg_scale)
    assert ours.dtype == torch.float64
    assert torch.isfinite(ours).all()
    assert _difference(ours, oracle) <= sampler_tolerance(x, sigmas)


def test_oracle_comparison_can_fail():
    # Guard against a vacuous comparison: a different seed or cfg must be detected.
    sigmas = get_sigmas("karras", 10).to(torch.float64)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * sigmas[0]
    oracle = _run_oracle("euler_ancestral", x.clone(), sigmas, 6.0)
    other_seed = sample("euler_ancestral", nonlinear_pair, x.clone(), sigmas, cfg_scale=6.0, seed=SEED + 1)
    other_cfg = sample("euler", nonlinear_pair, x.clone(), sigmas, cfg_scale=6.5, seed=SEED)
    tolerance = sampler_tolerance(x, sigmas)
    assert _difference(other_seed, oracle) > 100 * tolerance
    assert _difference(other_cfg, _run_oracle("euler", x.clone(), sigmas, 6.0)) > 100 * tolerance


@pytest.mark.parametrize("steps", [1, 2, 10, 28, 150])
def test_karras_and_exponential_sigmas_match_kdiffusion(steps):
    karras = K.get_sigmas_karras(steps, TABLE.sigma_min, TABLE.sigma_max)
    exponential = K.get_sigmas_exponential(steps, TABLE.sigma_min, TABLE.sigma_max)
    for ours, oracle in ((get_sigmas("karras", steps), karras), (get_sigmas("exponential", steps), exponential)):
        assert ours.shape == oracle.shape
        assert ours.dtype == oracle.dtype == torch.float32
        # The same float32 formula in the same torch operations, elementwise: the same bits on
        # any machine (a tolerance under float32's spacing would be equality anyway).
        assert torch.equal(ours, oracle)
