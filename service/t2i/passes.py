"""What a request runs: its plan of passes (docs/image-to-image.md, docs/architecture.md).

    (encode the picture) -> denoise pass -> (upscale the latent -> denoise pass) -> decode

Text-to-image is one denoise pass from noise. Image to image encodes the picture first and
denoises part of the way (`denoise`). Hires fix adds a second pass at the upscaled size from
the first pass's latent, never decoded in between. The engine advances a request through its
plan one evaluation at a time (engine/core.py) and pricing sums the same plan's work
(billing/pricing.py), so what is charged is what runs.

Pure: no tensors here, only sizes, steps and sigma lists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .domain import GenerateRequest
from .sampling import SigmaTable, count_evaluations
from .sampling.partial import partial_sigmas

LATENT_SCALE = 8


@dataclass(frozen=True)
class DenoisePass:
    width: int  # pixels: the pass's latent is width / 8 x height / 8
    height: int
    steps: int
    denoise: float
    # How the previous pass's final latent is resized to this pass's size (LatentUpscaleBy's
    # method); None for the first pass, which starts from noise or from the encoded picture.
    upscale: str | None = None

    def sigmas(self, table: SigmaTable, scheduler: str, sampler: str) -> list[float]:
        return partial_sigmas(table, scheduler, self.steps, sampler, self.denoise).tolist()

    def evaluations(self, table: SigmaTable, scheduler: str, sampler: str) -> int:
        return self.totals(table, scheduler, sampler)[1]

    def totals(self, table: SigmaTable, scheduler: str, sampler: str) -> tuple[int, int]:
        """(steps, UNet evaluations) of this pass: what pricing charges and progress counts."""
        return _totals(self, table, scheduler, sampler)


@functools.lru_cache(maxsize=4096)
def _totals(denoise_pass: DenoisePass, table: SigmaTable, scheduler: str, sampler: str) -> tuple[int, int]:
    # Cached because building a schedule costs more than everything else in pricing and in a
    # pass's start; tables are hashed by identity (one per loaded model).
    sigmas = denoise_pass.sigmas(table, scheduler, sampler)
    return len(sigmas) - 1, count_evaluations(sampler, sigmas)


@dataclass(frozen=True)
class Plan:
    encode: bool  # the picture is VAE-encoded (at the first pass's size) before the first pass
    passes: tuple[DenoisePass, ...]

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images: the last pass's size."""
        return self.passes[-1].width, self.passes[-1].height


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The upscaled size: each latent side times `scale`, rounded as Python rounds (halves to
    even), as LatentUpscaleBy does; in pixels."""
    return (round(width // LATENT_SCALE * scale) * LATENT_SCALE, round(height // LATENT_SCALE * scale) * LATENT_SCALE)


def plan(request: GenerateRequest) -> Plan:
    """The plan of a request whose width and height are its first pass's size (a picture's own
    size has been filled in: engine.check)."""
    passes = [DenoisePass(request.width, request.height, request.steps, request.denoise)]
    hires = request.hires_fix
    if hires is not None:
        width, height = hires_size(request.width, request.height, hires.scale)
        passes.append(DenoisePass(width, height, hires.steps or request.steps, hires.denoise, upscale=hires.method))
    return Plan(encode=bool(request.init_image), passes=tuple(passes))
