"""What a generation costs the service, in one unit: the megapixel-evaluation (one UNet
evaluation, cond and uncond rows, of a 1-megapixel image with a one-chunk prompt).

Prices (billing/pricing.py) and fair shares between API keys (engine/batching.py) both follow
this model, so that a request that takes more of the machine pays for more and gets fewer
turns. The constants are measured (`make bench-cost`, docs/benchmarks.md "cost"):

- every 77-token chunk of text context beyond the first makes each evaluation dearer by
  CONTEXT_COST_PER_EXTRA_CHUNK (cross-attention reads every context token);
- a VAE decode costs DECODE_COST_IN_EVALUATIONS evaluations of the same image;
- encoding one prompt chunk costs ENCODE_COST_PER_CHUNK megapixel-evaluations, whatever the
  image size;
- a VAE encode of a picture (image to image) costs IMAGE_ENCODE_COST_IN_EVALUATIONS evaluations
  of the same size.

Fractions, so that prices never round across an integer by float error.
"""

from __future__ import annotations

from fractions import Fraction

# Measured on the demo model (CPU), docs/benchmarks.md "cost": 0.059, 5.05 and 0.002.
CONTEXT_COST_PER_EXTRA_CHUNK = Fraction("0.06")
DECODE_COST_IN_EVALUATIONS = Fraction("5")
ENCODE_COST_PER_CHUNK = Fraction("0.002")
# Measured on the demo model (CPU), docs/benchmarks.md "cost": a picture's encode took 0.14 to
# 0.33 of a decode of the same size (SDXL's encoder is also the smaller half of its VAE).
IMAGE_ENCODE_COST_IN_EVALUATIONS = Fraction("1.5")
PIXELS_PER_MEGAPIXEL = 2**20


def megapixels(width: int, height: int) -> Fraction:
    return Fraction(width * height, PIXELS_PER_MEGAPIXEL)


def evaluation_work(width: int, height: int, context_chunks: int, images: int = 1) -> Fraction:
    """One UNet evaluation of the request (all its images)."""
    return images * megapixels(width, height) * (1 + CONTEXT_COST_PER_EXTRA_CHUNK * (context_chunks - 1))


def decode_work(width: int, height: int, images: int = 1) -> Fraction:
    return images * megapixels(width, height) * DECODE_COST_IN_EVALUATIONS


def image_encode_work(width: int, height: int) -> Fraction:
    """VAE-encoding one picture of this size (image to image; once for all its images)."""
    return megapixels(width, height) * IMAGE_ENCODE_COST_IN_EVALUATIONS


def encode_work(chunks: int) -> Fraction:
    """Encoding `chunks` prompt chunks (prompt and negative prompt together)."""
    return chunks * ENCODE_COST_PER_CHUNK


def image_work(width: int, height: int, evaluations: int, context_chunks: int) -> Fraction:
    """Denoising and decoding one image: what one image is priced by."""
    return evaluations * evaluation_work(width, height, context_chunks) + decode_work(width, height)
