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

