"""One batched UNet evaluation for requests at arbitrary noise levels.

Each request contributes two rows, cond and uncond, so guidance costs one forward, not two.
Rows carry their own integer timestep, text context, pooled embedding and size conditioning.
The samplers want x0-predictions; the model's prediction kind says how to read the UNet's
output (sampling/prediction.py, docs/sampling.md "The denoiser"):

    out = unet(x / sqrt(sigma^2 + 1), t(sigma), text)
    epsilon:       x0 = x - sigma * out
    v_prediction:  x0 = x / (sigma^2 + 1) - out * sigma / sqrt(sigma^2 + 1)

t(sigma) is looked up in the model's own sigma table (zero-terminal-SNR ones included). A
forward serves one model, so all its rows are read the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lora import UNET, LoadedLora, batched_loras, unet_rows
from ..models.loader import LoadedModel
from ..sampling import input_scale, to_x0
from .text import TextConditioning


@dataclass(frozen=True)
class UNetInput:
    """One request's pending model evaluation."""

    x: Tensor  # (N, 4, h, w), float32 sampler state of the request's N images
    sigma: float
    cond: TextConditioning
    uncond: TextConditioning
    time_ids: Tensor  # (1, 6): original size, crop offset, target size
    loras: tuple[LoadedLora, ...] = ()  # applied to both rows at strength_model


def size_conditioning(height: int, width: int, device: torch.device) -> Tensor:
    """SDXL's micro-conditioning as diffusers' pipeline builds it for text-to-image:
    original size = target size = the requested size, no crop."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)


def stack_contexts(contexts: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stack text contexts of different lengths into one batch.

    Shorter contexts are zero-padded and masked out of cross-attention, which gives the same
    attention result as the unpadded context. When all lengths agree no mask is needed.
    """
    lengths = [c.shape[1] for c in contexts]
    longest = max(lengths)
    if all(length == longest for length in lengths):
        return torch.cat(list(contexts)), None
    padded = [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in contexts]
    mask = torch.zeros((len(contexts), longest), dtype=torch.bool, device=contexts[0].device)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    return torch.cat(padded), mask


@torch.inference_mode()
def evaluate(model: LoadedModel, batch: Sequence[UNetInput]) -> list[tuple[Tensor, Tensor]]:
    """Run one UNet forward for every evaluation in `batch`; returns (cond_x0, uncond_x0) each.

    An input of N samples (numImages) is 2N rows: its N cond rows, then its N uncond rows,
    all at its sigma, each with the request's text context."""
    dtype, device = model.dtype, model.device
    counts = [e.x.shape[0] for e in batch]
    x = torch.cat([e.x for e in batch for _ in (0, 1)])
    # Per input once (the timestep lookup searches the model's table), then one value per row.
    rows = torch.tensor([2 * n for n in counts], device=device)
    sigmas = [e.sigma for e in batch]
    sigma_column = torch.tensor(sigmas, dtype=x.dtype, device=device).repeat_interleave(rows).view(-1, 1, 1, 1)
    scale_in = torch.tensor([input_scale(s) for s in sigmas], dtype=x.dtype, device=device).repeat_interleave(rows)
    timesteps = torch.tensor([float(model.sigma_table.timestep(s)) for s in sigmas], device=device).repeat_interleave(rows)
    context, mask = stack_contexts([c.context for e, n in zip(batch, counts) for c in (e.cond, e.uncond) for _ in range(n)])
    pooled = torch.cat([c.pooled.expand(n, -1) for e, n in zip(batch, counts) for c in (e.cond, e.uncond)])
    time_ids = torch.cat([e.time_ids.expand(2 * n, -1) for e, n in zip(batch, counts)])

    # Each row's own LoRA deltas on top of one base forward for the whole batch (lora/apply.py).
    loras = nullcontext()
    if any(e.loras for e in batch):
        loras = batched_loras(model.unet, UNET, unet_rows([e.loras for e in batch], [2 * n for n in counts]))
    with loras:
        output = model.unet(
            (x * scale_in.view(-1, 1, 1, 1)).to(dtype),
            timesteps,
            encoder_hidden_states=context,
            encoder_attention_mask=mask,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(dtype)},
        ).sample
    x0 = to_x0(model.prediction, x, sigma_column, output.to(x.dtype))
    outputs, start = [], 0
    for n in counts:
        outputs.append((x0[start : start + n], x0[start + n : start + 2 * n]))
        start += 2 * n
    return outputs
