"""Random LoRA files for the demo model, written the way trainers write them, and an
independent merge of them into a copy of a module (the oracle the batched path is checked on).

Names come from the module paths of the model and, for kohya's SGM spelling of the UNet, from
tests/support/sdxl_single_file.unet_to_ldm (the diffusers -> ldm converter the single-file
checkpoint tests already validate against diffusers' own loader), never from t2i.lora.keys.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tests.support.sdxl_single_file import unet_to_ldm

# The file namings exercised: kohya with SGM UNet names (sd-scripts' SDXL output), kohya with
# diffusers UNet names, and PEFT/diffusers dotted names.
KOHYA_SGM, KOHYA_DIFFUSERS, PEFT = "kohya-sgm", "kohya-diffusers", "peft"


@dataclass
class FakeLayer:
    component: str  # "unet", "te1", "te2"
    path: str  # module path in the loaded model
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    alpha: float | None


@dataclass
class FakeLora:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[FakeLayer] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        save_file(
            {k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=self.metadata or None
        )
        return path


def targets(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def sgm_map(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> ldm module path, through the independent converter."""
    names = list(targets(unet))
    state = {f"{n}.weight": torch.tensor([i]) for i, n in enumerate(names)}
    renamed = unet_to_ldm(state, dict(unet.config))
    return {names[int(t)]: key.removesuffix(".weight") for key, t in renamed.items()}


def _hf_path(path: str) -> str:
    """The classic Hugging Face CLIP path (with `text_model.`), as every LoRA file spells it."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def make_lora(
    model,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = 2.0,
    naming: str = KOHYA_SGM,
    unet: Callable[[str, nn.Module], bool] | None = lambda path, module: True,
    text_encoders: bool = True,
    locon_mid: bool = False,
    dtype: torch.dtype = torch.float32,
    exact: bool = False,
) -> FakeLora:
    """A random LoRA over the chosen layers of `model` (a LoadedModel).

    `locon_mid` gives every conv with a kernel over 1x1 a CP-decomposed LoCon factor (down 1x1
    plus an r x r x kh x kw mid). Factor sizes make each layer's delta comparable to its weight,
    so an unapplied or misplaced LoRA cannot pass for an applied one.

    `exact` puts every factor on a coarse grid (see `on_grid`), so that however the code under
    test prepares them in float32 (alpha / r into up, mid folded into down, up @ down) the
    result is exact: a float64 comparison then sees float64 rounding only."""
    generator = torch.Generator().manual_seed(seed)
    lora = FakeLora(metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    sgm = sgm_map(model.unet) if naming == KOHYA_SGM else {}
    chosen: list[tuple[str, str, nn.Module]] = []
    if unet is not None:
        chosen += [("unet", p, m) for p, m in targets(model.unet).items() if unet(p, m)]
    if text_encoders:
        for component, encoder in zip(("te1", "te2"), model.text_encoders):
            chosen += [(component, p, m) for p, m in targets(encoder).items() if ".layers." in p]
    for component, path, module in chosen:
        layer = _random_layer(component, path, module, rank, alpha, locon_mid, generator)
        if exact:
            layer.down, layer.up = on_grid(layer.down), on_grid(layer.up)
            layer.mid = None if layer.mid is None else on_grid(layer.mid)
        lora.layers.append(layer)
        base = _key_base(component, path, naming, sgm)
        if naming == PEFT:
            lora.tensors[f"{base}.lora_A.weight"] = layer.down.to(dtype)
            lora.tensors[f"{base}.lora_B.weight"] = layer.up.to(dtype)
        else:
            lora.tensors[f"{base}.lora_down.weight"] = layer.down.to(dtype)
            lora.tensors[f"{base}.lora_up.weight"] = layer.up.to(dtype)
            if layer.mid is not None:
                lora.tensors[f"{base}.lora_mid.weight"] = layer.mid.to(dtype)
            if alpha is not None:
                lora.tensors[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    if naming == PEFT:
        lora.metadata = {}
        for layer in lora.layers:  # PEFT files carry no alpha: the factor is 1
            layer.alpha = None
    # Stored factors are what counts: the merge oracle uses the file's rounding.
    for layer in lora.layers:
        layer.down, layer.up = layer.down.to(dtype).float(), layer.up.to(dtype).float()
        if layer.mid is not None:
            layer.mid = layer.mid.to(dtype).float()
    return lora


def _key_base(component: str, path: str, naming: str, sgm: dict[str, str]) -> str:
    if component == "unet":
        if naming == PEFT:
            return f"unet.{path}"
        name = sgm[path] if naming == KOHYA_SGM else path
        return "lora_unet_" + name.replace(".", "_")
    if naming == PEFT:
        return ("text_encoder." if component == "te1" else "text_encoder_2.") + _hf_path(path)
    return f"lora_{component}_" + _hf_path(path).replace(".", "_")


def _random_layer(component, path, module, rank, alpha, locon_mid, generator) -> FakeLayer:
    def randn(*shape, fan):
        return torch.randn(*shape, generator=generator) / fan**0.5

    if isinstance(module, nn.Linear):
        inp, out = module.in_features, module.out_features
        down, up, mid = randn(rank, inp, fan=inp), randn(out, rank, fan=rank), None
    else:
        inp, out = module.in_channels, module.out_channels
        kh, kw = module.kernel_size
        if locon_mid and (kh, kw) != (1, 1):
            down = randn(rank, inp, 1, 1, fan=inp)
            mid = randn(rank, rank, kh, kw, fan=rank * kh * kw)
        else:
            down, mid = randn(rank, inp, kh, kw, fan=inp * kh * kw), None
        up = randn(out, rank, 1, 1, fan=rank)
    # alpha / r shrinks the delta; scale the factors back up so every LoRA matters.
    boost = (rank / alpha) ** 0.5 if alpha else 1.0
    return FakeLayer(component, path, down * boost, up * boost, mid, alpha)


# 6-bit integers (times a power of two): float32's 24-bit significand holds exactly a factor
# times a strength of up to 3 significant bits (9 bits), and mid folded into down, a sum of r
# products of two factors (12 bits each, under 15 bits for r <= 8).
GRID_LEVELS = 63


def on_grid(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to integers times a power of two, at most GRID_LEVELS of them in size: still
    random and full rank, exactly representable in float16, bfloat16 and float32, and so are
    the ways the code under test prepares factors (above; alpha / r too, when it is a power of
    two). Tests that rely on this use strengths with few significant bits (0.75, not 0.7)."""
    step = 2.0 ** math.ceil(math.log2(t.abs().max().item() / GRID_LEVELS))
    return torch.round(t / step) * step


def merged_delta(layer: FakeLayer, weight_shape: torch.Size) -> torch.Tensor:
    """(alpha / r) * up @ down in the weight's shape, with a LoCon mid first combined with down
    into one r x in x kh x kw factor: combined[o, i] = sum_j mid[o, j] * down[j, i] (docs/lora.md).
    In float64, so that the oracle adds no float32 rounding of its own; callers cast."""
    rank = layer.down.shape[0]
    scale = layer.alpha / rank if layer.alpha is not None else 1.0
    down = layer.down.double()
    if layer.mid is not None:
        d = down.reshape(rank, -1)  # (r, in)
        down = (layer.mid.double().permute(2, 3, 0, 1) @ d).permute(2, 3, 0, 1)  # (r, in, kh, kw)
    up = layer.up.double().reshape(layer.up.shape[0], rank)
    return scale * (up @ down.reshape(rank, -1)).reshape(weight_shape)


def merged_copy(module: nn.Module, component: str, loras: list[tuple[FakeLora, float]]) -> nn.Module:
    """A deep copy of `module` with W + s * delta merged for every (LoRA, strength)."""
    merged = copy.deepcopy(module)
    layers = targets(merged)
    with torch.no_grad():
        for lora, strength in loras:
            for layer in lora.layers:
                if layer.component == component:
                    weight = layers[layer.path].weight
                    weight += strength * merged_delta(layer, weight.shape).to(weight.dtype)
    return merged
