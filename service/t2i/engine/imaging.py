"""From a final latent to image bytes: VAE decode (GPU) and PNG/WebP/JPEG encode (CPU), with
the generation's recipe (recipe.py) in the file: PNG text chunks "parameters" and "prompt", or
for WebP and JPEG A1111's EXIF UserComment."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ..errors import InternalError
from ..models.loader import LoadedModel

# Above this many output pixels the VAE decodes in overlapping tiles: a full-frame decode of a
# 2880x2880 image needs tens of GB of activations.
TILED_DECODE_PIXELS = 2048 * 2048


EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


def decode_latents(model: LoadedModel, latents: Tensor) -> list[np.ndarray]:
    """Decode (N, 4, h, w) latents one image at a time (memory stays that of one image)."""
    return [decode_latent(model, latents[i : i + 1]) for i in range(latents.shape[0])]


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


def encode_image(pixels: np.ndarray, image_format: str = "png", *, quality: int = 90, compress_level: int = 4,
                 text: dict[str, str] | None = None) -> bytes:
    """Image bytes in `image_format` (png, webp, jpeg); `text` is the recipe: every entry a PNG
    text chunk, or, for WebP and JPEG, its "parameters" entry as the EXIF UserComment."""
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if image_format == "png":
        info = PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        image.save(buffer, format="PNG", compress_level=compress_level, pnginfo=info)
    else:
        exif = Image.Exif()
        if text and "parameters" in text:
            # EXIF's UserComment with the Unicode marker, as A1111 writes it.
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + text["parameters"].encode("utf-16-be")
        image.save(buffer, format="WEBP" if image_format == "webp" else "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()
