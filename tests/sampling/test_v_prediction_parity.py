"""Every sampler on every scheduler of the zero-terminal-SNR table (sigma_max about 4.5e3), on
a v-prediction toy network, against independent code, with plain cfg and with RescaleCFG:

- ours: the service's input scale and v -> x0 conversion (t2i.sampling.prediction), its
  schedules on SigmaTable.sdxl(zero_terminal_snr=True), its samplers and its RescaleCFG;
- the oracle: the same float32 sigmas, k-diffusion's v-parameterisation (VDenoiser's scalings)
  around the same toy network, RescaleCFG transcribed here from docs/sampling.md, and
  k-diffusion's samplers for the five it has, spec_cfg_pp.py's transcriptions for the CFG++
  three.

Both run in float64 with the same noise draws, so they differ by rounding only; the bound is
derived below from the magnitudes and the operations (tests/support/tolerance.py)."""

import math

import pytest
import torch

from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, V_PREDICTION, get_sigmas, input_scale, sample, to_x0

from ..support.tolerance import EPS64, elementwise_bound, reduction_bound
from .kdiffusion_oracle import SAMPLER_FUNCTIONS, load_kdiffusion_external, run_kdiffusion
from .spec_cfg_pp import SPEC_CFG_PP
from .toy import OPERATIONS_PER_STEP, V_OPERATIONS_PER_STEP, as_column, v_network

SCALINGS = load_kdiffusion_external().VDenoiser(None).get_scalings
assert set(SAMPLER_FUNCTIONS) | set(SPEC_CFG_PP) == set(SAMPLER_NAMES)
SEED = 4321
STEPS = 10
GUIDANCE = [(5.5, 0.0), (7.0, 0.7)]  # (cfg scale, RescaleCFG multiplier)
VELOCITY_OPERATIONS = 10  # rounding steps from an x0-prediction to its velocity, generously


def ours(x, sigma):
    """The service's reading of the v-network: input scale, then v -> x0."""
    s = as_column(sigma, x)
    v_cond, v_uncond = v_network(x * input_scale(s), sigma)
    return to_x0(V_PREDICTION, x, s, v_cond), to_x0(V_PREDICTION, x, s, v_uncond)


def oracle_pair(x, sigma):
    """k-diffusion's reading: x0 = c_skip * x + c_out * v(c_in * x)."""
    c_skip, c_out, c_in = (as_column(t, x) for t in SCALINGS(torch.as_tensor(sigma, dtype=x.dtype)))
    v_cond, v_uncond = v_network(x * c_in, sigma)
    return v_cond * c_out + x * c_skip, v_uncond * c_out + x * c_skip


class OracleGuidance:
    """Plain cfg or RescaleCFG from docs/sampling.md, transcribed; it records the magnitudes the
    tolerance needs."""

    def __init__(self, cfg, phi):
        self.cfg, self.phi = cfg, phi
        self.evaluations, self.max_velocity, self.min_spread = 0, 0.0, math.inf

    def __call__(self, x, sigma, c, u):
        self.evaluations += 1
        if self.phi == 0:
            return u + self.cfg * (c - u)
        s = as_column(sigma, x)
        xs = x / (s * s + 1)
        vc = (xs - c) * torch.sqrt(s * s + 1) / s
        vu = (xs - u) * torch.sqrt(s * s + 1) / s
        vg = vu + self.cfg * (vc - vu)
        rc, rg = vc.std(dim=(1, 2, 3), keepdim=True), vg.std(dim=(1, 2, 3), keepdim=True)
        vf = self.phi * vg * (rc / rg) + (1 - self.phi) * vg
        self.max_velocity = max(self.max_velocity, *(t.abs().max().item() for t in (vc, vu, vg, vf)))
        self.min_spread = min(self.min_spread, rc.min().item(), rg.min().item())
        return xs - vf * s / torch.sqrt(s * s + 1)


def run_oracle(name, x, sigmas, guidance):
    if name in SPEC_CFG_PP:
        return SPEC_CFG_PP[name](oracle_pair, x, sigmas, guidance, SEED)
    def model(x_in, sigma):
        return guidance(x_in, sigma, *oracle_pair(x_in, sigma))

    return run_kdiffusion(name, model, x, sigmas, SEED)


def tolerance(x, sigmas, guidance: OracleGuidance) -> float:
    """Elementwise rounding of the sampler, the v-parameterisation and RescaleCFG's elementwise
    part, on values no larger than the starting latent (toy.py counts the operations); plus, with
    RescaleCFG, its two standard deviations: each is a sum of C*H*W squares and a mean, which
    err relatively by reduction_bound(magnitude 1, depth 2), and the velocities they sum differ
    between the two sides by their own elementwise rounding, which moves a spread by at most
    that much times sqrt(n / (n - 1)). The ratio of the two errs by both spreads' relative
    errors, and the guided x0 by phi times the largest velocity times that (the factor
    sigma / sqrt(sigma^2 + 1) back to x0 is below 1), once per evaluation."""
    steps = len(sigmas) - 1
    bound = elementwise_bound(eps=EPS64, magnitude=x.abs().max().item(),
                              operations=steps * (OPERATIONS_PER_STEP + V_OPERATIONS_PER_STEP))
    if guidance.phi == 0:
        return bound
    n = x[0].numel()
    velocity_error = elementwise_bound(eps=EPS64, magnitude=guidance.max_velocity, operations=VELOCITY_OPERATIONS)
    spread = reduction_bound(eps=EPS64, magnitude=1.0, terms=n, depth=2) + velocity_error * math.sqrt(n / (n - 1)) / guidance.min_spread
    return bound + guidance.evaluations * guidance.phi * guidance.max_velocity * 2 * spread


def start(sigmas):
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * sigmas[0]


@pytest.mark.parametrize("cfg_scale,phi", GUIDANCE)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_and_scheduler_on_a_v_prediction_zero_terminal_snr_model(name, scheduler, cfg_scale, phi):
    sigmas = get_sigmas(scheduler, STEPS, name, zero_terminal_snr=True).to(torch.float64)
    assert not torch.equal(sigmas, get_sigmas(scheduler, STEPS, name).to(torch.float64))  # the other table
    x = start(sigmas)
    mine = sample(name, ours, x.clone(), sigmas, cfg_scale=cfg_scale, seed=SEED, cfg_rescale=phi)
    guidance = OracleGuidance(cfg_scale, phi)
    oracle = run_oracle(name, x.clone(), sigmas, guidance)
    assert mine.dtype == torch.float64 and torch.isfinite(mine).all()
    assert (mine - oracle).abs().max().item() <= tolerance(x, sigmas, guidance)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral_cfg_pp"])
def test_the_comparison_tells_a_wrong_parameterisation_table_or_rescale_apart(name):
    """Teeth: reading the network as epsilon, scheduling on the ordinary table, or another
    multiplier each lands far outside the bound."""
    sigmas = get_sigmas("karras", STEPS, name, zero_terminal_snr=True).to(torch.float64)
    x = start(sigmas)
    guidance = OracleGuidance(7.0, 0.7)
    oracle = run_oracle(name, x.clone(), sigmas, guidance)
    bound = tolerance(x, sigmas, guidance)

    def as_epsilon(x_in, sigma):
        s = as_column(sigma, x_in)
        return tuple(to_x0("epsilon", x_in, s, v) for v in v_network(x_in * input_scale(s), sigma))

    plain_table = get_sigmas("karras", STEPS, name).to(torch.float64)
    wrong = {
        "epsilon reading": sample(name, as_epsilon, x.clone(), sigmas, cfg_scale=7.0, seed=SEED, cfg_rescale=0.7),
        "ordinary table": sample(name, ours, x.clone() * plain_table[0] / sigmas[0], plain_table, cfg_scale=7.0, seed=SEED,
                                 cfg_rescale=0.7),
        "plain cfg": sample(name, ours, x.clone(), sigmas, cfg_scale=7.0, seed=SEED),
    }
    for what, result in wrong.items():
        assert (result - oracle).abs().max().item() > 100 * bound, what
