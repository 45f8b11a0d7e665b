"""Classifier-free guidance, plain or with RescaleCFG, on x0-predictions.

The samplers get the model's (cond, uncond) x0-predictions at a point (x, sigma) and ask a
`Guidance` for the guided x0 there. Plain cfg is `uncond + cfg * (cond - uncond)`.

RescaleCFG (Lin et al. 2023, section 3.4; ComfyUI's RescaleCFG node) works on the velocities
the two predictions stand for: it scales the guided velocity back to the spread (standard
deviation over C, H, W of each image) of the conditional one, and mixes that with the plain
guided velocity by the multiplier phi. Guidance at large scales inflates the spread of the
prediction, which is what burns the colours of zero-terminal-SNR models; the rescale undoes
that. phi = 0 is plain cfg, and it is computed as plain cfg then (the formulas agree, but the
rounding would not). It works on any model, epsilon ones too: the velocity is only a way to
read an x0-prediction. Formulas: docs/sampling.md, "RescaleCFG".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .prediction import SIGMA_DATA


def guide(cond: Tensor, uncond: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance on x0-predictions."""
    return uncond + (cond - uncond) * cfg_scale


def rescale_cfg(x: Tensor, sigma: float, cond: Tensor, uncond: Tensor, cfg_scale: float, multiplier: float) -> Tensor:
    """The guided x0-prediction at (x, sigma) with RescaleCFG of `multiplier` (phi)."""
    variance = sigma * sigma + SIGMA_DATA**2
    root = math.sqrt(variance)
    scaled = x / variance  # the x0 a velocity of 0 would mean
    to_velocity = root / (sigma * SIGMA_DATA)
    v_cond = (scaled - cond) * to_velocity
    v_uncond = (scaled - uncond) * to_velocity
    v_guided = v_uncond + (v_cond - v_uncond) * cfg_scale
    per_image = tuple(range(1, x.ndim))
    # Per image (torch's default, unbiased std): an image's rescale never depends on another's.
    ratio = v_cond.std(dim=per_image, keepdim=True) / v_guided.std(dim=per_image, keepdim=True)
    v_final = v_guided * ratio * multiplier + v_guided * (1.0 - multiplier)
    return scaled - v_final * (sigma * SIGMA_DATA / root)


@dataclass(frozen=True)
class Guidance:
    """A request's guidance: cfg scale and RescaleCFG multiplier (0: plain cfg)."""

    cfg_scale: float
    rescale: float = 0.0

    def __call__(self, x: Tensor, sigma: float, cond: Tensor, uncond: Tensor) -> Tensor:
        """The guided x0-prediction from the (cond, uncond) predictions evaluated at (x, sigma)."""
        if self.rescale == 0:
            return guide(cond, uncond, self.cfg_scale)
        return rescale_cfg(x, sigma, cond, uncond, self.cfg_scale, self.rescale)
