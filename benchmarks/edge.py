"""REST through Envoy against direct gRPC, on the same running service, in one run.

    make bench-edge      # or: .venv/bin/python -m benchmarks.edge [--requests N --rounds R]

`t2i up --no-billing` on the demo model; closed-loop clients at concurrency 8 send the serving
benchmark's request (128x128, 28 steps, euler/normal) either as REST/JSON to Envoy or as gRPC
straight to the service, alternating round by round. Writes docs/benchmarks.md ("edge").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from t2i.client import Client

from testbed.up import UpProcess

from .report import write_section
from .serving import OPTIONS, PROMPT, SIZE, STEPS

CONCURRENCY = 8
REST_BODY = {
    "modelId": 1, "prompt": PROMPT, "negativePrompt": OPTIONS["negative_prompt"], "width": SIZE, "height": SIZE,
    "steps": STEPS, "cfgScale": OPTIONS["cfg_scale"], "samplerName": OPTIONS["sampler"], "scheduler": OPTIONS["scheduler"],
}


def closed_loop(send, requests: int) -> float:
    """Images per second with CONCURRENCY clients; `send(i)` makes request i."""
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker(_: int) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            send(i)

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(worker, range(CONCURRENCY)))
    return requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from t2i.models.demo import ensure_demo_model

    root = Path(tempfile.mkdtemp(prefix="t2i-bench-edge-"))
    ensure_demo_model(root / "seed")
    up = UpProcess(root / "seed", root / "data", "--no-billing").wait_ready()
    clients = threading.local()

    def rest(i: int) -> None:
        reply = up.request("POST", "/text-to-image/generate", json.dumps({**REST_BODY, "seed": i}),
                           {"Content-Type": "application/json"}, timeout=600)
        assert reply.status == 201, reply.body[:200]

    def grpc_direct(i: int) -> None:
        if not hasattr(clients, "client"):
            clients.client = Client(f"127.0.0.1:{up.grpc_port}", timeout=600)
        clients.client.generate(PROMPT, seed=i, **OPTIONS)

    try:
        closed_loop(rest, CONCURRENCY)  # warm-up
        closed_loop(grpc_direct, CONCURRENCY)
        rounds = {"REST through Envoy": [], "gRPC direct": []}
        for _ in range(args.rounds):
            rounds["gRPC direct"].append(closed_loop(grpc_direct, args.requests))
            rounds["REST through Envoy"].append(closed_loop(rest, args.requests))
    finally:
        up.kill()
    result = {name: statistics.median(values) for name, values in rounds.items()}
    ratio = result["REST through Envoy"] / result["gRPC direct"]
    lines = [
        f"Command: `make bench-edge` (`python -m benchmarks.edge --requests {args.requests} --rounds {args.rounds}`). "
        f"`t2i up --no-billing`, demo model, {SIZE}x{SIZE}, {STEPS} steps, concurrency {CONCURRENCY}, closed loop; "
        "the two paths alternate round by round against the same service; median of the rounds.",
        "",
        "| path | images/s |",
        "| --- | ---: |",
        *(f"| {name} | {value:.2f} |" for name, value in result.items()),
        "",
        f"REST through Envoy / direct gRPC: **{ratio:.2f}** (target >= 0.9).",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("edge", "## REST edge: Envoy against direct gRPC\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
