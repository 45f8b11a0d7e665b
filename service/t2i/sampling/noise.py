"""Seeds and noise, per request (docs/sampling.md, "Noise and seeds").

The starting noise is drawn on the CPU so that a seed gives the same image on every machine;
ancestral noise comes from one generator per request on the sampling device. Nothing here
touches the global RNG, so concurrent requests cannot disturb each other's draws.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_SEED = 2**63 - 1
RANDOM_SEED = -1
LATENT_CHANNELS = 4
LATENT_SCALE = 8  # VAE downsampling factor: latent side = pixel side / 8


def resolve_seed(seed: int) -> int:
    """-1 picks a fresh random seed in [0, 2^63 - 1]; any other seed is used as given."""
    if seed == RANDOM_SEED:
        return secrets.randbelow(MAX_SEED + 1)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be -1 or in [0, {MAX_SEED}], got {seed}")
    return seed


def latent_shape(height: int, width: int) -> tuple[int, int, int, int]:
    return (1, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE)


def initial_noise(seed: int, shape: Sequence[int]) -> Tensor:
    """Float32 Gaussian noise from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def starting_latent(noise: Tensor, first_sigma: float, sigma_max: float, latent: Tensor | None = None) -> Tensor:
    """Scale unit noise to the first sigma of the run and add it to the latent image (image to
    image; text-to-image has none, ComfyUI's empty latent of zeros).

    A run that starts at the top of the schedule uses sqrt(1 + s0^2): the variance of a
    (unit-variance) latent plus noise of std s0, as at training time. Any other start (a
    partial denoise) uses s0 itself.
    """
    at_max = first_sigma > sigma_max or math.isclose(first_sigma, sigma_max, rel_tol=1e-5)
    scaled = noise * (math.sqrt(1.0 + first_sigma**2) if at_max else first_sigma)
    return scaled if latent is None else scaled + latent


class AncestralNoise:
    """The per-request source of ancestral noise: one generator on x's device, seeded once."""

    def __init__(self, seed: int, like: Tensor) -> None:
        self.generator = torch.Generator(device=like.device).manual_seed(seed)
        self.shape = tuple(like.shape)
        self.dtype = like.dtype
        self.device = like.device

    def __call__(self) -> Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype, device=self.device)
