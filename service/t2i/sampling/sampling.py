"""The scripting API: a sigma list for a scheduler, and a whole run over a denoiser callable.

The serving engine does not use `sample()` (it drives `SamplingRun`s itself so that it can
batch many requests into one forward); tests and scripts do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .noise import AncestralNoise
from .run import SamplingRun
from .schedulers import compute_sigmas
from .sigma_table import SigmaTable

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def get_sigmas(scheduler: str, steps: int, sampler: str | None = None, *, zero_terminal_snr: bool = False) -> torch.Tensor:
    """SDXL's float32 sigma list for `steps` steps, ending in 0.

    Passing `sampler` applies ComfyUI KSampler's quirk for dpm_2 and dpm_2_ancestral;
    `zero_terminal_snr` schedules on the zero-terminal-SNR table (sigma_max about 4.5e3).
    """
    return compute_sigmas(SigmaTable.sdxl(zero_terminal_snr), scheduler, steps, sampler)


def sample(
    sampler: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cfg_scale: float,
    seed: int,
    cfg_rescale: float = 0.0,
) -> Tensor:
    """Run `sampler` from `x` (already scaled to sigmas[0]) down to sigma 0.

    `denoiser(x, sigma)` gets sigma as a tensor of shape [batch] in x's dtype and device, as
    k-diffusion passes it, and returns the (cond, uncond) x0-predictions (a v-prediction model
    converts its output first: prediction.to_x0). `cfg_rescale` is RescaleCFG's multiplier.
    """
    run = SamplingRun(sampler, x, sigmas, cfg_scale, AncestralNoise(seed, x), cfg_rescale)
    while run.pending is not None:
        x_eval, sigma = run.pending
        cond, uncond = denoiser(x_eval, x_eval.new_full((x_eval.shape[0],), sigma))
        run.advance(cond, uncond)
    return run.result
