"""Analytic toy denoisers for sampler tests.

For data drawn from N(mu, var) the exact x0-prediction at noise level s is
mu + var / (var + s^2) * (x - mu), and the probability-flow ODE has a closed-form solution,
so a sampler's error can be measured exactly. A mild nonlinearity can be added so that a
wrong evaluation point shows up in comparisons (a linear model forgives some mistakes).
"""

from __future__ import annotations

import math

import torch

COND_MEAN, UNCOND_MEAN, VARIANCE = 0.7, -0.3, 0.25


def gaussian_x0(x: torch.Tensor, sigma, mean: float, variance: float = VARIANCE) -> torch.Tensor:
    return mean + variance / (variance + sigma**2) * (x - mean)


def exact_ode(x_start: torch.Tensor, sigma_start: float, sigma_end: float, mean: float, variance: float = VARIANCE):
    """Where the probability-flow ODE of N(mean, variance) data takes x_start at sigma_end."""
    return mean + (x_start - mean) * math.sqrt((variance + sigma_end**2) / (variance + sigma_start**2))


def as_column(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as given by sample() (shape [batch]) or a float, broadcast over x's other dims."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


def nonlinear_pair(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) with different means and a nonlinearity; elementwise per sample."""
    s = as_column(sigma, x)
    cond = gaussian_x0(x, s, COND_MEAN) + 0.05 * torch.sin(3 * x) / (1 + s)
    uncond = gaussian_x0(x, s, UNCOND_MEAN) + 0.03 * torch.cos(2 * x) / (1 + s)
    return cond, uncond


def same_pair(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """cond == uncond: guidance has no effect and the exact Gaussian ODE applies."""
    d = gaussian_x0(x, as_column(sigma, x), COND_MEAN)
    return d, d.clone()


# Rounding operations in one sampler step on these toys, counted generously: the longest step
# (dpmpp_2s_ancestral_cfg_pp) evaluates the pair twice (about 24 operations each: two Gaussian
# x0s and two sin/cos terms) and updates x with about 20 more; twice that, for the rest.
OPERATIONS_PER_STEP = 128


def sampler_tolerance(x_start: torch.Tensor, sigmas: torch.Tensor) -> float:
    """float64 rounding bound between two implementations of the same sampler on these toys:
    elementwise arithmetic on values no larger than the starting latent (tests/support/tolerance.py)."""
    from tests.support.tolerance import EPS64, elementwise_bound

    steps = len(sigmas) - 1
    return elementwise_bound(eps=EPS64, magnitude=x_start.abs().max().item(), operations=steps * OPERATIONS_PER_STEP)



# --- the toys as a v-prediction network ------------------------------------------------------

def velocity(x: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """The velocity a v-prediction network outputs at (x, sigma) for the clean estimate x0:
    v = alpha * eps - s * x0 with alpha = 1 / sqrt(sigma^2 + 1), s = sigma * alpha and
    eps = (x - x0) / sigma (Salimans and Ho 2022, with sigma_data = 1), written out."""
    alpha = 1 / torch.sqrt(sigma**2 + 1)
    return alpha * (x - x0) / sigma - sigma * alpha * x0


def v_network(x_in: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """nonlinear_pair as a v-prediction UNet sees it: its input is x / sqrt(sigma^2 + 1), its
    outputs are the (cond, uncond) velocities."""
    s = as_column(sigma, x_in)
    x = x_in * torch.sqrt(s**2 + 1)
    cond, uncond = nonlinear_pair(x, s)
    return velocity(x, s, cond), velocity(x, s, uncond)


# Rounding operations the v-parameterisation adds to a sampler step on these toys, counted
# generously: per evaluation the input scale (4), the network's own undoing of it (3), two
# velocities (8 each) and two conversions back to x0 (6 each), about 35; RescaleCFG's
# elementwise part (two velocities, the guided one, the mix and back: about 20). Two
# evaluations in a two-stage step, and twice that for the rest, as OPERATIONS_PER_STEP counts.
V_OPERATIONS_PER_STEP = 256
