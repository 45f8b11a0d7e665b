"""What streaming costs: unary calls against streams with previews, on one service, in one run.

    make bench-stream     # or: .venv/bin/python -m benchmarks.streaming [--rounds N]

A `t2i serve` subprocess on the demo model (no billing), 8 closed-loop gRPC clients, 128x128, 28
euler steps. Rounds alternate: 8 clients x 4 unary calls, then 8 clients x 4 streamed calls with
a preview every 2 steps (and every progress event). Target: the streams' throughput is at least
0.95x the unary one. Writes docs/benchmarks.md (section "streaming").
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from t2i.client import Client
from t2i.domain import GenerateResult, Preview, Progress
from t2i.models.demo import ensure_demo_model

from testbed.server import ServerProcess

from .report import bench_parser, publish

CLIENTS, PER_CLIENT = 8, 4
OPTIONS = dict(width=128, height=128, steps=28, cfg_scale=7.0, sampler="euler", scheduler="normal")
PROMPT = "masterpiece, best quality, 1girl, long pink hair, violet eyes, smile, upper body, sunset"


def round_of(target: str, streamed: bool, offset: int) -> tuple[float, dict[str, int]]:
    counts = {"previews": 0, "progress": 0}

    def client_loop(index: int) -> None:
        with Client(target, timeout=600) as client:
            for i in range(PER_CLIENT):
                seed = offset + index * PER_CLIENT + i
                if not streamed:
                    client.generate(PROMPT, seed=seed, **OPTIONS)
                    continue
                for event in client.generate_stream(PROMPT, seed=seed, preview_every_steps=2, **OPTIONS):
                    if isinstance(event, Preview):
                        counts["previews"] += 1
                    elif isinstance(event, Progress):
                        counts["progress"] += 1
                assert isinstance(event, GenerateResult)

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_loop, range(CLIENTS)))
    return CLIENTS * PER_CLIENT / (time.perf_counter() - started), counts


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="t2i-bench-stream-") as folder:
        ensure_demo_model(Path(folder))
        with ServerProcess(Path(folder), "--no-billing", "--max-batch-size", str(CLIENTS)) as server:
            server.wait_serving()
            round_of(server.target, False, 10_000)  # warm-up
            unary, streamed, counts = [], [], {}
            for r in range(args.rounds):
                unary.append(round_of(server.target, False, r * 1000)[0])
                rate, counts = round_of(server.target, True, r * 1000 + 500)
                streamed.append(rate)
    u, s = statistics.median(unary), statistics.median(streamed)
    text = f"""## Streaming with previews against unary calls

Command: `make bench-stream` (`python -m benchmarks.streaming --rounds {args.rounds}`). One `t2i serve` on the demo model, {CLIENTS} closed-loop gRPC clients x {PER_CLIENT} calls, {OPTIONS['width']}x{OPTIONS['height']}, {OPTIONS['steps']} euler steps; rounds alternate between the two kinds; median of {args.rounds}.

| calls | images/s |
| --- | ---: |
| unary (GenerateImage) | {u:.2f} |
| streamed with a preview every 2 steps (GenerateImageStream) | {s:.2f} |

Streams with previews: **{s / u:.3f}x** the unary throughput (target >= 0.95x). The last round sent {counts.get('previews', 0)} previews and {counts.get('progress', 0)} progress events for {CLIENTS * PER_CLIENT} images.

Reading: a preview is a 4x3 projection of the latent and a small JPEG, both on the encode pool. Progress events are throttled to one per 250 ms per request and previews to one per 500 ms (`--preview-interval-ms`) on top of the request's step interval, so the stream adds little besides the gRPC messages. Before the preview throttle, a preview every 2 steps meant 448 previews for these 32 images; that run measured 0.906x (same command, 2026-12-02). The 2 cores that the JPEGs, the messages and the denoise loop share are the cost.

"""
    publish("streaming", text, args)


if __name__ == "__main__":
    main()
