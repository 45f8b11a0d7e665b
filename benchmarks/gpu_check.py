"""The GPU check (run by benchmarks/gpu_check.sh): what the CPU benchmarks cannot show.

    benchmarks/gpu_check.sh               # on a CUDA machine: about 5 to 8 minutes, installs included
    benchmarks/gpu_check.sh --dry-run     # anywhere, on the CPU, tiny sizes: the plumbing only

Phases, each in its own process (so each starts with an empty GPU and reports its own peak
memory), in order of importance, each started only while the time budget allows:
1. UNet, eager: an SDXL-size UNet (random weights, fp16, benchmarks/gpu_unet.py's config) at
   1024x1024, 28 evaluations with cond + uncond rows: seconds per image at batch 1, images/s
   at batch 8, with PyTorch SDPA and with xformers (when it is installed and runs);
2. serving: a full-size random SDXL (UNet, both text encoders, VAE; fp16) written as a
   diffusers folder and loaded through the service's own loader, twice: by the raw engine
   in-process and by `t2i serve --device cuda` in a subprocess; the service's throughput at
   concurrency 8 over gRPC against the raw engine at batch 8, rounds interleaved (1024x1024,
   28 steps, euler/normal); the VAE decode of a random latent in fp16 and on the service's
   path (fp32 when the VAE's config asks for force_upcast), checked for NaN/inf and black
   images (with --vae-dir, also a real SDXL VAE);
3. UNet, torch.compile (regional: the repeated transformer blocks; --compile full for the whole
   UNet), SDPA and xformers, as in 1; compilation time is reported apart.
Writes docs/benchmarks.md (section "gpu"). A dry run prints its figures but does not keep them: it
only notes, where no GPU run has written the section yet, that the plumbing passed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import gpu_unet
from .report import fmt, read_section, write_section

WORK_ENV = "T2I_GPU_CHECK_WORK"
BUDGET = 470.0  # seconds for the whole check (the issue: under 8 minutes, installs included)
# Seconds a phase needs at least to be worth starting (a full run / a dry run).
MIN_START = {"unet": (60, 10), "serving": (150, 20), "compiled": (120, 30)}

FULL = dict(unet=gpu_unet.SDXL_UNET, size=1024, steps=28, rounds=2, min_size=256)
TINY = dict(unet=gpu_unet.TINY_UNET, size=64, steps=3, rounds=2, min_size=64)

# SDXL's text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers) and VAE.
FULL_TEXT = (
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
)
TINY_TEXT = (
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu", projection_dim=32),
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", projection_dim=64),
)
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def device_for(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("the GPU check needs a CUDA device (or --dry-run)")
    return torch.device("cuda")


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def quiet() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# --- phase: the UNet alone --------------------------------------------------------------------

def unet_phase(dry_run: bool, attention: str, compile_mode: str) -> dict:
    quiet()
    device = device_for(dry_run)
    sizes = TINY if dry_run else FULL
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if attention == "xformers":
        problem = gpu_unet.xformers_problem(device)
        if problem:
            return {"skipped": f"xformers {problem}"}
    unet = gpu_unet.build_unet(sizes["unet"], device, dtype)
    gpu_unet.set_attention(unet, attention)
    # A dry run checks the plumbing (dynamo tracing the blocks, the phase's bookkeeping), not the
    # host's C++ toolchain: inductor's CPU code generation depends on the CPU's vector ISA and did
    # not build under ATen's scalar kernels (ATEN_CPU_CAPABILITY=default), so the dry run traces
    # with "aot_eager", which runs the same graphs without generating code.
    model = gpu_unet.apply_compile(unet, compile_mode, backend="aot_eager" if dry_run else "inductor")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    one, warm_one = gpu_unet.seconds_per_run(model, 1, sizes["size"], sizes["steps"], device, dtype)
    eight, warm_eight = gpu_unet.seconds_per_run(model, 8, sizes["size"], sizes["steps"], device, dtype)
    return {
        "attention": attention, "compile": compile_mode, "dtype": str(dtype).removeprefix("torch."),
        "parameters_b": sum(p.numel() for p in unet.parameters()) / 1e9, "size": sizes["size"], "steps": sizes["steps"],
        "batch1_seconds": one, "batch8_images_per_second": 8 / eight, "warm_up_seconds": warm_one + warm_eight,
        "peak_gib": peak_memory(device),
    }


# --- phase: a full-size random SDXL through the service ----------------------------------------

def build_random_sdxl(path: Path, full: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """A random-weight SDXL (real architecture when `full`, else the demo's miniature) written
    as a diffusers folder: UNet, both CLIP text encoders with the real CLIP vocabulary, VAE,
    scheduler config, tokenizers."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from t2i.models.demo import clip_vocabulary

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    common = dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                  eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    text_1, text_2 = FULL_TEXT if full else TINY_TEXT
    unet_config = dict(gpu_unet.SDXL_UNET if full else gpu_unet.TINY_UNET)
    # The UNet's cross-attention width is the two encoders' widths together, its pooled input CLIP-G's projection.
    unet_config["cross_attention_dim"] = text_1["hidden_size"] + text_2["hidden_size"]
    unet_config["projection_class_embeddings_input_dim"] = text_2["projection_dim"] + 6 * unet_config["addition_time_embed_dim"]
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_1, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2, **common))
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
            sample_size=1024, scaling_factor=0.13025, force_upcast=True, **(FULL_VAE if full else TINY_VAE),
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), text_encoder_2=text_encoder_2.to(dtype),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.to(dtype), scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)


def image_check(pixels) -> dict:
    """An (H, W, 3) uint8 image: black when no pixel is above 1 (NaN decodes to 0)."""
    import numpy as np

    pixels = np.asarray(pixels)
    return {"mean": float(pixels.mean()), "black": bool(pixels.max() <= 1)}


def vae_checks(model, latent: torch.Tensor, label: str) -> list[dict]:
    """Decode `latent` in fp16 and on the service's path (t2i.engine.imaging.decode_latent,
    which decodes in model.vae_dtype: fp32 when the VAE asks for force_upcast)."""
    from t2i.engine.imaging import decode_latent, to_uint8
    from t2i.errors import ServiceError

    rows = []
    vae16 = copy.deepcopy(model.vae).to(torch.float16)
    try:
        with torch.inference_mode():
            z = latent.to(model.device, torch.float16) / vae16.config.scaling_factor
            image = vae16.decode(z).sample
        rows.append({"vae": label, "path": "fp16 decode", "dtype": "float16", "finite": bool(torch.isfinite(image).all()),
                     **image_check(to_uint8(image[0].float().nan_to_num(0.0)))})
    except RuntimeError as error:  # e.g. an fp16 kernel missing on a CPU
        rows.append({"vae": label, "path": "fp16 decode", "dtype": "float16", "error": f"{type(error).__name__}: {str(error)[:100]}"})
    del vae16
    try:
        pixels = decode_latent(model, latent)
        rows.append({"vae": label, "path": "service (decode_latent)", "dtype": str(model.vae_dtype).removeprefix("torch."),
                     "finite": True, **image_check(pixels)})
    except ServiceError as error:  # decode_latent refuses non-finite output
        rows.append({"vae": label, "path": "service (decode_latent)", "dtype": str(model.vae_dtype).removeprefix("torch."),
                     "finite": False, "error": str(error)})
    return rows


class DeviceMemory:
    """Peak device-wide memory in use (every process on the GPU), sampled in a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, (total - free) / 2**30)
            self._stop.wait(0.1)

    def __enter__(self) -> DeviceMemory:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


async def serving_phase(dry_run: bool, rounds: int | None, vae_dir: str | None) -> dict:
    quiet()
    from t2i.domain import GenerateRequest
    from t2i.engine.engine import AsyncEngine
    from t2i.models.config import load_models_file
    from t2i.models.loader import load_model
    from t2i.settings import EngineConfig

    from testbed.server import ServerProcess

    from . import load, workloads

    device = device_for(dry_run)
    sizes = TINY if dry_run else FULL
    rounds = rounds or sizes["rounds"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    root = Path(tempfile.mkdtemp(prefix="t2i-gpu-check-", dir=os.environ.get(WORK_ENV)))
    started = time.perf_counter()
    build_random_sdxl(root / "model", not dry_run, device, dtype)
    built = time.perf_counter() - started
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gib = sum(f.stat().st_size for f in (root / "model").rglob("*.safetensors")) / 2**30
    models_file = root / "models.yaml"
    models_file.write_text(
        f"models:\n  - id: 1\n    name: random-sdxl (random weights)\n    path: {root / 'model'}\n"
        f"    min_size: {sizes['min_size']}\n    max_size: 2048\n    max_steps: 150\n"
    )
    server = ServerProcess(root / "data", "--no-billing", "--device", device.type, "--models", str(models_file))
    try:
        started = time.perf_counter()
        model = load_model(load_models_file(models_file)[0], device)
        loaded = time.perf_counter() - started
        latent = torch.randn(1, 4, sizes["size"] // 8, sizes["size"] // 8, generator=torch.Generator().manual_seed(0))
        vae = vae_checks(model, latent, "random SDXL VAE")
        if vae_dir:
            from diffusers import AutoencoderKL

            real = replace_vae(model, AutoencoderKL.from_pretrained(vae_dir, dtype=model.dtype, local_files_only=True))
            vae += vae_checks(real, latent, f"{vae_dir}")
        engine = AsyncEngine({1: model}, EngineConfig(max_batch_size=8))
        engine.start()
        server.wait_serving(timeout=600)
        target = load.Target(server.target)
        request = replace(workloads.HOMOGENEOUS, width=sizes["size"], height=sizes["size"], steps=sizes["steps"])
        seeds = iter(range(10**6))

        def batch() -> list[GenerateRequest]:
            return [replace(request, seed=next(seeds)) for _ in range(8)]

        async def raw_round() -> float:
            started = time.perf_counter()
            await asyncio.gather(*(engine.generate(r) for r in batch()))
            return time.perf_counter() - started

        await raw_round()  # warm-up at this size, not measured
        await load.closed_loop(target, batch(), 8, "gpu-warm")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        raw_seconds = service_seconds = 0.0
        with DeviceMemory(device) as memory:
            for _ in range(rounds):
                raw_seconds += await raw_round()
                service_seconds += (await load.closed_loop(target, batch(), 8, "gpu")).seconds
        await target.close()
        await engine.close()
        raw_peak = peak_memory(device)
    finally:
        server.kill()
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    images = 8 * rounds
    return {
        "size": sizes["size"], "steps": sizes["steps"], "images": images, "model_gib": gib, "build_seconds": built,
        "load_seconds": loaded, "raw_images_per_second": images / raw_seconds,
        "service_images_per_second": images / service_seconds, "raw_peak_gib": raw_peak,
        "device_peak_gib": memory.peak if device.type == "cuda" else None, "vae": vae,
        "attention": model.attention, "dtype": str(model.dtype).removeprefix("torch."),
        "vae_dtype": str(model.vae_dtype).removeprefix("torch."),
    }


def replace_vae(model, vae):
    """The loaded model with another VAE, placed as the loader places one."""
    vae_dtype = torch.float32 if model.dtype == torch.float16 and vae.config.get("force_upcast", True) else model.dtype
    vae = vae.to(model.device, vae_dtype).eval().requires_grad_(False)
    return replace(model, vae=vae, vae_dtype=vae_dtype)


# --- the driver -------------------------------------------------------------------------------

def phases(compile_mode: str) -> list[tuple[str, list[str]]]:
    return [
        ("unet", ["--phase", "unet", "--attention", "sdpa", "--compile", "none"]),
        ("unet", ["--phase", "unet", "--attention", "xformers", "--compile", "none"]),
        ("serving", ["--phase", "serving"]),
        ("compiled", ["--phase", "unet", "--attention", "sdpa", "--compile", compile_mode]),
        ("compiled", ["--phase", "unet", "--attention", "xformers", "--compile", compile_mode]),
    ]


def drive(args) -> int:
    deadline = time.monotonic() + args.budget
    results: list[tuple[list[str], dict]] = []
    failures = 0
    folder = Path(tempfile.mkdtemp(prefix="t2i-gpu-check-"))
    os.environ[WORK_ENV] = str(folder)  # the phases' scratch (the model folder) goes here, removed at the end
    for index, (kind, phase_args) in enumerate(phases(args.compile)):
        extra = [*phase_args, *(["--dry-run"] if args.dry_run else []), *(["--vae-dir", args.vae_dir] if args.vae_dir else []),
                 *(["--rounds", str(args.rounds)] if args.rounds else [])]
        remaining = deadline - time.monotonic()
        needed = MIN_START[kind][1 if args.dry_run else 0]
        if remaining < needed:
            results.append((phase_args, {"skipped": f"out of time budget ({remaining:.0f} s left, needs about {needed} s)"}))
            continue
        out = folder / f"phase-{index}.json"
        print(f"--- gpu check: {' '.join(phase_args)} ({remaining:.0f} s left)", flush=True)
        # Its own process group, so that a phase stopped at the budget takes the service it started with it.
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", *extra, "--out", str(out)], start_new_session=True)
        try:
            code = process.wait(timeout=remaining - 2)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            results.append((phase_args, {"skipped": "stopped at the end of the time budget"}))
            continue
        if code != 0 or not out.exists():
            failures += 1
            results.append((phase_args, {"failed": f"exit status {code}; its output is above"}))
            continue
        results.append((phase_args, json.loads(out.read_text())))
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    lines = section(args, results)
    print("\n".join(lines))
    if args.no_write:
        pass
    elif not args.dry_run:
        write_section("gpu", f"## {TITLE}\n\n" + "\n".join(lines))
    elif not failures and not measured_on_gpu():
        # A dry run's figures are not worth keeping; what it proved is noted until a GPU run replaces the note.
        ran = sum(1 for _, result in results if "skipped" not in result)
        skipped = "; ".join(sorted({result["skipped"] for _, result in results if "skipped" in result}))
        note = PENDING.format(ran=ran, total=len(results), skipped=skipped or "none", parameters=sdxl_unet_parameters() / 1e9)
        write_section("gpu", f"## {TITLE}\n\n" + note)
        print("\n(dry run: docs/benchmarks.md notes that the plumbing passed; no figures written)")
    return 1 if failures else 0


TITLE = "GPU check: SDXL-size UNet, the service on a full-size random SDXL, the VAE"
PENDING = """Not measured on a GPU yet: no GPU was lent to the session that wrote this. On a CUDA machine
`benchmarks/gpu_check.sh` (`make gpu-check`; its header says how to carry the wheels it installs
offline) measures, in under 8 minutes: an SDXL-size UNet ({parameters:.2f} B parameters, random weights, fp16) at
1024x1024 and 28 evaluations, seconds per image at batch 1 and images/s at batch 8, with PyTorch SDPA
and xformers, eager and torch.compile'd, with peak GPU memory; the service at concurrency 8 against the
raw engine at batch 8 on a full-size random SDXL (UNet, text encoders, VAE) written as a diffusers
folder and loaded by the service's loader; and the VAE decode in fp16 and on the service's path, checked
for NaN and black images. Then it replaces this note.

Its dry run (`benchmarks/gpu_check.sh --dry-run`: the same plumbing on the CPU with tiny sizes) passed
on the machine below: {ran} of {total} phases ran, skipped: {skipped}."""


def sdxl_unet_parameters() -> int:
    """Parameters of benchmarks/gpu_unet.py's SDXL UNet, counted on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**gpu_unet.SDXL_UNET)
    return sum(p.numel() for p in unet.parameters())


def measured_on_gpu() -> bool:
    """Whether docs/benchmarks.md's gpu section holds a GPU run's figures (a dry run leaves those alone)."""
    section = read_section("gpu") or ""
    return "Command: `benchmarks/gpu_check.sh` " in section or "Command: `python -m benchmarks.gpu_unet" in section


def section(args, results: list[tuple[list[str], dict]]) -> list[str]:
    if args.dry_run:
        where = "CPU (dry run: tiny sizes, the plumbing only; not figures to quote)"
    else:
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    lines = [
        f"Command: `benchmarks/gpu_check.sh{' --dry-run' if args.dry_run else ''}` (`python -m benchmarks.gpu_check "
        f"--budget {args.budget:.0f} --compile {args.compile}`) on {where}. Random weights throughout: speed and memory "
        "are those of the real architecture, the images are noise.",
        "",
        "**UNet alone** (benchmarks/gpu_unet.py's SDXL config; cond + uncond rows per image; peak memory = this "
        "process's allocations at batch 8):",
        "",
        "| attention | torch.compile | dtype | size, steps | seconds per image, batch 1 | images/s, batch 8 | warm-up (compile) s | peak GPU memory (GiB) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    serving = None
    for phase_args, result in results:
        name = dict(zip(phase_args[::2], phase_args[1::2]))
        if name["--phase"] == "serving":
            serving = result
            continue
        if "skipped" in result or "failed" in result:
            lines.append(f"| {name['--attention']} | {name['--compile']} | | | {result.get('skipped') or result.get('failed')} | | | |")
            continue
        lines.append(
            f"| {result['attention']} | {result['compile']} | {result['dtype']} | {result['size']}x{result['size']}, "
            f"{result['steps']} | {result['batch1_seconds']:.3f} | {result['batch8_images_per_second']:.2f} | "
            f"{result['warm_up_seconds']:.1f} | {fmt(result['peak_gib'])} |"
        )
    lines.append("")
    if serving is None or "skipped" in serving or "failed" in serving:
        lines.append(f"**Service against the raw engine:** {(serving or {}).get('skipped') or (serving or {}).get('failed')}.")
        return lines
    s = serving
    lines += [
        f"**Service against the raw engine** on a {'tiny (dry run)' if args.dry_run else 'full-size'} random SDXL "
        f"({s['model_gib']:.2f} GiB of {s['dtype']} "
        f"safetensors; built and written in {s['build_seconds']:.0f} s, loaded by the service's loader in "
        f"{s['load_seconds']:.0f} s; attention {s['attention']}, VAE decode in {s['vae_dtype']}): {s['size']}x{s['size']}, "
        f"{s['steps']} steps, euler/normal; {s['images']} images each, rounds interleaved.",
        "",
        "| configuration | images/s | peak GPU memory (GiB) |",
        "| --- | ---: | ---: |",
        f"| raw engine in-process, batch 8 | {s['raw_images_per_second']:.3f} | {fmt(s['raw_peak_gib'])} (this process) |",
        f"| service over gRPC, concurrency 8 | {s['service_images_per_second']:.3f} | {fmt(s['device_peak_gib'])} (whole device, both processes) |",
        "",
        f"Service c8 / raw engine b8: **{s['service_images_per_second'] / s['raw_images_per_second']:.2f}** (target >= 0.9).",
        "",
        "**VAE decode** of a random latent (N(0, 1), the scaled-latent range), fp16 against the service's path:",
        "",
        "| VAE | path | dtype | all finite | black image | mean pixel |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for row in s["vae"]:
        if "error" in row and "mean" not in row:
            lines.append(f"| {row['vae']} | {row['path']} | {row['dtype']} | {row.get('finite', '-')} | {row['error']} | |")
        else:
            lines.append(f"| {row['vae']} | {row['path']} | {row['dtype']} | {row['finite']} | {row['black']} | {row['mean']:.1f} |")
    lines += [
        "",
        "A random-weight VAE does not overflow in fp16 the way the real SDXL VAE is known to; `--vae-dir` with the real "
        "VAE (a diffusers AutoencoderKL folder) checks that case too.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the plumbing only; writes no figures")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for all phases together")
    parser.add_argument("--compile", choices=gpu_unet.COMPILE, default="regional",
                        help="how phase 3 compiles: regional (the repeated transformer blocks) or full (the whole UNet)")
    parser.add_argument("--vae-dir", help="a real SDXL VAE (diffusers AutoencoderKL folder) to check as well")
    parser.add_argument("--rounds", type=int, help="serving rounds of 8 per system (default 2)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--phase", choices=("unet", "serving"), help=argparse.SUPPRESS)
    parser.add_argument("--attention", choices=gpu_unet.ATTENTION, default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is None:
        raise SystemExit(drive(args))
    if args.phase == "unet":
        result = unet_phase(args.dry_run, args.attention, args.compile)
    else:
        result = asyncio.run(serving_phase(args.dry_run, args.rounds, args.vae_dir))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
