"""A1111's "Original" emphasis: how its default `emphasis` setting applies prompt weights.

ComfyUI (t2i.engine.text) moves a weighted position between the empty prompt's encoding and
the prompt's. A1111 instead scales the text encoder's output and then restores its mean. For
each 77-token chunk z (77 x C hidden states) with per-position weights w (start, end and
padding weigh 1):

    z_w = z * w[:, None]                          every position's hidden state times its weight
    out = z_w * (mean(z) / mean(z_w))             means over all 77 x C values of the chunk

So the weights set the positions' sizes relative to each other, and the chunk's overall mean
stays what the encoder produced. A1111 does this:
- per chunk: each chunk is encoded and weighted on its own before the chunks are joined, so
  one chunk's weights never change another chunk;
- per text encoder: on SDXL, CLIP-L's and CLIP-G's penultimate hidden states are each
  weighted and mean-restored on their own, then joined on the feature axis;
- never on the pooled output: SDXL's pooled embedding is CLIP-G's projected output for the
  first chunk, taken before any weighting.

(A1111 takes the means over the whole batch it encodes at once. For a prompt without prompt
editing that batch is the prompt's one chunk, so the mean is the chunk's.) Weight 1 everywhere
leaves z unchanged bit for bit. A weight of 0 zeroes its position before the rescale (in
ComfyUI it would take the empty prompt's value). If the weighted mean is 0 the result is not
finite, as in A1111; weights that cancel the mean exactly do not occur in practice.

The arithmetic is done in float32 and the result cast back to the input's dtype; A1111 computes
in the model's dtype (often float16), which differs from this in the last bits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def original_emphasis(hidden: Tensor, weights: Tensor) -> Tensor:
    """`hidden` (..., T, C): chunks of hidden states, one chunk per leading index (T = 77);
    `weights` (..., T): each position's weight. Returns A1111's weighted chunks, same shape
    and dtype as `hidden` (module docstring)."""
    if weights.shape != hidden.shape[:-1]:
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not fit hidden states of shape {tuple(hidden.shape)}"
        )
    z = hidden.float()
    w = weights.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
    weighted = z * w
    original_mean = z.mean(dim=(-2, -1), keepdim=True)
    weighted_mean = weighted.mean(dim=(-2, -1), keepdim=True)
    return (weighted * (original_mean / weighted_mean)).to(hidden.dtype)
