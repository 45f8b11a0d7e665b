"""Serving benchmark: the service against a dynamic-batching peer and a naive peer, on a
homogeneous and a mixed workload, open loop at three loads, every system in one run.

    make bench            # or: .venv/bin/python -m benchmarks.serving [--duration S --grace S]

The systems, all on the demo model (tiny random SDXL, fp32, CPU), all behind GenerateImage:
- service: `t2i serve --no-billing` (step-level continuous batching; EngineConfig defaults:
  max batch 8, 20 ms admission window, cores - 1 intra-op threads);
- dynamic peer (benchmarks/dynamic_peer.py): diffusers' StableDiffusionXLPipeline, requests
  that one pipeline call can serve together batched into one call (same window, max batch);
- naive peer (benchmarks/naive_peer.py): the same pipeline once per request under a lock.

What runs, in this order (all three servers stay up; the idle ones take no CPU):
1. closed loop at concurrency 8 on the homogeneous workload for every system, and the raw
   engine in-process at batch 8 interleaved with the service's rounds (their ratio is the
   network and server overhead); the service's closed-loop throughput on each workload is its
   capacity there, and the open-loop rates are set from it;
2. late arrival: a request sent halfway through another request, and halfway through a batch
   of four, against its solo latency (service and dynamic peer);
3. open loop, per workload and load (0.5x, 0.9x, 1.3x capacity): the same Poisson trace (fixed
   seed) for each system in turn, the order rotating from load to load. Arrivals come for
   `--duration` seconds; at duration + grace whatever is unanswered is cancelled (its deadline)
   and counts as not completed. Throughput is completed requests over the span from the first
   arrival to the last completion.
Writes docs/benchmarks.md (section "serving").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from t2i.domain import GenerateRequest

from testbed.server import ServerProcess

from . import load, workloads
from .diffusers_peer import group_key, torch_threads
from .report import fmt, write_section

# The homogeneous request (the earlier serving benchmark's; benchmarks/edge.py uses these too).
SIZE, STEPS = workloads.HOMOGENEOUS.width, workloads.HOMOGENEOUS.steps
PROMPT = workloads.HOMOGENEOUS_PROMPT
NEGATIVE = workloads.HOMOGENEOUS_NEGATIVE
OPTIONS = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=7.0, sampler="euler", scheduler="normal")

SYSTEMS = ("service", "dynamic peer", "naive peer")
LOADS = (0.5, 0.9, 1.3)
WORKLOAD_SEED = 15
TRACE_SEED = 1500
CONCURRENCY = 8
WARM_IN = 1 / 3  # open loop: throughput counts completions from this share of the arrival period to its end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerProcess:
    """`python -m benchmarks.<module> MODEL_DIR PORT` until killed; its stderr goes to a file."""

    def __init__(self, module: str, model_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / f"{module.rsplit('.', 1)[-1]}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, str(model_dir), str(self.port)],
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True,
        )

    def wait_ready(self) -> None:
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{self.log.stem} did not start:\n{self.log.read_text()[-4000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class CpuMeter:
    """Core-seconds the rest of the machine used (everything but the benchmark's own processes)
    over a stretch of time, from /proc: the machine is shared, and this says how much."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.other_cores = 0.0

    @classmethod
    def _busy(cls) -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(fields) - fields[3] - fields[4]) / cls.TICK

    def _ours(self) -> float:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        return total / self.TICK

    def __enter__(self) -> CpuMeter:
        self._start = (time.monotonic(), self._busy(), self._ours())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, ours = time.monotonic() - self._start[0], self._busy() - self._start[1], self._ours() - self._start[2]
        self.other_cores = max(0.0, busy - ours) / wall if wall > 0 else 0.0


QUIET_WAIT = 120.0  # seconds, at most, before the capacity measurement
QUIET_CORES = 0.3
NOISY_CORES = 0.3  # an open-loop run during which other processes used more is measured once more
REPEATS = 4  # at most, in the whole benchmark (keeps `make bench` under 20 minutes)
REPEAT_QUIET_WAIT = 30.0


async def wait_for_quiet(pids: list[int], limit: float = QUIET_WAIT) -> tuple[float, float]:
    """Wait until the rest of the machine uses under QUIET_CORES over 5 s, or `limit` seconds
    have passed; (seconds waited, the last load measured)."""
    started = time.monotonic()
    while True:
        with CpuMeter(pids) as cpu:
            await asyncio.sleep(5)
        if cpu.other_cores < QUIET_CORES or time.monotonic() - started >= limit:
            return time.monotonic() - started - 5, cpu.other_cores


@dataclass
class System:
    name: str
    target: load.Target
    server: ServerProcess | None = None  # the service: queue waits come from its log

    def fill_from_log(self, result: load.RunResult) -> load.RunResult:
        """The service logs each image's queue wait and mean batch ("image generated")."""
        if self.server is None:
            return result
        wanted = {o.request_id: o for o in result.completed}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            logged = {e.get("request_id"): e for e in self.server.logged("image generated")}
            if all(rid in logged for rid in wanted):
                break
            time.sleep(0.1)
        entries = [logged[rid] for rid in wanted if rid in logged]
        for entry in entries:
            wanted[entry["request_id"]].queue_wait, wanted[entry["request_id"]].batch = entry["queue_wait_s"], entry["mean_batch"]
        if entries:  # per-request stage means, for the reading
            result.extra["stages"] = {key: statistics.fmean(e[key] for e in entries) for key in ("denoise_s", "decode_s", "png_s")}
        return result


# --- the raw engine in-process ----------------------------------------------------------------

class RawEngine:
    def __init__(self, data_dir: Path) -> None:
        import torch

        from t2i.engine.engine import AsyncEngine
        from t2i.models.demo import demo_spec
        from t2i.models.loader import load_model
        from t2i.settings import EngineConfig

        self.engine = AsyncEngine({1: load_model(demo_spec(data_dir), torch.device("cpu"))}, EngineConfig(max_batch_size=CONCURRENCY))

    async def batches(self, requests: list[GenerateRequest], batch: int) -> tuple[int, float, list[float]]:
        """(images, seconds, latencies) for the requests sent `batch` at a time."""
        async def one(request: GenerateRequest) -> float:
            started = time.perf_counter()
            await self.engine.generate(request)
            return time.perf_counter() - started

        latencies: list[float] = []
        started = time.perf_counter()
        for i in range(0, len(requests), batch):
            latencies += await asyncio.gather(*(one(r) for r in requests[i : i + batch]))
        return len(requests), time.perf_counter() - started, latencies


# --- the measurements -------------------------------------------------------------------------

@dataclass
class ClosedLoop:
    images: int
    per_second: float
    p50: float


def closed(result: load.RunResult) -> ClosedLoop:
    return ClosedLoop(len(result.completed), result.steady_per_second, result.latency(50))


async def measure(args, systems: dict[str, System], raw: RawEngine, mixed_pool: workloads.Workload) -> dict:
    figures: dict = {"closed": {}, "late": {}, "open": {}}
    homogeneous = workloads.homogeneous(4000, WORKLOAD_SEED)
    raw.engine.start()

    # Warm-up, not measured: every system sees each size and batch shape once.
    print("warm-up ...", flush=True)
    warm = workloads.mixed(CONCURRENCY, WORKLOAD_SEED + 1, args.count_tokens).requests
    for system in systems.values():
        await load.closed_loop(system.target, homogeneous.requests[-CONCURRENCY:], CONCURRENCY, "warm-h")
        await load.closed_loop(system.target, warm, CONCURRENCY, "warm-m")
    await raw.batches(list(homogeneous.requests[-CONCURRENCY:]), CONCURRENCY)

    # The capacity measured next sets every open-loop rate: give the machine up to QUIET_WAIT s to quieten first.
    waited = await wait_for_quiet(args.pids)
    print(f"  other CPU load {waited[1]:.2f} cores after waiting {waited[0]:.0f} s for a quieter machine", flush=True)
    closed_cpu = CpuMeter(args.pids).__enter__()

    # 1. Closed loop, concurrency 8, homogeneous: the four configurations take turns, half the requests at a time.
    #    Their batches run in lockstep (the naive peer: one at a time), so images over time is exact.
    print("closed loop, concurrency 8 ...", flush=True)
    requests = list(homogeneous.requests[: args.closed_requests])
    half = len(requests) // 2
    parts: dict[str, list[tuple[int, float, list[float]]]] = collections.defaultdict(list)
    for part in (requests[:half], requests[half:]):
        parts["raw engine, batch 8"].append(await raw.batches(part, CONCURRENCY))
        for name in SYSTEMS:
            result = await load.closed_loop(systems[name].target, part, CONCURRENCY, "closed-h")
            parts[name].append((len(result.completed), result.seconds, [o.latency for o in result.completed]))
    for name, runs in parts.items():
        images = sum(images for images, _, _ in runs)
        figures["closed"][(name, "homogeneous")] = ClosedLoop(
            images, images / sum(seconds for _, seconds, _ in runs), statistics.median([x for _, _, lat in runs for x in lat])
        )
    mixed_closed = list(workloads.mixed(args.closed_mixed_requests, WORKLOAD_SEED + 2, args.count_tokens).requests)
    figures["closed"][("service", "mixed")] = closed(
        await load.closed_loop(systems["service"].target, mixed_closed, CONCURRENCY, "closed-m")
    )
    closed_cpu.__exit__(None, None, None)
    figures["closed_other_cores"] = closed_cpu.other_cores
    await raw.engine.close()
    capacity = {w: figures["closed"][("service", w)].per_second for w in ("homogeneous", "mixed")}
    for (name, workload), c in figures["closed"].items():
        print(f"  {name:22s} {workload:12s} {c.per_second:5.2f} images/s  p50 {c.p50:5.2f} s", flush=True)

    # 2. Late arrival (homogeneous request), service and dynamic peer.
    print("late arrival ...", flush=True)
    for name in ("service", "dynamic peer"):
        for companions in (1, 4):
            figures["late"][(name, companions)] = await load.late_arrival(
                systems[name].target, replace(workloads.HOMOGENEOUS, seed=0), companions, args.late_repeats, f"late-{companions}"
            )
            solo, late, batch = figures["late"][(name, companions)]
            print(f"  {name:13s} behind {companions}: solo {solo:.2f} s, late {late:.2f} s (batch {batch:.2f} s)", flush=True)

    # 3. Open loop.
    for workload in ("homogeneous", "mixed"):
        pool = homogeneous if workload == "homogeneous" else mixed_pool
        for level, factor in enumerate(LOADS):
            rate = factor * capacity[workload]
            arrivals = workloads.poisson_arrivals(rate, args.duration, TRACE_SEED + 10 * level + (workload == "mixed"))
            if len(arrivals) > len(pool):
                raise RuntimeError(f"the {workload} pool has {len(pool)} requests, the trace needs {len(arrivals)}")
            order = SYSTEMS[level % 3 :] + SYSTEMS[: level % 3]
            for name in order:
                system = systems[name]
                for attempt in range(1, 3):
                    print(f"open loop: {workload}, {factor}x ({rate:.2f}/s, {len(arrivals)} requests), {name} ...", flush=True)
                    with CpuMeter(args.pids) as cpu:
                        result = await load.open_loop(
                            system.target, pool.requests, arrivals, args.duration + args.grace,
                            f"open-{workload[0]}{level}-{name[0]}{attempt}", window=(args.duration * WARM_IN, args.duration),
                        )
                    system.fill_from_log(result)
                    result.extra.update(rate=rate, offered=len(arrivals), other_cores=cpu.other_cores, attempt=attempt)
                    print(
                        f"  {result.per_second:.2f}/s, {len(result.completed)} completed, {result.not_completed} not "
                        f"{result.statuses() or ''}, p50 {fmt(result.latency(50))} s, p99 {fmt(result.latency(99))} s, "
                        f"queue wait p50 {fmt(result.queue_wait(50))} s, mean batch {fmt(result.mean_batch, 1)}, "
                        f"other CPU load {cpu.other_cores:.2f} cores", flush=True,
                    )
                    await load.drain(system.target)
                    # A run that other processes took a share of the machine from is measured once more.
                    if cpu.other_cores <= NOISY_CORES or attempt == 2 or args.repeats_left == 0:
                        break
                    args.repeats_left -= 1
                    waited = await wait_for_quiet(args.pids, REPEAT_QUIET_WAIT)
                    print(f"  repeating it: other processes used {cpu.other_cores:.2f} cores (waited {waited[0]:.0f} s)", flush=True)
                figures["open"][(workload, factor, name)] = result
    figures["capacity"] = capacity
    return figures


# --- the report -------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(args, figures: dict, mixed_pool: workloads.Workload, wall: float) -> list[str]:
    closed_rows = figures["closed"]
    capacity = figures["capacity"]
    opened = figures["open"]
    late = figures["late"]
    count_tokens = args.count_tokens

    mixed_used = mixed_pool.requests[: max(r.extra["offered"] for (w, _, _), r in opened.items() if w == "mixed")]
    prompt_chunks = collections.Counter(workloads.chunks_of(count_tokens, r.prompt) for r in mixed_used)
    negative_chunks = collections.Counter(workloads.chunks_of(count_tokens, r.negative_prompt) for r in mixed_used)
    from t2i.server.convert import request_to_pb

    configurations = len({group_key(request_to_pb(r)) for r in mixed_used})

    def shares(counter: collections.Counter) -> str:
        total = sum(counter.values())
        return ", ".join(f"{k} chunk{'s' if k > 1 else ''} {100 * v / total:.0f}%" for k, v in sorted(counter.items()))

    lines = [
        f"Command: `make bench` (`python -m benchmarks.serving --duration {args.duration:g} --grace {args.grace:g}`); "
        f"this run took {wall / 60:.1f} min. Demo model (tiny random SDXL), CPU, fp32, {torch_threads()} intra-op "
        "thread(s) in every system (the service's choice: cores - 1).",
        "",
        "Systems, each behind the same gRPC GenerateImage: **service** = `t2i serve --no-billing` (step-level continuous "
        "batching, max batch 8, 20 ms admission window); **dynamic peer** = `benchmarks/dynamic_peer.py`: diffusers' "
        "StableDiffusionXLPipeline, the requests one pipeline call can serve together (same size, steps, cfg, scheduler "
        "configuration) gathered for the same 20 ms window and max batch 8 and run as one batched call, the rest one by one; "
        "**naive peer** = `benchmarks/naive_peer.py`: the same pipeline once per request under a lock. The peers map the "
        "service's sampler/scheduler names onto the closest diffusers schedulers with the same number of UNet evaluations "
        "(an approximation: the images differ, the cost does not; the table is in `benchmarks/diffusers_peer.py`), encode "
        "long prompts chunk by chunk as the service does, and encode PNGs at compress_level 4.",
        "",
        "Workloads: **homogeneous** = 128x128, 28 steps, euler/normal, cfg 7, one prompt; **mixed** (seed "
        f"{WORKLOAD_SEED}) = sizes 96/128/160 (30/40/30%), steps from {', '.join(map(str, workloads.MIXED_STEPS))}, all "
        f"{len(workloads.SAMPLER_NAMES)} samplers and {len(workloads.SCHEDULER_NAMES)} schedulers, cfg 4 to 9 in steps of "
        f"0.5, tag prompts of {shares(prompt_chunks)}, negative prompts of {shares(negative_chunks)} (counted with the "
        f"model's CLIP tokenizer); its {len(mixed_used)} requests fall into {configurations} distinct pipeline "
        "configurations, which is what the dynamic peer can batch by.",
        "",
        "### Closed loop, concurrency 8",
        "",
        "Homogeneous: the four configurations take turns, half the requests at a time; images/s = images over time "
        "(batches of 8 run in lockstep; raw engine: 8 requests at a time in-process). Mixed (the service's capacity "
        "there): completions per second while all 8 clients were busy, after the first 8 completions, so that the "
        "start and the tail, when fewer requests are in flight, do not count.",
        "",
        "| system | workload | images | images/s | p50 latency (s) |",
        "| --- | --- | ---: | ---: | ---: |",
        *(f"| {name} | {w} | {c.images} | {c.per_second:.2f} | {c.p50:.2f} |" for (name, w), c in closed_rows.items()),
        "",
        f"Capacity, the service's closed-loop throughput: homogeneous {capacity['homogeneous']:.2f}/s, mixed "
        f"{capacity['mixed']:.2f}/s; the open-loop arrival rates below are 0.5x, 0.9x and 1.3x of it. Other processes "
        f"used {figures['closed_other_cores']:.2f} cores on average while these closed loops ran (the benchmark waits up "
        f"to {QUIET_WAIT:.0f} s for under {QUIET_CORES} before it starts them).",
        "",
        "### Open loop, Poisson arrivals",
        "",
        f"Arrivals for {args.duration:g} s (fixed seeds; the same trace for the three systems, run one after the other, the "
        f"order rotating by load); at {args.duration + args.grace:g} s whatever is unanswered is cancelled and counted as not "
        f"completed. images/s = completions per second from {args.duration * WARM_IN:g} s to {args.duration:g} s (the "
        "steady part: a system that keeps up shows the arrival rate there, a saturated one its capacity). p50/p99 are "
        "over completed requests "
        "(nearest rank: with under 100 requests p99 is the slowest). Queue wait = arrival to the start of work (service: "
        "admission into the running batch, from its log; peers: the start of the request's pipeline call, reported by the "
        "peer). Mean batch = requests sharing a UNet forward (service: the mean over the request's evaluations) or a "
        "pipeline call (peers). Other CPU = cores' worth of CPU that processes other than the benchmark's own used "
        f"during the run (/proc/stat; the machine is shared; {figures['other_cores']:.2f} on average over the whole run); "
        f"a run during which they used more than {NOISY_CORES} is measured once more, after waiting up to "
        f"{REPEAT_QUIET_WAIT:.0f} s for a quieter machine (at most {REPEATS} times a benchmark), and the second try is "
        "the one shown, marked so.",
        "",
        "| workload | load | offered/s | system | sent | completed | not completed | images/s | p50 (s) | p99 (s) | queue wait p50 / p99 (s) | mean batch | other CPU (cores) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in ("homogeneous", "mixed"):
        for factor in LOADS:
            for name in SYSTEMS:
                r = opened[(workload, factor, name)]
                missing = r.statuses()
                not_done = str(r.not_completed) + (
                    " (" + ", ".join(f"{v} {k}" for k, v in sorted(missing.items())) + ")" if missing else ""
                )
                lines.append(
                    f"| {workload} | {factor}x | {r.extra['rate']:.2f} | {name} | {r.extra['offered']} | {len(r.completed)} | "
                    f"{not_done} | {r.per_second:.2f} | {fmt(r.latency(50))} | {fmt(r.latency(99))} | "
                    f"{fmt(r.queue_wait(50))} / {fmt(r.queue_wait(99))} | {fmt(r.mean_batch, 1)} | {r.extra['other_cores']:.2f}"
                    f"{' (2nd try)' if r.extra.get('attempt', 1) > 1 else ''} |"
                )

    lines += [
        "",
        "### Late arrival",
        "",
        "A homogeneous request sent halfway through the latency of a batch of N requests that arrived together, against "
        f"the same request alone; medians of {args.late_repeats}.",
        "",
        "| system | N | solo latency (s) | batch of N latency (s) | late request latency (s) | late / solo |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, companions), (solo, late_latency, batch) in late.items():
        lines.append(f"| {name} | {companions} | {solo:.2f} | {batch:.2f} | {late_latency:.2f} | {late_latency / solo:.2f} |")

    # Targets.
    def open_ratio(workload: str, factor: float) -> float | None:
        return ratio(opened[(workload, factor, "service")].per_second, opened[(workload, factor, "dynamic peer")].per_second)

    def both_kept_up(workload: str, factor: float) -> bool:
        return all(opened[(workload, factor, name)].not_completed == 0 for name in ("service", "dynamic peer"))

    mixed_near = (opened[("mixed", 0.9, "service")], opened[("mixed", 0.9, "dynamic peer")])
    mixed_tp = ratio(mixed_near[0].per_second, mixed_near[1].per_second)
    mixed_p99 = ratio(mixed_near[0].latency(99), mixed_near[1].latency(99))
    equal_tp = both_kept_up("mixed", 0.9) or (mixed_tp is not None and abs(mixed_tp - 1) <= 0.05)
    mixed_met = (mixed_tp is not None and mixed_tp >= 1.5) or (equal_tp and mixed_p99 is not None and mixed_p99 <= 0.6)
    # Throughput is a system's capacity only where it could not take everything; where both systems
    # completed every request, both delivered the offered load and their window counts differ by chance.
    homogeneous_ratios = {f: None if both_kept_up("homogeneous", f) else open_ratio("homogeneous", f) for f in LOADS}
    closed_h = ratio(closed_rows[("service", "homogeneous")].per_second, closed_rows[("dynamic peer", "homogeneous")].per_second)
    homogeneous_met = all(v is None or v >= 0.95 for v in homogeneous_ratios.values()) and closed_h is not None and closed_h >= 0.95
    homogeneous_text = ", ".join(
        f"{f}x: " + ("both completed every request" if v is None else fmt(v)) for f, v in homogeneous_ratios.items()
    )
    raw_ratio = ratio(closed_rows[("service", "homogeneous")].per_second, closed_rows[("raw engine, batch 8", "homogeneous")].per_second)
    naive_ratio = ratio(closed_rows[("service", "homogeneous")].per_second, closed_rows[("naive peer", "homogeneous")].per_second)
    late_service = late[("service", 1)][1] / late[("service", 1)][0]

    def yes(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines += [
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| mixed, 0.9x: service images/s >= 1.5x the dynamic peer's (or p99 <= 0.6x at equal throughput) | "
        f"{fmt(mixed_tp)}x images/s, p99 {fmt(mixed_p99)}x | {yes(mixed_met)} |",
        "| homogeneous: service images/s >= 0.95x the dynamic peer's (closed loop, and at each load where either left "
        f"requests unanswered) | closed loop: {fmt(closed_h)}; {homogeneous_text} | {yes(homogeneous_met)} |",
        f"| service c8 / raw engine b8 (homogeneous, closed loop) >= 0.9 | {fmt(raw_ratio)} | {yes(raw_ratio is not None and raw_ratio >= 0.9)} |",
        f"| service c8 / naive peer c8 (homogeneous, closed loop) >= 1.5 | {fmt(naive_ratio)} | {yes(naive_ratio is not None and naive_ratio >= 1.5)} |",
        f"| late arrival behind one request / its solo latency <= 1.25 (service) | {late_service:.2f} | {yes(late_service <= 1.25)} |",
        "",
        "### Reading",
        "",
        *reading(figures),
    ]
    return lines


def reading(figures: dict) -> list[str]:
    """What this run's figures say, where each system wins; every number is this run's."""
    opened, late, closed_rows = figures["open"], figures["late"], figures["closed"]

    def r(w, f, s) -> load.RunResult:
        return opened[(w, f, s)]

    def versus(a: float | None, b: float | None, higher_wins: bool) -> str:
        if a is None or b is None:
            return "cannot be compared"
        if abs(a - b) <= 0.03 * max(abs(a), abs(b)):
            return "level with"
        return "ahead of" if (a > b) == higher_wins else "behind"

    out = []
    # Mixed.
    ms, md, mn = (r("mixed", 0.9, s) for s in SYSTEMS)
    alike = "requests whose settings coincide are rare in this mix, so it serves much like the naive peer" if (
        md.mean_batch or 1) < 1.5 else "it found companions for part of its requests"
    out.append(
        f"- **Mixed, near capacity (0.9x)**: the dynamic peer's calls held {fmt(md.mean_batch)} requests on average: "
        f"{alike} ({md.per_second:.2f} against {mn.per_second:.2f} images/s). The service completed {ms.per_second:.2f} images/s, "
        f"{fmt(ratio(ms.per_second, md.per_second))}x the dynamic peer, with p99 {fmt(ms.latency(99))} s against "
        f"{fmt(md.latency(99))} s and {ms.not_completed} against {md.not_completed} requests not completed. Its "
        f"forwards held {fmt(ms.mean_batch, 1)} requests on average (homogeneous at 0.9x: "
        f"{fmt(r('homogeneous', 0.9, 'service').mean_batch, 1)}): requests of different sizes cannot share a forward, and "
        "at most 8 run at once across all sizes, so its batching gain is smaller here than on the homogeneous workload."
    )
    os_, od, on = (r("mixed", 1.3, s) for s in SYSTEMS)
    out.append(
        f"- **Mixed, over capacity (1.3x)**: {os_.per_second:.2f} images/s for the service, {od.per_second:.2f} for the "
        f"dynamic peer, {on.per_second:.2f} for the naive peer; not completed by the cut-off: {os_.not_completed}, "
        f"{od.not_completed}, {on.not_completed} of {os_.extra['offered']}."
    )
    ls, ld, ln = (r("mixed", 0.5, s) for s in SYSTEMS)
    out.append(
        f"- **Mixed, light load (0.5x)**: p50 {fmt(ls.latency(50))} / {fmt(ld.latency(50))} / {fmt(ln.latency(50))} s and "
        f"p99 {fmt(ls.latency(99))} / {fmt(ld.latency(99))} / {fmt(ln.latency(99))} s (service / dynamic / naive): the "
        f"service is {versus(ls.latency(50), ld.latency(50), False)} the dynamic peer on p50 and "
        f"{versus(ls.latency(99), ld.latency(99), False)} it on p99. A request on the service shares its forwards and "
        "runs slower than alone; one on a peer runs alone but first waits for the call ahead of it (queue wait p50 "
        f"{fmt(ls.queue_wait(50))} s on the service, {fmt(ld.queue_wait(50))} s on the dynamic peer)."
    )
    # Homogeneous.
    cs = closed_rows[("service", "homogeneous")].per_second
    cd = closed_rows[("dynamic peer", "homogeneous")].per_second
    hs, hd = r("homogeneous", 1.3, "service"), r("homogeneous", 1.3, "dynamic peer")
    out.append(
        "- **Homogeneous**: every request has the same settings, so the dynamic peer batches fully "
        f"({fmt(hd.mean_batch, 1)} requests per call over capacity); this is the peer's best case. At its capacity the "
        f"service is {versus(cs, cd, True)} it closed loop ({cs:.2f} against {cd:.2f} images/s) and "
        f"{versus(hs.per_second, hd.per_second, True)} it at 1.3x ({hs.per_second:.2f} against {hd.per_second:.2f})."
    )
    stages = hs.extra.get("stages")
    if stages:
        out.append(
            f"  The service's own log at 1.3x, per request on average: {stages['denoise_s']:.2f} s in UNet forwards, "
            f"{stages['decode_s']:.3f} s VAE decode (one image at a time, on its decode thread), {stages['png_s']:.3f} s PNG "
            "encode; the peer decodes its whole batch in one VAE call inside the pipeline call."
        )
    ns, nd = r("homogeneous", 0.9, "service"), r("homogeneous", 0.9, "dynamic peer")
    out.append(
        f"  At 0.9x: {ns.per_second:.2f} against {nd.per_second:.2f} images/s ({ns.not_completed} and {nd.not_completed} "
        f"of {ns.extra['offered']} not completed; other CPU {ns.extra['other_cores']:.2f} and "
        f"{nd.extra['other_cores']:.2f} cores during the two runs); p50 {fmt(ns.latency(50))} against "
        f"{fmt(nd.latency(50))} s, p99 {fmt(ns.latency(99))} against {fmt(nd.latency(99))} s, queue wait p50 "
        f"{fmt(ns.queue_wait(50))} against {fmt(nd.queue_wait(50))} s: a request reaching the peer while a call runs "
        "waits for that whole call, one reaching the service joins at its next step."
    )
    for companions in (1, 4):
        s_solo, s_late, _ = late[("service", companions)]
        d_solo, d_late, _ = late[("dynamic peer", companions)]
        behind = "one request" if companions == 1 else f"a batch of {companions}"
        out.append(
            f"- **Late arrival behind {behind}**: {s_late / s_solo:.2f}x its solo latency on the service, "
            f"{d_late / d_solo:.2f}x on the dynamic peer."
        )
    out.append(
        "- Noise: a 2-core machine that other work shares; single rows move by tens of percent from run to run, the "
        "systems ran side by side in one run, so compare within a row group. p99 over a few dozen requests is close to "
        "the maximum."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per open-loop run")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds after the arrivals before the cut-off")
    parser.add_argument("--closed-requests", type=int, default=32, help="requests per homogeneous closed-loop measurement")
    parser.add_argument("--closed-mixed-requests", type=int, default=40, help="requests in the mixed closed loop")
    parser.add_argument("--late-repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--report", type=Path, help="render a run's saved raw results again instead of measuring")
    args = parser.parse_args()
    started = time.perf_counter()

    from t2i.models.demo import ensure_demo_model

    data_dir = Path(tempfile.mkdtemp(prefix="t2i-bench-"))
    model_dir = ensure_demo_model(data_dir)
    args.count_tokens = workloads.token_counter(model_dir)
    if args.report:
        figures, wall = load_saved(args.report, args)
        render(figures, args, workloads.mixed(int(args.duration * 12) + 200, WORKLOAD_SEED, args.count_tokens), wall)
        return
    # Enough mixed requests for the longest trace (1.3x capacity for the duration, with room).
    mixed_pool = workloads.mixed(int(args.duration * 12) + 200, WORKLOAD_SEED, args.count_tokens)

    print("starting the service and the peers ...", flush=True)
    server = ServerProcess(data_dir, "--no-billing")
    peers = {
        "dynamic peer": PeerProcess("benchmarks.dynamic_peer", model_dir, data_dir),
        "naive peer": PeerProcess("benchmarks.naive_peer", model_dir, data_dir),
    }
    try:
        server.wait_serving()
        for peer in peers.values():
            peer.wait_ready()
        raw = RawEngine(data_dir)
        args.pids = [os.getpid(), server.process.pid, *(peer.process.pid for peer in peers.values())]
        args.repeats_left = REPEATS

        async def run() -> dict:
            systems = {"service": System("service", load.Target(server.target), server)}
            systems.update({name: System(name, load.Target(peer.target)) for name, peer in peers.items()})
            try:
                with CpuMeter(args.pids) as cpu:
                    figures = await measure(args, systems, raw, mixed_pool)
                figures["other_cores"] = cpu.other_cores
                return figures
            finally:
                for system in systems.values():
                    await system.target.close()

        figures = asyncio.run(run())
    finally:
        server.kill()
        for peer in peers.values():
            peer.kill()
    saved = data_dir / "serving-results.json"
    save(figures, args, time.perf_counter() - started, saved)
    print(f"raw results: {saved} (python -m benchmarks.serving --report {saved} renders them again)")
    render(figures, args, mixed_pool, time.perf_counter() - started)


def render(figures: dict, args, mixed_pool: workloads.Workload, wall: float) -> None:
    lines = report(args, figures, mixed_pool, wall)
    print("\n".join(lines))
    if not args.no_write:
        write_section("serving", "## Serving: the service, a dynamic-batching peer and a naive peer\n\n" + "\n".join(lines))


# --- raw results, saved so that a run's report can be rendered again -------------------------------

SAVED_ARGS = ("duration", "grace", "closed_requests", "closed_mixed_requests", "late_repeats")


def save(figures: dict, args, wall: float, path: Path) -> None:
    data = {
        "args": {name: getattr(args, name) for name in SAVED_ARGS}, "wall": wall,
        "capacity": figures["capacity"], "other_cores": figures["other_cores"], "closed_other_cores": figures["closed_other_cores"],
        "closed": [[*key, dataclasses.asdict(value)] for key, value in figures["closed"].items()],
        "late": [[*key, list(value)] for key, value in figures["late"].items()],
        "open": [[*key, r.saved()] for key, r in figures["open"].items()],
    }
    path.write_text(json.dumps(data))


def load_saved(path: Path, args) -> tuple[dict, float]:
    data = json.loads(path.read_text())
    for name, value in data["args"].items():
        setattr(args, name, value)
    opened = {(workload, factor, name): load.RunResult.restored(r) for workload, factor, name, r in data["open"]}
    figures = {
        "capacity": data["capacity"], "other_cores": data["other_cores"], "open": opened,
        "closed_other_cores": data["closed_other_cores"],
        "closed": {(name, workload): ClosedLoop(**value) for name, workload, value in data["closed"]},
        "late": {(name, companions): tuple(value) for name, companions, value in data["late"]},
    }
    return figures, data["wall"]


if __name__ == "__main__":
    main()
