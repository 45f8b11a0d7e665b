"""Tiny random SDXL checkpoints of each prediction kind, made from the demo model (a test
fixture maker): single files with and without NoobAI-XL's `v_pred` / `ztsnr` marker keys, and
diffusers folders whose scheduler config says what the model predicts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .sdxl_single_file import write_single_file_checkpoint

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def marker_keys(v_pred: bool = False, ztsnr: bool = False) -> dict[str, torch.Tensor]:
    """The keys ComfyUI reads a v-prediction (zero-terminal-SNR) checkpoint by: empty tensors,
    as NoobAI-XL v-pred ships them."""
    keys = {}
    if v_pred:
        keys["v_pred"] = torch.empty(0)
    if ztsnr:
        keys["ztsnr"] = torch.empty(0)
    return keys


def single_file(demo_dir: Path, out: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    write_single_file_checkpoint(demo_dir, out, extra)
    return out


def config_folder(demo_dir: Path, out: Path) -> Path:
    """The demo folder's configs and tokenizers without weights: a single file's `config:`."""
    if not out.exists():
        shutil.copytree(demo_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "READY"))
    return out


def diffusers_folder(demo_dir: Path, out: Path, **scheduler: object) -> Path:
    """The demo model as a diffusers folder whose scheduler config has `scheduler`'s entries
    (weights linked, not copied)."""
    shutil.copytree(demo_dir, out, copy_function=os.symlink, ignore=shutil.ignore_patterns("READY"))
    path = out / SCHEDULER_CONFIG
    config = json.loads(Path(os.path.realpath(path)).read_text())
    path.unlink()  # a link to the demo's own file: write a new one
    path.write_text(json.dumps({**config, **scheduler}, indent=2))
    return out


def names_only_file(out: Path, *keys: str) -> Path:
    """A .safetensors file holding only these tensor names (what the kind is read from)."""
    from safetensors.torch import save_file

    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    tensors.update({key: torch.empty(0) for key in keys})
    save_file(tensors, str(out))
    return out
