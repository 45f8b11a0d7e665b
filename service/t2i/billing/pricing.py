"""The pricing formula, in one place: one readable function of (size, evaluations, chunks, images).

    price = images * max(minimum, ceil(multiplier * megapixels * (evaluations * (1 + k * (chunks - 1)) + d) / R))

- megapixels  = width * height / 2^20
- evaluations = UNet evaluations the run makes (docs/sampling.md: the two-stage samplers
                dpm_2, dpm_2_ancestral and dpmpp_2s_ancestral(_cfg_pp) make about two per step;
                ddim_uniform can add a step; beta can drop some), on the model's own sigma table
- chunks      = 77-token chunks of the longer of prompt and negative prompt: every evaluation
                attends to all of them, k = 0.06 dearer per extra chunk (t2i.cost)
- d           = the VAE decode, d = 5 evaluations of the same image (t2i.cost)
- images      = numImages: each image costs what one costs
- multiplier  = the model's `price_multiplier` (1.0 for the standard model)
- R           = `megapixel_evaluations_per_stardust` (default 7)

k and d are measured (`make bench-cost`); R is chosen so that the documented example, 768x768
with 28 euler steps and its two-chunk prompt on the standard model, still costs
ceil(0.5625 * (28 * 1.06 + 5) / 7) = ceil(2.79) = 3. Exact rational arithmetic: no float
rounding can tip a price over an integer boundary.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

from .. import cost
from ..domain import GenerateRequest
from ..sampling import SigmaTable, compute_sigmas, count_evaluations
from .settings import BillingSettings



def evaluations(request: GenerateRequest, table: SigmaTable) -> int:
    """The UNet evaluations the engine will run for `request` on a model with this sigma table
    (the same count SamplingRun makes: one function, the model's own table)."""
    return _evaluations(table, request.sampler, request.scheduler, request.steps)


@functools.lru_cache(maxsize=4096)
def _evaluations(table: SigmaTable, sampler: str, scheduler: str, steps: int) -> int:
    # Cached because building a schedule costs more than everything else in pricing; tables
    # are hashed by identity (one per loaded model).
    return count_evaluations(sampler, compute_sigmas(table, scheduler, steps, sampler).tolist())


def price(request: GenerateRequest, multiplier: float, table: SigmaTable, settings: BillingSettings,
          context_chunks: int = 1) -> int:
    work = cost.image_work(request.width, request.height, evaluations(request, table), context_chunks)
    per_image = Fraction(str(multiplier)) * work / Fraction(str(settings.megapixel_evaluations_per_stardust))
    # Priced per image: numImages N costs N times what one image costs, as users count it.
    return request.num_images * max(settings.minimum_price, math.ceil(per_image))
