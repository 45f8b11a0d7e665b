"""Latents in and between passes: a picture's VAE encode (VAEEncode) and the latent upscale of
hires fix (LatentUpscaleBy), as ComfyUI computes them (docs/image-to-image.md sections 2, 4).

ComfyUI keeps latents in the VAE's own space and multiplies by the model's scaling factor
(0.13025 for SDXL) inside the sampler; the engine's latents are already multiplied. Both
functions here go through the VAE's space in ComfyUI's order, so the rounding is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InternalError
from ..models.loader import LoadedModel

# Above this many picture pixels the VAE encodes in overlapping tiles (a full-frame encode of a
# large picture needs tens of GB of activations); below it the encode is ComfyUI's, exactly.
TILED_ENCODE_PIXELS = 2048 * 2048


@torch.inference_mode()
def encode_picture(model: LoadedModel, pixels: Tensor) -> Tensor:
    """An (H, W, 3) float picture in [0, 1] (sides multiples of 8) as a (1, 4, H/8, W/8) latent
    in the sampler's space: pixels mapped to 2x - 1, the posterior mean (no sampling: the same
    picture always gives the same latent), times the scaling factor."""
    vae = model.vae
    image = (pixels.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0).to(device=model.device, dtype=model.vae_dtype)
    encoded = vae.tiled_encode(image) if pixels.shape[0] * pixels.shape[1] > TILED_ENCODE_PIXELS else vae.encode(image)
    latent = encoded.latent_dist.mean
    if vae.config.get("shift_factor") is not None:
        latent = latent - vae.config.shift_factor
    latent = latent.float() * vae.config.scaling_factor
    if not torch.isfinite(latent).all():
        raise InternalError("the VAE produced a non-finite latent for the picture; the request was not charged")
    return latent


def upscale_latent(latent: Tensor, size: tuple[int, int], method: str, scaling_factor: float) -> Tensor:
    """Resize an (N, 4, h, w) sampler latent to `size` (h, w) with torch's interpolate in
    `method` mode and its defaults (no align_corners, no antialias), in the VAE's space."""
    raw = latent / scaling_factor
    return torch.nn.functional.interpolate(raw, size=tuple(size), mode=method) * scaling_factor
