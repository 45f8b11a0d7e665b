"""What the engine costs outside the UNet: the denoise loop per step, and a request's overhead.

    make bench            # runs this first; alone: .venv/bin/python -m benchmarks.loop_cost

The UNet is replaced by one that returns zeros at once (everything else is the real demo model),
so what is left is the engine's own work, which on a GPU is the part that decides latency: an
SDXL step takes about 40 ms on an H100, and the loop must stay near 1 ms of it.

1. Loop per step: `EngineCore.step()` driven directly on the homogeneous request (128x128, 28
   euler steps), with 1 and with 8 requests running; milliseconds per step once they run
   (schedule, the batch's tensors, the no-op forward, each sampler's update), admission steps
   (text encoding) excluded.
2. Per request, in process: the AsyncEngine (admission, text encoding, the loop, VAE decode,
   PNG encode) against diffusers' StableDiffusionXLPipeline with the same no-op UNet (text
   encoding, its scheduler loop, VAE decode, then PNG encoding on a pool of two, as the
   dynamic peer does), requests 1 and 8 at a time, rounds alternating; milliseconds per request.
Writes docs/benchmarks.md (section "loop") unless --no-write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from t2i.engine.batching import Batcher
from t2i.engine.core import EngineCore
from t2i.engine.engine import AsyncEngine
from t2i.engine.request import EngineRequest
from t2i.engine.text import prepare_prompt
from t2i.models.demo import demo_spec, ensure_demo_model
from t2i.models.loader import load_model
from t2i.server.convert import request_to_pb
from t2i.settings import EngineConfig

from .diffusers_peer import PeerPipeline, encode_png, set_torch_threads
from .report import bench_parser, publish
from .workloads import HOMOGENEOUS

ROUNDS = 5


class NoopUNet(torch.nn.Module):
    """Answers every forward with zeros of the sample's shape; forwards `config` and the rest."""

    class Output:
        def __init__(self, sample: torch.Tensor) -> None:
            self.sample = sample

        def __getitem__(self, index: int) -> torch.Tensor:
            return (self.sample,)[index]

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.inner = unet

    def forward(self, sample, *args, **kwargs):
        return NoopUNet.Output(torch.zeros_like(sample))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def loop_ms_per_step(model, batch: int) -> float:
    """Median ms per step of the core with `batch` homogeneous requests running."""
    per_step = []
    for round_ in range(ROUNDS):
        core = EngineCore({1: model}, Batcher(batch, admission_window=0.0))
        for i in range(batch):
            params = dataclasses.replace(HOMOGENEOUS, seed=round_ * batch + i)
            prompts = (prepare_prompt(model, params.prompt), prepare_prompt(model, params.negative_prompt, "negativePrompt"))
            core.add(EngineRequest(request_id=f"{round_}-{i}", params=params, seed=params.seed, prompts=prompts))
        core.step()  # admission: encodes the prompts and runs the first step; not the loop's steady cost
        steps, started = 0, time.perf_counter()
        while core.has_work():
            core.step()
            steps += 1
        per_step.append((time.perf_counter() - started) / steps)
    return 1000 * statistics.median(per_step)


async def per_request_ms(model, model_dir: Path) -> dict[tuple[str, int], float]:
    worker = ThreadPoolExecutor(1, initializer=set_torch_threads)
    png = ThreadPoolExecutor(EngineConfig().png_workers)
    pipeline = worker.submit(PeerPipeline, model_dir).result()
    pipeline.pipeline.unet = NoopUNet(pipeline.pipeline.unet)
    engine = AsyncEngine({1: model}, EngineConfig(max_batch_size=8))
    engine.start()
    seeds = iter(range(10**6))

    def requests(n: int):
        return [dataclasses.replace(HOMOGENEOUS, seed=next(seeds)) for _ in range(n)]

    def pipeline_call(batch):
        images = worker.submit(pipeline.generate, [request_to_pb(r) for r in batch]).result()
        list(png.map(encode_png, images))

    times: dict[tuple[str, int], list[float]] = {}
    try:
        for batch in (1, 8):
            await asyncio.gather(*(engine.generate(r) for r in requests(batch)))  # warm-up
            pipeline_call(requests(batch))
            for _ in range(ROUNDS):
                rounds = 8 // batch
                started = time.perf_counter()
                for _ in range(rounds):
                    await asyncio.gather(*(engine.generate(r) for r in requests(batch)))
                times.setdefault(("engine", batch), []).append((time.perf_counter() - started) / 8)
                started = time.perf_counter()
                for _ in range(rounds):
                    await asyncio.to_thread(pipeline_call, requests(batch))
                times.setdefault(("pipeline", batch), []).append((time.perf_counter() - started) / 8)
    finally:
        await engine.close()
        worker.shutdown()
        png.shutdown()
    return {key: 1000 * statistics.median(values) for key, values in times.items()}


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="t2i-loop-"))
    model_dir = ensure_demo_model(data_dir)
    model = load_model(demo_spec(data_dir), torch.device("cpu"))
    model = dataclasses.replace(model, unet=NoopUNet(model.unet))
    torch.set_num_threads(EngineConfig().torch_threads or max(1, (torch.get_num_threads() or 2) - 1))
    loop = {batch: loop_ms_per_step(model, batch) for batch in (1, 8)}
    request = asyncio.run(per_request_ms(model, model_dir))
    lines = [
        "The demo model with a UNet that returns zeros at once (`python -m benchmarks.loop_cost`, part of "
        f"`make bench`): {HOMOGENEOUS.width}x{HOMOGENEOUS.height}, {HOMOGENEOUS.steps} euler steps, CPU, "
        f"medians of {ROUNDS} rounds.",
        "",
        "| requests at a time | loop ms per step | ms per request, engine | ms per request, diffusers pipeline | pipeline / engine |",
        "| --- | --- | --- | --- | --- |",
    ]
    for batch in (1, 8):
        engine, pipeline = request[("engine", batch)], request[("pipeline", batch)]
        lines.append(f"| {batch} | {loop[batch]:.2f} | {engine:.1f} | {pipeline:.1f} | {pipeline / engine:.2f}x |")
    lines += [
        "",
        "Loop per step: `EngineCore.step()` with that many requests running, admission steps excluded. Per request: "
        "everything outside the UNet, in process (the engine's admission, text encoding, loop, VAE decode on its "
        "thread and PNG encoding with the recipe; the pipeline's text encoding, scheduler loop, VAE decode, then "
        "PNG encoding on two threads).",
    ]
    publish("loop", "## The engine outside the UNet\n\n" + "\n".join(lines), args)


if __name__ == "__main__":
    main()
