"""Serving throughput and latency on the demo model, every configuration in one run.

    make bench            # or: .venv/bin/python -m benchmarks.serving [--rounds N]

Measures at 128x128, 28 steps, euler/normal, on the CPU:
- the raw engine in-process (AsyncEngine, no network) at batch 1 and 8;
- the service over gRPC (a `t2i serve` subprocess) with 1, 4 and 8 closed-loop clients;
- a naive peer (diffusers' StableDiffusionXLPipeline once per request under a lock) with 8 clients;
- a late arrival: a request sent when another is halfway through, against its solo latency.
Prints the figures and ratios and writes them to docs/benchmarks.md (section "serving").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from t2i.client import Client
from t2i.domain import GenerateRequest

from testbed.server import ServerProcess

from .report import write_section

SIZE, STEPS = 128, 28
PROMPT = "masterpiece, best quality, 1girl, long pink hair, violet eyes, smile, upper body, sunset"
NEGATIVE = "worst quality, low quality, bad anatomy"
OPTIONS = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=7.0, sampler="euler", scheduler="normal")


@dataclass
class Throughput:
    images: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.images / self.seconds

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- raw engine -----------------------------------------------------------------------------

async def _raw_engine(data_dir: Path, batch: int, rounds: int) -> Throughput:
    import torch

    from t2i.engine.engine import AsyncEngine
    from t2i.settings import EngineConfig
    from t2i.models.demo import demo_spec
    from t2i.models.loader import load_model

    model = load_model(demo_spec(data_dir), torch.device("cpu"))
    engine = AsyncEngine({1: model}, EngineConfig(max_batch_size=8))
    engine.start()

    async def one(seed: int) -> float:
        started = time.perf_counter()
        await engine.generate(GenerateRequest(model_id=1, prompt=PROMPT, seed=seed, **OPTIONS))
        return time.perf_counter() - started

    await asyncio.gather(*(one(i) for i in range(batch)))  # warm-up
    latencies: list[float] = []
    started = time.perf_counter()
    for r in range(rounds):
        latencies += await asyncio.gather(*(one(r * batch + i) for i in range(batch)))
    seconds = time.perf_counter() - started
    await engine.close()
    return Throughput(batch * rounds, seconds, latencies)


# --- load over gRPC -------------------------------------------------------------------------

def closed_loop(target: str, clients: int, per_client: int) -> Throughput:
    """`clients` threads, each sending its next request as soon as the previous one returns."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        with Client(target, timeout=600) as client:
            for i in range(per_client):
                started = time.perf_counter()
                client.generate(PROMPT, seed=index * 1000 + i, **OPTIONS)
                with lock:
                    latencies.append(time.perf_counter() - started)

    def warm_up(index: int) -> None:
        with Client(target, timeout=600) as client:
            client.generate(PROMPT, seed=index, **OPTIONS)

    with ThreadPoolExecutor(clients) as pool:  # not measured
        list(pool.map(warm_up, range(clients)))
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return Throughput(clients * per_client, time.perf_counter() - started, latencies)


def late_arrival(target: str, repeats: int) -> tuple[float, float]:
    """(solo latency, latency when sent halfway through another request), medians."""
    with Client(target, timeout=600) as client:
        def timed(seed: int) -> float:
            started = time.perf_counter()
            client.generate(PROMPT, seed=seed, **OPTIONS)
            return time.perf_counter() - started

        timed(0)
        solo = statistics.median(timed(i) for i in range(1, repeats + 1))
        late = []
        for i in range(repeats):
            first = threading.Thread(target=timed, args=(100 + i,))
            first.start()
            time.sleep(solo / 2)
            late.append(timed(200 + i))
            first.join()
    return solo, statistics.median(late)


def naive_peer(model_dir: Path, clients: int, per_client: int) -> Throughput:
    port = free_port()
    # The same intra-op thread count the service picks on a CPU, so that the comparison is
    # about batching, not about OpenMP settings (with all cores it runs slower here).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) - 1))}
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.naive_peer", str(model_dir), str(port)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        return closed_loop(f"127.0.0.1:{port}", clients, per_client)
    finally:
        process.kill()
        process.wait()


# --- main -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="batches (or requests per client) per configuration")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    from t2i.models.demo import ensure_demo_model

    data_dir = Path(tempfile.mkdtemp(prefix="t2i-bench-"))
    model_dir = ensure_demo_model(data_dir)
    rounds = args.rounds

    print("raw engine, in-process ...", flush=True)
    raw_1 = asyncio.run(_raw_engine(data_dir, 1, rounds * 2))
    raw_8 = asyncio.run(_raw_engine(data_dir, 8, rounds))

    print("service over gRPC ...", flush=True)
    with ServerProcess(data_dir, "--no-billing", "--max-batch-size", "8") as server:
        server.wait_serving()
        service = {c: closed_loop(server.target, c, rounds if c > 1 else rounds * 2) for c in (1, 4, 8)}
        solo, late = late_arrival(server.target, 3)

    print("naive peer ...", flush=True)
    naive = naive_peer(model_dir, 8, max(1, rounds // 2))

    rows = [
        ("raw engine, batch 1", raw_1),
        ("raw engine, batch 8", raw_8),
        ("service gRPC, concurrency 1", service[1]),
        ("service gRPC, concurrency 4", service[4]),
        ("service gRPC, concurrency 8", service[8]),
        ("naive peer gRPC, concurrency 8", naive),
    ]
    ratios = [
        ("service c8 / raw engine b8", service[8].per_second / raw_8.per_second, ">= 0.9"),
        ("service c8 / naive peer c8", service[8].per_second / naive.per_second, ">= 1.5"),
        ("late arrival / its solo latency", late / solo, "<= 1.25"),
        ("raw engine b8 / b1 (batching gain)", raw_8.per_second / raw_1.per_second, ""),
    ]
    lines = [
        f"Command: `make bench` (`python -m benchmarks.serving --rounds {rounds}`). Demo model (tiny random SDXL), "
        f"{SIZE}x{SIZE}, {STEPS} steps, euler/normal, CPU, fp32; closed-loop clients.",
        "",
        "| configuration | images | images/s | p50 latency (s) |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {t.images} | {t.per_second:.2f} | {t.p50:.2f} |" for name, t in rows),
        "",
        "| ratio | measured | target |",
        "| --- | ---: | --- |",
        *(f"| {name} | {value:.2f} | {target} |" for name, value, target in ratios),
        "",
        f"Late arrival: solo latency {solo:.2f} s, sent halfway through another request {late:.2f} s.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("serving", "## Serving: engine, gRPC service and a naive peer\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
