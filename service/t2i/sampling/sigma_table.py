"""A discrete model's noise levels: the table every scheduler and the denoiser read from.

Formulas follow docs/sampling.md ("The SDXL sigma table", "Zero terminal SNR"). The table is
kept in float32 because that is the precision ComfyUI stores it in; schedules derived from it
must round the same way to give the same sigmas. Everything before that rounding runs in
float64, zero-terminal-SNR rescaling included.
"""

from __future__ import annotations

import functools
import math

import torch

TRAIN_TIMESTEPS = 1000
SDXL_BETA_START = 0.00085
SDXL_BETA_END = 0.012
# A zero-terminal-SNR table ends at alpha-bar 0 in theory, which is an infinite sigma. The last
# alpha-bar is set to this small value instead (ComfyUI's choice, so that the same checkpoint
# gives the same sigmas there); sigma_max then comes out at about 4.5e3.
ZERO_TERMINAL_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def scaled_linear_betas(
    beta_start: float = SDXL_BETA_START,
    beta_end: float = SDXL_BETA_END,
    timesteps: int = TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Betas linear in sqrt-space ("scaled_linear"), computed in float64."""
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    t = torch.arange(timesteps, dtype=torch.float64)
    return (lo + t * (hi - lo) / (timesteps - 1)) ** 2


def rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """The same schedule shifted and scaled so that its last step carries no signal at all.

    sqrt(alpha-bar) is moved down by its last value and stretched back to its first value, so
    the first timestep is unchanged and the last one has zero signal (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1, written on sigmas).
    Float64 in, float64 out."""
    sigmas = sigmas.to(torch.float64)
    root = (1.0 / (sigmas * sigmas + 1.0)).sqrt()
    first, last = float(root[0]), float(root[-1])
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alpha_bar[-1] = ZERO_TERMINAL_SNR_LAST_ALPHA_BAR
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


class SigmaTable:
    """sigma[t] for the integer training timesteps of a discrete (DDPM-trained) model.

    `zero_terminal_snr` rescales the table so that its last timestep is (almost) pure noise, as
    NoobAI-XL v-pred and other zero-terminal-SNR checkpoints were trained."""

    def __init__(self, betas: torch.Tensor, zero_terminal_snr: bool = False) -> None:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        if zero_terminal_snr:
            sigmas = rescale_zero_terminal_snr(sigmas)
        self.zero_terminal_snr = zero_terminal_snr
        self.sigmas = sigmas.to(torch.float32)
        self.log_sigmas = self.sigmas.log()
        # Python floats of the float32 values: schedules use them as scalars, like ComfyUI does.
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    @classmethod
    @functools.cache
    def sdxl(cls, zero_terminal_snr: bool = False) -> SigmaTable:
        return cls(scaled_linear_betas(), zero_terminal_snr)

    @property
    def last_timestep(self) -> int:
        return len(self.sigmas) - 1

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at fractional timesteps: linear interpolation of ln(sigma), in float32."""
        t = t.to(torch.float32).clamp(0, self.last_timestep)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def timestep(self, sigma: float) -> int:
        """The integer timestep whose table sigma is nearest in log space.

        The UNet was trained on integer timesteps only; feeding it the nearest one (rather than
        a fractional value) is what ComfyUI does, and parity depends on it.
        """
        if not sigma > 0:
            raise ValueError(f"sigma must be positive to map to a timestep, got {sigma}")
        # float32 like the table itself, so near-ties resolve as they do in ComfyUI.
        log_sigma = torch.tensor(sigma, dtype=torch.float32).log()
        return int((log_sigma - self.log_sigmas).abs().argmin())
