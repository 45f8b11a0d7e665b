"""The seven KSampler schedulers: step count -> descending sigma list ending in 0.

Each scheduler is a pure function of a SigmaTable and a step count. Formulas and rounding
follow docs/sampling.md ("Schedulers"); where the spec says float32, the arithmetic stays in
float32 so that the sigmas match ComfyUI's bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import beta as beta_distribution

from .names import SAMPLER_NAMES, SCHEDULER_NAMES, check_name
from .sigma_table import SigmaTable

Scheduler = Callable[[SigmaTable, int], torch.Tensor]

BETA_ALPHA = 0.6
BETA_BETA = 0.6
KARRAS_RHO = 7.0

# ComfyUI's KSampler asks these samplers' schedules for one step more and drops the last
# non-zero sigma (docs/sampling.md, "KSampler quirk").
DISCARD_PENULTIMATE_SIGMA = frozenset({"dpm_2", "dpm_2_ancestral"})


def _with_final_zero(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = sigmas.to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def normal(table: SigmaTable, n: int) -> torch.Tensor:
    t = torch.linspace(table.last_timestep, 0, n, dtype=torch.float32)
    return _with_final_zero(table.sigma(t))


def sgm_uniform(table: SigmaTable, n: int) -> torch.Tensor:
    t = torch.linspace(table.last_timestep, 0, n + 1, dtype=torch.float32)[:-1]
    return _with_final_zero(table.sigma(t))


def simple(table: SigmaTable, n: int) -> torch.Tensor:
    count = len(table.sigmas)
    # Exact integer floor of k * count / n; see docs/sampling.md ("simple").
    index = [table.last_timestep - (k * count) // n for k in range(n)]
    return _with_final_zero(table.sigmas[index])


def ddim_uniform(table: SigmaTable, n: int) -> torch.Tensor:
    # Uniform integer stride from timestep 1 upwards; may give n + 1 sigmas, and the largest
    # need not be sigma_max.
    stride = max(len(table.sigmas) // n, 1)
    timesteps = list(range(1, len(table.sigmas), stride))
    return _with_final_zero(table.sigmas[timesteps[::-1]])


def beta(table: SigmaTable, n: int) -> torch.Tensor:
    u = 1.0 - np.arange(n, dtype=np.float64) / n
    t = np.rint(beta_distribution.ppf(u, BETA_ALPHA, BETA_BETA) * table.last_timestep).astype(np.int64)
    # Neighbouring quantiles can round to the same timestep; a repeated sigma would be a
    # zero-length step, so it is dropped (the run then has fewer than n steps).
    keep = np.concatenate([[True], t[1:] != t[:-1]])
    return _with_final_zero(table.sigmas[torch.from_numpy(t[keep])])


def karras(table: SigmaTable, n: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float32)
    min_inv_rho = table.sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = table.sigma_max ** (1 / KARRAS_RHO)
    return _with_final_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO)


def exponential(table: SigmaTable, n: int) -> torch.Tensor:
    log_sigmas = torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), n, dtype=torch.float32)
    return _with_final_zero(log_sigmas.exp())


SCHEDULERS: dict[str, Scheduler] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def compute_sigmas(table: SigmaTable, scheduler: str, steps: int, sampler: str | None = None) -> torch.Tensor:
    """The float32 sigma list a KSampler run with these settings uses, final 0 included."""
    check_name("scheduler", scheduler, SCHEDULER_NAMES)
    if sampler is not None:
        check_name("sampler", sampler, SAMPLER_NAMES)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if sampler in DISCARD_PENULTIMATE_SIGMA:
        sigmas = SCHEDULERS[scheduler](table, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return SCHEDULERS[scheduler](table, steps)
