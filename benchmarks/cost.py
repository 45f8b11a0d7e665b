"""Calibrate the cost model (service/t2i/cost.py) by measurement on the demo model.

    make bench-cost       # or: .venv/bin/python -m benchmarks.cost

Measures, in-process on the CPU:
- one UNet evaluation (a request's cond and uncond rows) at three latent sizes and with text
  contexts of 1, 2, 4 and 8 chunks of 77 tokens: the cost per latent pixel and the extra cost
  of each chunk beyond the first (cross-attention reads every context token);
- one VAE decode at three image sizes: its cost in UNet evaluations of the same image;
- one VAE encode of a picture (image to image) at the same sizes, likewise;
- one text encode per 77-token chunk, in evaluations of a 1-megapixel image.
Prints the fitted constants next to the ones cost.py uses and writes docs/benchmarks.md
(section "cost"). Real SDXL has other proportions: rerun on the target hardware
(benchmarks/gpu_check.sh runs the GPU side when a GPU is there).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from t2i import cost
from t2i.engine.denoise import UNetInput, evaluate, size_conditioning
from t2i.engine.imaging import decode_latent
from t2i.engine.latents import encode_picture
from t2i.engine.text import encode_prompts, prepare_prompt
from t2i.models.demo import demo_spec
from t2i.models.loader import load_model

from .report import bench_parser, publish

SIDES = (32, 64, 96)  # latent sides: 256, 512, 768 pixels
CHUNKS = (1, 2, 4, 8)
WORD = "masterpiece "  # one CLIP token


def timed(function, repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def prompt_of(chunks: int) -> str:
    return (WORD * (75 * chunks - 5)).strip()


def measure(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="t2i-bench-cost-") as folder:
        model = load_model(demo_spec(Path(folder)), torch.device("cpu"))
        conditioning = {c: encode_prompts(model, [prepare_prompt(model, prompt_of(c), max_chunks=64)])[0] for c in CHUNKS}
        unet: dict[tuple[int, int], float] = {}
        for side in SIDES:
            x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(side))
            time_ids = size_conditioning(side * 8, side * 8, model.device)
            for chunks in CHUNKS:
                text = conditioning[chunks]
                unet[(side, chunks)] = timed(lambda: evaluate(model, [UNetInput(x, 3.0, text, text, time_ids)]), repeats)
        decode = {side: timed(lambda: decode_latent(model, torch.randn(1, 4, side, side)), repeats) for side in SIDES}
        picture = {side: timed(lambda: encode_picture(model, torch.rand(side * 8, side * 8, 3)), repeats) for side in SIDES}
        one_chunk = [prepare_prompt(model, prompt_of(1))]
        encode = timed(lambda: encode_prompts(model, one_chunk * 8), repeats) / 8
    return {"unet": unet, "decode": decode, "picture": picture, "encode": encode}


def fit(measured: dict) -> dict[str, float]:
    """Least squares on t = a + b * area * (1 + k * (chunks - 1)), then per-megapixel ratios."""
    rows, times = [], []
    for (side, chunks), seconds in measured["unet"].items():
        area = side * side
        rows.append([1.0, area, area * (chunks - 1)])
        times.append(seconds)
    a, b, bk = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)[0]
    per_megapixel_evaluation = b * (1024 * 1024 / 64)  # one evaluation of a 1-megapixel image, seconds
    megapixels = [s * s * 64 / 2**20 for s in SIDES]
    decode_per_megapixel = np.polyfit(megapixels, [measured["decode"][s] for s in SIDES], 1)[0]
    picture_per_megapixel = np.polyfit(megapixels, [measured["picture"][s] for s in SIDES], 1)[0]
    return {
        "fixed_seconds": float(a),
        "context_cost_per_extra_chunk": float(bk / b),
        "decode_cost_in_evaluations": float(decode_per_megapixel / per_megapixel_evaluation),
        "image_encode_cost_in_evaluations": float(picture_per_megapixel / per_megapixel_evaluation),
        "encode_cost_per_chunk": float(measured["encode"] / per_megapixel_evaluation),
    }


def report(measured: dict, fitted: dict[str, float], repeats: int) -> str:
    table = "\n".join(
        f"| {side * 8}x{side * 8} | " + " | ".join(f"{measured['unet'][(side, c)] * 1000:.1f}" for c in CHUNKS)
        + f" | {measured['decode'][side] * 1000:.1f} | {measured['picture'][side] * 1000:.1f} |"
        for side in SIDES
    )
    used = {
        "context_cost_per_extra_chunk": cost.CONTEXT_COST_PER_EXTRA_CHUNK,
        "decode_cost_in_evaluations": cost.DECODE_COST_IN_EVALUATIONS,
        "image_encode_cost_in_evaluations": cost.IMAGE_ENCODE_COST_IN_EVALUATIONS,
        "encode_cost_per_chunk": cost.ENCODE_COST_PER_CHUNK,
    }
    constants = "\n".join(f"| `{name}` | {fitted[name]:.3f} | {float(used[name]):g} |" for name in used)
    return f"""## Cost model calibration

Command: `make bench-cost` (`python -m benchmarks.cost --repeats {repeats}`). Demo model, CPU fp32, in-process, median of {repeats}.

ms per UNet evaluation (cond + uncond rows) with 1 / 2 / 4 / 8 context chunks, per VAE decode and per VAE encode of a picture:

| image | 1 chunk | 2 chunks | 4 chunks | 8 chunks | VAE decode | VAE encode |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{table}

Fit `t = a + b * latent area * (1 + k * (chunks - 1))` ({fitted['fixed_seconds'] * 1000:.1f} ms fixed per evaluation); in units of one evaluation of a 1-megapixel image:

| constant (service/t2i/cost.py) | measured | used |
| --- | ---: | ---: |
{constants}

Reading: the fixed per-evaluation time (Python and kernel launches) dominates small images on this CPU; the per-pixel terms are what grows with the request, so they are what prices and fair shares follow. The demo model's proportions are not SDXL's (its UNet is tiny next to its VAE); on a GPU rerun this with the real architecture. The \"used\" column was fitted on an earlier run of this command. Fits move from run to run on this shared 2-core machine: on 2026-12-02 the extra-chunk term varied by about 3x between runs. So the prices keep the values they have, until a measurement on the real model replaces them.

"""


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    measured = measure(args.repeats)
    publish("cost", report(measured, fit(measured), args.repeats), args)


if __name__ == "__main__":
    main()
