"""A LoRA's factors, ready to apply unmerged: on the model's device, in its dtype, per layer.

For a layer with weight W the update (docs/lora.md) is

    y = W x + s * (alpha / r) * up(down(x))

`alpha / r` is folded into `up` when the weights are built (in float32, then cast), so applying
a layer costs down, a per-row strength multiply on the rank-r activations and up. A LoCon
layer with `lora_mid` keeps its factors apart: `down` is a 1x1 conv into rank space, `mid` the
r x r conv with the layer's kernel, stride, padding and dilation, then `up` (1x1); that equals
ComfyUI's merged factor `mid ∘ down` (r x in x kh x kw) because a 1x1 conv commutes with the
spatial part, and costs r * (in + r * kh * kw) per pixel instead of r * in * kh * kw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class LayerLora:
    """One layer's factors. Linear: down (r, in), up (out, r). Conv2d: down (r, in, kh, kw) (or
    (r, in, 1, 1) with mid (r, r, kh, kw)), up (out, r, 1, 1)."""

    down: Tensor
    up: Tensor  # alpha / r already folded in
    mid: Tensor | None = None
    # The base conv's geometry; the down factor (or mid, for LoCon) uses it.
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    # The module the factors were checked against and are applied to (None: look it up by path).
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def project_down(self, x: Tensor) -> Tensor:
        """x -> rank space (before the per-row strength)."""
        if not self.is_conv:
            return F.linear(x, self.down)
        if self.mid is None:
            return F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(F.conv2d(x, self.down), self.mid, None, self.stride, self.padding, self.dilation)

    def project_up(self, h: Tensor) -> Tensor:
        return F.conv2d(h, self.up) if self.is_conv else F.linear(h, self.up)

    def delta_weight(self) -> Tensor:
        """The merged update (alpha / r) * up @ down in W's shape, in float32 (for the stacked
        application and for anyone who wants to merge)."""
        up = self.up.float().flatten(1)
        down = self.down.float()
        if self.mid is not None:
            # combined[o, i, h, w] = sum_j mid[o, j, h, w] * down[j, i]
            down = torch.einsum("ojhw,ji->oihw", self.mid.float(), down.flatten(1))
        merged = up @ down.flatten(1)
        if self.is_conv:
            return merged.reshape(up.shape[0], *down.shape[1:])
        return merged

    @property
    def nbytes(self) -> int:
        tensors = [self.down, self.up] + ([self.mid] if self.mid is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(eq=False)
class LoraWeights:
    """All placed layers of one LoRA file for one model: layers[component][module path].

    Identity matters: rows that use the same LoraWeights object share one down/up pass per
    layer, whatever their strengths."""

    name: str
    sha256: str  # content identity (A1111's LoRA hash, see file.py)
    layers: dict[str, dict[str, LayerLora]] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # component -> the module tree the layers were placed on, so they cannot be applied to another.
    roots: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for component in self.layers.values() for layer in component.values())

    def components(self) -> list[str]:
        return [component for component, layers in self.layers.items() if layers]

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}: {len(layers)}" for c, layers in self.layers.items())
        where = f"{self.nbytes} bytes on {self.device}"
        return f"LoraWeights({self.name!r}, {self.sha256[:12]}, layers {{{counts}}}, {where})"
