"""Previews for streamed generations: cheap enough to make inside the denoise loop.

A preview is the sampler's current prediction of the clean latent (the guided x0), projected
linearly from SDXL's 4 latent channels to RGB with the standard SDXL latent-to-RGB factors, at
1/8 of the image size; never a VAE decode. The denoise thread only keeps the guided x0 of the
step; the projection (a 4x3 matmul per latent pixel, after the copy to the CPU) and the JPEG
encode run on the finisher's encode pool, where a failure loses the preview and nothing else.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# The commonly used linear fit from SDXL latents to RGB (rows: latent channels; columns: R, G, B).
SDXL_LATENT_RGB = torch.tensor([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
])
SDXL_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])
JPEG_QUALITY = 75


def latent_rgb(latents: Tensor) -> np.ndarray:
    """(N, 4, h, w) latents -> one (h, N*w, 3) uint8 picture, the images side by side."""
    x = latents.detach().float().cpu()
    rgb = torch.einsum("nchw,cr->nhwr", x, SDXL_LATENT_RGB) + SDXL_LATENT_RGB_BIAS
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return torch.cat(list(rgb), dim=1).numpy()


def preview_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
