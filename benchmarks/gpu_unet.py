"""An SDXL-size UNet with random weights on a GPU: seconds per image at batch 1 and throughput at
batch 8, 1024x1024, 28 steps, fp16, PyTorch SDPA against xformers (when installed).

    python -m benchmarks.gpu_unet [--size 1024 --steps 28]      # needs CUDA

Only the UNet is timed (28 evaluations, cond and uncond rows in each, as the engine runs them);
text encoding and VAE decode are excluded. Writes docs/benchmarks.md (section "gpu").
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


def seconds_per_run(unet, batch: int, size: int, steps: int) -> float:
    latent = size // 8
    rows = 2 * batch  # cond + uncond per image
    x = torch.randn(rows, 4, latent, latent, device="cuda", dtype=torch.float16)
    context = torch.randn(rows, 77, 2048, device="cuda", dtype=torch.float16)
    added = {"text_embeds": torch.randn(rows, 1280, device="cuda", dtype=torch.float16),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device="cuda", dtype=torch.float16)}
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            unet(x, torch.full((rows,), 500.0, device="cuda"), context, added_cond_kwargs=added)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(steps):
            unet(x, torch.full((rows,), float(999 - step * 35), device="cuda"), context, added_cond_kwargs=added)
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).to("cuda", torch.float16).eval()
    unet.to(memory_format=torch.channels_last)
    backends = ["sdpa"]
    try:
        import xformers  # noqa: F401

        backends.append("xformers")
    except ImportError:
        pass
    rows = []
    for backend in backends:
        if backend == "sdpa":
            unet.set_attn_processor(AttnProcessor2_0())
        else:
            unet.enable_xformers_memory_efficient_attention()
        one = seconds_per_run(unet, 1, args.size, args.steps)
        eight = seconds_per_run(unet, 8, args.size, args.steps)
        rows.append((backend, one, 8 / eight))
    lines = [
        f"Command: `python -m benchmarks.gpu_unet --size {args.size} --steps {args.steps}` on {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}. SDXL-size UNet ({sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B parameters, "
        f"random weights), fp16, {args.size}x{args.size}, {args.steps} evaluations with cond + uncond rows; UNet only.",
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
