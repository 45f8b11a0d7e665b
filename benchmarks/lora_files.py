"""Random LoRA files for benchmarks: kohya format, diffusers naming, every Linear and Conv2d of
the UNet and of both text encoders' transformer layers, with alpha = rank / 2."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def write_random_lora(model, path: Path, *, seed: int, rank: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    trees = [("lora_unet_", model.unet, lambda name: True)]
    trees += [(prefix, encoder, lambda name: ".layers." in name)
              for prefix, encoder in zip(("lora_te1_text_model_", "lora_te2_text_model_"), model.text_encoders)]
    for prefix, tree, wanted in trees:
        for name, module in tree.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not wanted(name):
                continue
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            if isinstance(module, nn.Linear):
                down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
                up = torch.randn(module.out_features, rank, generator=generator) / rank**0.5
            else:
                kh, kw = module.kernel_size
                fan = module.in_channels * kh * kw
                down = torch.randn(rank, module.in_channels, kh, kw, generator=generator) / fan**0.5
                up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) / rank**0.5
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2.0)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})
    return path
