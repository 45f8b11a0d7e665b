"""Runs that start from a latent image rather than from pure noise (docs/image-to-image.md).

- `partial_sigmas`: ComfyUI KSampler's `denoise`. Below 1, the schedule is made for
  int(steps / denoise) steps with the scheduler's usual rules (dpm_2's extra step included)
  and only its last `steps` steps are run, so a request always runs exactly `steps` steps.
- `starting_latent` (noise.py) adds the scaled noise to the latent image.
- `LatentMask`: inpainting with a latent noise mask (ComfyUI's SetLatentNoiseMask). The
  samplers never see it: the run blends what the model is shown, and the guidance blends
  what the model predicts, so every sampler inpaints the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .guidance import Guidance
from .schedulers import compute_sigmas
from .sigma_table import SigmaTable

# KSampler treats a denoise this close to 1 as 1 (its comparison is `> 0.9999`).
FULL_DENOISE = 0.9999


def schedule_steps(steps: int, denoise: float) -> int:
    """The steps the schedule is made for: `steps`, or int(steps / denoise) below full denoise
    (truncated, as KSampler does)."""
    return steps if denoise > FULL_DENOISE else int(steps / denoise)


def partial_sigmas(table: SigmaTable, scheduler: str, steps: int, sampler: str | None, denoise: float) -> Tensor:
    """The sigmas a run of `steps` steps at `denoise` takes: the last steps + 1 of the
    schedule for schedule_steps(steps, denoise) steps (ending in 0)."""
    sigmas = compute_sigmas(table, scheduler, schedule_steps(steps, denoise), sampler)
    return sigmas if denoise > FULL_DENOISE else sigmas[-(steps + 1):]


def resize_mask(mask: Tensor, latent: Tensor) -> Tensor:
    """An (H, W) mask at the latent's (N, C, h, w) shape: bilinear with torch's defaults from the
    mask's own full size, then repeated over channels and images, as ComfyUI prepares it."""
    resized = torch.nn.functional.interpolate(mask.reshape(1, 1, *mask.shape[-2:]).float(), size=latent.shape[-2:], mode="bilinear")
    return resized.to(latent.device, latent.dtype).expand(latent.shape[0], latent.shape[1], -1, -1).contiguous()


@dataclass(frozen=True)
class LatentMask:
    """A latent noise mask: 1 re-draws, 0 keeps the latent image, values between blend.

    Before every model evaluation at sigma the model is shown
        x * m + (latent + noise * sigma) * (1 - m)
    (the kept area as the latent image noised to sigma, with the run's own start noise), and the
    guided x0-prediction is blended as x0 * m + latent * (1 - m).
    """

    mask: Tensor  # (N, C, h, w), resize_mask's output
    latent: Tensor  # the latent image (already scaled into the model's space), (N, C, h, w)
    noise: Tensor  # the run's unit start noise, (N, C, h, w)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", 1.0 - self.mask)

    def model_input(self, x: Tensor, sigma: float) -> Tensor:
        return x * self.mask + (self.noise * sigma + self.latent) * self.keep

    def prediction(self, x0: Tensor) -> Tensor:
        return x0 * self.mask + self.latent * self.keep


@dataclass(frozen=True)
class MaskedGuidance:
    """A request's guidance under a latent noise mask: the base guidance at the point the model
    was shown, then the blend of its x0-prediction (what the samplers step with)."""

    base: Guidance
    mask: LatentMask

    def __call__(self, x: Tensor, sigma: float, cond: Tensor, uncond: Tensor) -> Tensor:
        return self.at_input(self.mask.model_input(x, sigma), sigma, cond, uncond)

    def at_input(self, shown: Tensor, sigma: float, cond: Tensor, uncond: Tensor) -> Tensor:
        """The same, from the model's input itself (what a preview has at hand)."""
        return self.mask.prediction(self.base(shown, sigma, cond, uncond))
