"""The pricing formula, in one place.

    price = max(minimum, ceil(multiplier * megapixels * evaluations / R))

- megapixels  = width * height / 2^20
- evaluations = UNet evaluations the run makes (docs/sampling.md: the two-stage samplers
                dpm_2, dpm_2_ancestral and dpmpp_2s_ancestral(_cfg_pp) make about two per step;
                ddim_uniform can add a step; beta can drop some)
- multiplier  = the model's `price_multiplier` (1.0 for the standard model)
- R           = `megapixel_evaluations_per_stardust` (default 6)

The documented example, 768x768 with 28 euler steps on the standard model, costs
ceil(0.5625 * 28 / 6) = ceil(2.625) = 3. Exact rational arithmetic: no float rounding can
tip a price over an integer boundary.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

from ..domain import GenerateRequest
from ..sampling import SigmaTable, compute_sigmas, count_evaluations
from .settings import BillingSettings

PIXELS_PER_MEGAPIXEL = 2**20


def evaluations(request: GenerateRequest, table: SigmaTable) -> int:
    """The UNet evaluations the engine will run for `request` on a model with this sigma table
    (the same count SamplingRun makes: one function, the model's own table)."""
    return _evaluations(table, request.sampler, request.scheduler, request.steps)


@functools.lru_cache(maxsize=4096)
def _evaluations(table: SigmaTable, sampler: str, scheduler: str, steps: int) -> int:
    # Cached because building a schedule costs more than everything else in pricing; tables
    # are hashed by identity (one per loaded model).
    return count_evaluations(sampler, compute_sigmas(table, scheduler, steps, sampler).tolist())


def price(request: GenerateRequest, multiplier: float, table: SigmaTable, settings: BillingSettings) -> int:
    megapixels = Fraction(request.width * request.height, PIXELS_PER_MEGAPIXEL)
    amount = (
        Fraction(str(multiplier)) * megapixels * evaluations(request, table)
        / Fraction(str(settings.megapixel_evaluations_per_stardust))
    )
    return max(settings.minimum_price, math.ceil(amount))
