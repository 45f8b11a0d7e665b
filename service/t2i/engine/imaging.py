"""From a final latent to PNG bytes: VAE decode (GPU) and PNG encode (CPU)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import InternalError
from ..models.loader import LoadedModel

# Above this many output pixels the VAE decodes in overlapping tiles: a full-frame decode of a
# 2880x2880 image needs tens of GB of activations.
TILED_DECODE_PIXELS = 2048 * 2048


@torch.inference_mode()
def decode_latent(model: LoadedModel, latent: Tensor) -> np.ndarray:
    """Decode one (1, 4, h, w) latent into an (H, W, 3) uint8 image."""
    if not torch.isfinite(latent).all():
        raise InternalError("the sampler produced a non-finite latent; the request was not charged")
    vae = model.vae
    z = latent.to(device=model.device, dtype=model.vae_dtype) / vae.config.scaling_factor
    if vae.config.get("shift_factor") is not None:
        z = z + vae.config.shift_factor
    pixels = z.shape[-2] * z.shape[-1] * 64
    image = vae.tiled_decode(z).sample if pixels > TILED_DECODE_PIXELS else vae.decode(z).sample
    if not torch.isfinite(image).all():
        raise InternalError("the VAE produced a non-finite image; the request was not charged")
    return to_uint8(image[0])


def to_uint8(image: Tensor) -> np.ndarray:
    """A (3, H, W) VAE output in [-1, 1] as (H, W, 3) 8-bit pixels, as ComfyUI's SaveImage
    and A1111 write them: clamp to [0, 1], times 255, truncated (not rounded), so the same
    latent gives the same PNG bytes here as there."""
    unit = ((image.float() + 1.0) / 2.0).clamp(0, 1)
    # A float -> uint8 cast truncates toward zero; values are in [0, 255] so it never wraps.
    return (unit.permute(1, 2, 0) * 255.0).to(torch.uint8).cpu().numpy()


def encode_png(pixels: np.ndarray, compress_level: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
