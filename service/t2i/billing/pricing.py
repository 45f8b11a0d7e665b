"""The pricing formula, in one place: one readable function of the request's plan of passes.

    price = images * max(minimum, ceil(multiplier * work / R))
    work  = sum over passes of  megapixels(pass) * evaluations(pass) * (1 + k * (chunks - 1))
            + d * megapixels(output)  +  e * megapixels(picture) / images

- passes      = the request's plan (t2i.passes): one for text-to-image and image to image,
                two with hires fix (the second at the upscaled size)
- megapixels  = width * height / 2^20 of that pass (output: the last pass's size)
- evaluations = UNet evaluations the pass makes (docs/sampling.md: the two-stage samplers
                dpm_2, dpm_2_ancestral and dpmpp_2s_ancestral(_cfg_pp) make about two per step;
                ddim_uniform can add a step; beta can drop some), on the model's own sigma
                table; with denoise < 1 only the steps that run (the schedule's tail)
- chunks      = 77-token chunks of the longer of prompt and negative prompt: every evaluation
                attends to all of them, k = 0.06 dearer per extra chunk (t2i.cost)
- d           = the VAE decode, d = 5 evaluations of the same image (t2i.cost)
- e           = the picture's VAE encode (image to image), e = 1.5 evaluations of its size,
                done once for all the request's images, so shared among them
- images      = numImages: each image costs what one costs
- multiplier  = the model's `price_multiplier` (1.0 for the standard model)
- R           = `megapixel_evaluations_per_stardust` (default 7)

k, d and e are measured (`make bench-cost`); R is chosen so that the documented example,
768x768 with 28 euler steps and its two-chunk prompt on the standard model, still costs
ceil(0.5625 * (28 * 1.06 + 5) / 7) = ceil(2.79) = 3. Exact rational arithmetic: no float
rounding can tip a price over an integer boundary.
"""

from __future__ import annotations

import math
from fractions import Fraction

from .. import cost, passes
from ..domain import GenerateRequest
from ..sampling import SigmaTable
from .settings import BillingSettings


def evaluations(request: GenerateRequest, table: SigmaTable) -> int:
    """The UNet evaluations the engine will run for `request` on a model with this sigma table,
    every pass together (the same count SamplingRun makes: one function, the model's own table)."""
    return sum(p.evaluations(table, request.scheduler, request.sampler) for p in passes.plan(request).passes)


def image_work(request: GenerateRequest, table: SigmaTable, context_chunks: int = 1) -> Fraction:
    """The work of one of the request's images (megapixel-evaluations, t2i.cost), every pass."""
    plan = passes.plan(request)
    work = sum(
        p.evaluations(table, request.scheduler, request.sampler) * cost.evaluation_work(p.width, p.height, context_chunks)
        for p in plan.passes
    )
    work += cost.decode_work(*plan.output_size)
    if plan.encode:
        first = plan.passes[0]
        work += cost.image_encode_work(first.width, first.height) / request.num_images
    return work


def price(request: GenerateRequest, multiplier: float, table: SigmaTable, settings: BillingSettings,
          context_chunks: int = 1) -> int:
    """The stardust `request` costs; its width and height are its first pass's (engine.check
    fills in a picture's own size)."""
    work = image_work(request, table, context_chunks)
    per_image = Fraction(str(multiplier)) * work / Fraction(str(settings.megapixel_evaluations_per_stardust))
    # Priced per image: numImages N costs N times what one image costs, as users count it.
    return request.num_images * max(settings.minimum_price, math.ceil(per_image))
