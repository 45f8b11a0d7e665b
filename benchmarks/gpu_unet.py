"""An SDXL-size UNet with random weights: seconds per image at batch 1 and throughput at batch 8,
1024x1024, 28 steps, fp16, PyTorch SDPA against xformers (when installed), eager or compiled.

    python -m benchmarks.gpu_unet [--size 1024 --steps 28 --compile none]      # needs CUDA

Only the UNet is timed (28 evaluations, cond and uncond rows in each, as the engine runs them);
text encoding and VAE decode are excluded. Writes docs/benchmarks.md (section "gpu"); the full
GPU check (benchmarks/gpu_check.sh) uses the helpers here and writes that section instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from .report import write_section

# SDXL base UNet architecture (diffusers' config of stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# The same architecture in miniature (the demo model's UNet), for dry runs on a CPU.
TINY_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=96,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8,
)
ATTENTION = ("sdpa", "xformers")
COMPILE = ("none", "regional", "full")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised UNet2DConditionModel, built directly on `device`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).eval().requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def xformers_problem(device: torch.device) -> str | None:
    """Why xformers cannot be used here (None when it can): not installed, no CUDA, or broken."""
    if device.type != "cuda":
        return "needs CUDA"
    try:
        import xformers.ops
    except Exception as error:  # ImportError, or a build for another torch failing to load
        return f"not installed ({type(error).__name__})"
    try:
        q = torch.randn(1, 16, 1, 64, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as error:
        return f"installed but does not run: {type(error).__name__}: {str(error)[:120]}"
    return None


def set_attention(unet, backend: str) -> None:
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"attention must be one of {ATTENTION}, got {backend!r}")


def apply_compile(unet, mode: str, backend: str = "inductor"):
    """none; regional: torch.compile of each repeated transformer block (diffusers'
    compile_repeated_blocks: one compilation serves every block of a shape); full: the whole UNet.
    `backend` is torch.compile's (the GPU check's dry run takes "aot_eager", see there)."""
    if mode == "none":
        return unet
    if mode == "regional":
        unet.compile_repeated_blocks(backend=backend)
        return unet
    if mode == "full":
        return torch.compile(unet, backend=backend)
    raise ValueError(f"compile must be one of {COMPILE}, got {mode!r}")


def unet_inputs(unet, batch: int, size: int, device: torch.device, dtype: torch.dtype):
    config = unet.config
    latent = size // 8
    rows = 2 * batch  # cond + uncond per image
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    x = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device=device, dtype=dtype)}
    return x, context, added


def seconds_per_run(unet, batch: int, size: int, steps: int, device: torch.device | str = "cuda",
                    dtype: torch.dtype = torch.float16, warm_up: int = 3) -> tuple[float, float]:
    """(seconds for `steps` evaluations of `batch` images, seconds the warm-up took)."""
    device = torch.device(device)
    x, context, added = unet_inputs(unet, batch, size, device, dtype)
    rows = x.shape[0]
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(warm_up):  # compilation, if any, happens here
            unet(x, torch.full((rows,), 500.0, device=device), context, added_cond_kwargs=added)
        synchronize(device)
        warm = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(steps):
            unet(x, torch.full((rows,), float(999 - step * (999 // max(steps, 1))), device=device), context, added_cond_kwargs=added)
        synchronize(device)
    return time.perf_counter() - started, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--compile", choices=COMPILE, default="none")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    device = torch.device("cuda")
    unet = build_unet(SDXL_UNET, device, torch.float16)
    backends = [b for b in ATTENTION if b == "sdpa" or xformers_problem(device) is None]
    rows = []
    for backend in backends:
        set_attention(unet, backend)
        model = apply_compile(unet, args.compile)
        one, _ = seconds_per_run(model, 1, args.size, args.steps)
        eight, _ = seconds_per_run(model, 8, args.size, args.steps)
        rows.append((backend, one, 8 / eight))
    lines = [
        f"Command: `python -m benchmarks.gpu_unet --size {args.size} --steps {args.steps} --compile {args.compile}` on "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}. SDXL-size UNet "
        f"({sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B parameters, random weights), fp16, {args.size}x{args.size}, "
        f"{args.steps} evaluations with cond + uncond rows; UNet only.",
        "",
        "| attention | seconds per image, batch 1 | images/s, batch 8 |",
        "| --- | ---: | ---: |",
        *(f"| {backend} | {one:.2f} | {per_second:.2f} |" for backend, one, per_second in rows),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("gpu", "## SDXL-size UNet on a GPU\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
