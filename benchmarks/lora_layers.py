"""Per-row LoRAs in one batched UNet forward: t2i.lora's hooks ("each" and "stack") against
PEFT's mixed-adapter batch, on the demo model's UNet.

    python -m benchmarks.lora_layers [--data-dir data] [--repeats 15] [--threads N] [--write]

8 requests x 2 rows (cond, uncond) at 128x128 (latent 16x16), rank 32 LoRAs on every Linear and
Conv2d of the UNet (134 layers), cases (a) no LoRA, (b) the same LoRA on every row, (c) 8
different LoRAs, one per request. Median milliseconds per forward, the variants interleaved;
(a) "hooks each" is the model with the idle hooks LoRAs leave behind, (a) "PEFT mixed" PEFT's
model with every row `__base__`. The LoRAs go through the real path (a safetensors file,
inspect_file, load_weights); PEFT gets the same factors, and its output is checked against ours
before anything is timed. `--write` puts the table into docs/benchmarks.md (section
"lora-layers"). PEFT is optional (`pip install --no-deps peft`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from t2i.lora import UNET, LayerIndex, batched_loras, inspect_file, load_weights

REQUESTS, RANK, LATENT = 8, 32, 16
COLUMNS = ("plain model", "hooks each", "hooks stack", "PEFT mixed")


def random_lora_file(unet: nn.Module, path: Path, seed: int) -> Path:
    """A PEFT-format file (unet.<path>.lora_A/B.weight) over every Linear/Conv2d of `unet`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear):
            down = torch.randn(RANK, module.in_features, generator=g) / module.in_features**0.5
            up = torch.randn(module.out_features, RANK, generator=g) / RANK**0.5 * 0.1
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            down = (
                torch.randn(RANK, module.in_channels, kh, kw, generator=g)
                / (module.in_channels * kh * kw) ** 0.5
            )
            up = torch.randn(module.out_channels, RANK, 1, 1, generator=g) / RANK**0.5 * 0.1
        else:
            continue
        tensors[f"unet.{name}.lora_A.weight"] = down
        tensors[f"unet.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def unet_inputs(rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(rows, 4, LATENT, LATENT, generator=g),
        timestep=torch.linspace(999, 1, rows),
        encoder_hidden_states=torch.randn(rows, 77, 96, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(rows, 64, generator=g),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * rows),
        },
    )


def median_ms(runs: dict[tuple[str, str], Callable], repeats: int) -> dict[tuple[str, str], float]:
    """Median ms of each run, interleaved (one of each per round) so that load from anything
    else on the machine falls on every variant alike."""
    times: dict[tuple[str, str], list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def peft_unet(unet: nn.Module, weights: list) -> nn.Module | None:
    """A copy of `unet` with the same LoRAs as PEFT adapters l0..l7 (alpha = r: scaling 1)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    model = copy.deepcopy(unet)
    names = sorted(weights[0].layers[UNET])
    for i in range(len(weights)):
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names, lora_dropout=0.0)
        inject_adapter_in_model(config, model, adapter_name=f"l{i}")
    with torch.no_grad():
        for i, w in enumerate(weights):
            for path, layer in w.layers[UNET].items():
                module = model.get_submodule(path)
                module.lora_A[f"l{i}"].weight.copy_(layer.down.reshape(module.lora_A[f"l{i}"].weight.shape))
                module.lora_B[f"l{i}"].weight.copy_(layer.up.reshape(module.lora_B[f"l{i}"].weight.shape))
    return model.eval()


def peft_forward(model: nn.Module, adapter_names: list[str], inputs: dict):
    """What PeftModel's `adapter_names=` does: inject the names into every LoRA layer's forward."""
    from peft.tuners.lora import LoraLayer

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [
        m.register_forward_pre_hook(inject, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, LoraLayer)
    ]
    try:
        return model(**inputs).sample
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md section lora-layers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    model = load_model(demo_spec(args.data_dir), torch.device("cpu"))
    unet = model.unet
    index = LayerIndex.from_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        weights = []
        for i in range(REQUESTS):
            path = random_lora_file(unet, Path(tmp) / f"l{i}.safetensors", seed=i)
            weights.append(load_weights(inspect_file(path, f"l{i}", index), index, model.device, model.dtype))
    rows = 2 * REQUESTS
    inputs = unet_inputs(rows)
    same = [[(weights[0], 1.0)]] * rows
    different = [[(weights[b // 2], 1.0)] for b in range(rows)]

    def ours(row_sets, strategy):
        def run():
            with batched_loras(unet, UNET, row_sets, strategy=strategy):
                return unet(**inputs).sample

        return run

    plain = copy.deepcopy(unet)  # never sees a LoRA: no dispatcher hooks at all
    runs = {
        ("(a) no LoRA", "plain model"): lambda: plain(**inputs).sample,
        # the same model after LoRAs ran on it: idle dispatchers on every patched layer
        ("(a) no LoRA", "hooks each"): lambda: unet(**inputs).sample,
        ("(b) same LoRA, all rows", "hooks each"): ours(same, "each"),
        ("(b) same LoRA, all rows", "hooks stack"): ours(same, "stack"),
        ("(c) 8 LoRAs, one per request", "hooks each"): ours(different, "each"),
        ("(c) 8 LoRAs, one per request", "hooks stack"): ours(different, "stack"),
    }
    peft = peft_unet(unet, weights)
    if peft is not None:
        names_c = [f"l{b // 2}" for b in range(rows)]
        with torch.inference_mode():
            expected = ours(different, "each")()
            got = peft_forward(peft, names_c, inputs)
        torch.testing.assert_close(
            got, expected, rtol=1e-3, atol=1e-3
        )  # same work, else timing means nothing
        runs[("(a) no LoRA", "PEFT mixed")] = lambda: peft_forward(peft, ["__base__"] * rows, inputs)
        runs[("(b) same LoRA, all rows", "PEFT mixed")] = lambda: peft_forward(peft, ["l0"] * rows, inputs)
        runs[("(c) 8 LoRAs, one per request", "PEFT mixed")] = lambda: peft_forward(peft, names_c, inputs)
    results: dict[str, dict[str, float]] = {}
    for (case, column), ms in median_ms(runs, args.repeats).items():
        results.setdefault(case, {})[column] = ms

    lines = [
        (
            f"Demo UNet, {REQUESTS} requests x 2 rows, latent {LATENT}x{LATENT}, rank {RANK} on all "
            f"{len(weights[0].layers[UNET])} Linear/Conv2d layers, CPU fp32, {torch.get_num_threads()} threads; "
            f"median ms per forward of {args.repeats} (`python -m benchmarks.lora_layers`)."
        ),
        "",
        "| case | " + " | ".join(COLUMNS) + " |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in ("(a) no LoRA", "(b) same LoRA, all rows", "(c) 8 LoRAs, one per request"):
        row = results[case]
        cells = [f"{row[k]:.1f}" if k in row else "" for k in COLUMNS]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if peft is None:
        lines += ["", "PEFT is not installed: its columns are empty."]
    body = "\n".join(lines)
    print(body)
    if args.write:
        from .report import write_section

        write_section("lora-layers", "## LoRA layers (`benchmarks/lora_layers.py`)\n\n" + body)


if __name__ == "__main__":
    main()
