"""Image requests in the mix: the service against a dynamic-batching peer on diffusers' image
pipelines, on a workload where a third of the requests are image to image and a sixth hires fix.

    make bench-image      # part of `make bench`; or: .venv/bin/python -m benchmarks.image_serving [--duration S]

The systems, both on the demo model (tiny random SDXL, fp32, CPU), both behind GenerateImage:
- service: `t2i serve --no-billing`, as benchmarks/serving.py runs it;
- image peer (benchmarks/image_peer.py): diffusers' StableDiffusionXLPipeline,
  StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on shared components,
  the passes one pipeline call can serve together batched into one call (same 20 ms window and
  max batch 8 as the service and the serving benchmark's dynamic peer), hires fix as diffusers
  users do it: a text-to-image call returning latents, the latents upscaled, an image-to-image
  call on them.

The workload (benchmarks/workloads.image_mixed, seed 25): the serving benchmark's mixed settings
(sizes 96/128/160, steps 20 to 40, all samplers and schedulers, cfg 4 to 9, tag prompts of 1
to 3 chunks), of every 6 requests 3 text-to-image, 2 image to image (denoise 0.30 to 0.80 in
steps of 0.05, a generated picture at the request's size, a quarter of them inpainting with a
generated mask) and 1 hires fix (1.5x, nearest-exact, the request's steps, denoise 0.5).

What runs, in this order, as benchmarks/serving.py measures its mixed workload:
1. warm-up: each system serves one request of every kind and size;
2. closed loop at concurrency 8, the service then the peer, on the same requests: the
   service's throughput there is its capacity on this workload, which sets the open-loop rate;
3. open loop near capacity (0.9x the service's capacity): the same Poisson trace (fixed seed) for
   the peer, then the service. Arrivals come for `--duration` seconds; at duration + grace
   whatever is unanswered is cancelled (its deadline) and counts as not completed. Throughput is
   completions per second in the steady window (from a third of the arrival period to its end).
   A run during which other processes used more than 0.3 cores is measured once more.
Targets (the issue's): near capacity the service's images/s >= 1.5x the peer's and its p99
<= 0.6x the peer's. Writes docs/benchmarks.md (section "serving-image").

`--smoke` runs the same plumbing on a tiny configuration (64x64, 2 to 4 steps, a few seconds of
arrivals) in about a minute; tests/benchmarks/test_image_serving.py runs it with --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from testbed.server import ServerProcess

from . import load, workloads
from .diffusers_peer import torch_threads
from .image_peer import pass_key, scheduler_config_items
from .report import fmt, write_section
from .serving import NOISY_CORES, CpuMeter, PeerProcess, System, closed, ratio, wait_for_quiet

SECTION = "serving-image"
SYSTEMS = ("service", "image peer")
KINDS = ("text-to-image", "img2img", "inpaint", "hires fix")
WORKLOAD_SEED = 25
TRACE_SEED = 2500
CONCURRENCY = 8
LOAD = 0.9
WARM_IN = 1 / 3
QUIET_WAIT = 30.0  # seconds, at most, before the capacity measurement (serving.py waits longer; it runs first)
REPEAT_QUIET_WAIT = 20.0
SMOKE = dict(sizes=((64, 1.0),), steps=(2, 3, 4))


def kinds_of(requests) -> list[str]:
    return [workloads.image_kind(r) for r in requests]


def calls_needed(requests, config_items: tuple) -> tuple[int, int]:
    """(pipeline passes, distinct call configurations among them): what the peer can batch by."""
    keys = []
    for request in requests:
        keys.append(pass_key(request, 0, config_items))
        if request.hires_fix is not None:
            keys.append(pass_key(request, 1, config_items))
    return len(keys), len(set(keys))


def warm_set(args) -> list:
    """One request of every kind and size (from a seed of its own)."""
    seen: dict[tuple[str, int], object] = {}
    for request in workloads.image_mixed(200, WORKLOAD_SEED + 1, args.count_tokens, **args.shape).requests:
        seen.setdefault((workloads.image_kind(request), request.width), request)
    return list(seen.values())


async def measure(args, systems: dict[str, System], pool: workloads.Workload) -> dict:
    figures: dict = {"closed": {}, "open": {}}

    print("warm-up ...", flush=True)
    warm = warm_set(args)
    for system in systems.values():
        await load.closed_loop(system.target, warm, CONCURRENCY, "warm-i")

    if args.quiet_wait > 0:
        waited = await wait_for_quiet(args.pids, args.quiet_wait)
        print(f"  other CPU load {waited[1]:.2f} cores after waiting {waited[0]:.0f} s for a quieter machine", flush=True)

    # 1. Closed loop, concurrency 8, the same requests for both systems.
    print("closed loop, concurrency 8 ...", flush=True)
    requests = list(workloads.image_mixed(args.closed_requests, WORKLOAD_SEED + 2, args.count_tokens, **args.shape).requests)
    with CpuMeter(args.pids) as cpu:
        for name in SYSTEMS:
            figures["closed"][name] = closed(await load.closed_loop(systems[name].target, requests, CONCURRENCY, f"closed-{name[0]}"))
            c = figures["closed"][name]
            print(f"  {name:10s} {c.per_second:5.2f} images/s  p50 {c.p50:5.2f} s", flush=True)
    figures["closed_other_cores"] = cpu.other_cores
    capacity = figures["closed"]["service"].per_second
    figures["capacity"] = capacity

    # 2. Open loop near capacity: the peer first (as serving.py orders its 0.9x runs), then the service.
    rate = LOAD * capacity
    arrivals = workloads.poisson_arrivals(rate, args.duration, TRACE_SEED)
    if len(arrivals) > len(pool):
        raise RuntimeError(f"the pool has {len(pool)} requests, the trace needs {len(arrivals)}")
    for name in reversed(SYSTEMS):
        system = systems[name]
        for attempt in range(1, 3):
            print(f"open loop: {LOAD}x ({rate:.2f}/s, {len(arrivals)} requests), {name} ...", flush=True)
            with CpuMeter(args.pids) as cpu:
                result = await load.open_loop(
                    system.target, pool.requests, arrivals, args.duration + args.grace, f"open-{name[0]}{attempt}",
                    window=(args.duration * WARM_IN, args.duration),
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
            if cpu.other_cores <= NOISY_CORES or attempt == 2 or args.smoke:
                break
            waited = await wait_for_quiet(args.pids, REPEAT_QUIET_WAIT)
            print(f"  repeating it: other processes used {cpu.other_cores:.2f} cores (waited {waited[0]:.0f} s)", flush=True)
        figures["open"][name] = result
    return figures


# --- the report -----------------------------------------------------------------------------------

def per_kind(result: load.RunResult, kinds: list[str]) -> dict[str, tuple[int, int, float | None, float | None]]:
    """kind -> (sent, completed, p50, p99) over the run's requests of that kind."""
    grouped: dict[str, list[load.Outcome]] = collections.defaultdict(list)
    for outcome, kind in zip(result.outcomes, kinds):
        grouped[kind].append(outcome)
    out = {}
    for kind in KINDS:
        done = [o.latency for o in grouped.get(kind, []) if o.completed]
        out[kind] = (len(grouped.get(kind, [])), len(done), load.percentile(done, 50) if done else None,
                     load.percentile(done, 99) if done else None)
    return out


def report(args, figures: dict, pool: workloads.Workload, wall: float) -> list[str]:
    opened, closed_rows = figures["open"], figures["closed"]
    offered = opened["service"].extra["offered"]
    sent = pool.requests[:offered]
    kinds = kinds_of(sent)
    counts = collections.Counter(kinds)
    passes, configurations = calls_needed(sent, args.config_items)
    s, p = opened["service"], opened["image peer"]
    tp, p50, p99 = ratio(s.per_second, p.per_second), ratio(s.latency(50), p.latency(50)), ratio(s.latency(99), p.latency(99))
    closed_tp = ratio(closed_rows["service"].per_second, closed_rows["image peer"].per_second)
    sizes = "/".join(str(size) for size, _ in args.shape["sizes"])
    steps = ", ".join(map(str, args.shape["steps"]))
    command = (
        "`python -m benchmarks.image_serving --smoke` (a smoke run of the plumbing: tiny sizes and steps, figures not to keep)"
        if args.smoke else f"`make bench-image` (`python -m benchmarks.image_serving --duration {args.duration:g} --grace "
        f"{args.grace:g}`), also the last part of `make bench`"
    )

    def yes(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [
        f"Command: {command}; this run took {wall / 60:.1f} min. Demo model (tiny random SDXL), CPU, fp32, "
        f"{torch_threads()} intra-op thread(s) in both systems (the service's choice: cores - 1).",
        "",
        "Systems, each behind the same gRPC GenerateImage: **service** = `t2i serve --no-billing` (step-level continuous "
        "batching, max batch 8, 20 ms admission window; an image-to-image request shares forwards with any request of its "
        "latent size, a hires fix's second pass with any of the upscaled size); **image peer** = `benchmarks/image_peer.py`: "
        "diffusers' StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on one "
        "set of components, with the serving benchmark's dynamic batching (20 ms window, max batch 8) over pipeline calls: "
        "one call serves passes of the same pipeline, size, cfg, scheduler configuration and step count, and for the image "
        "pipelines the same strength (diffusers takes one per call) and input kind (pictures, or the latents of a hires "
        "fix's second pass). Hires fix as diffusers users do it: a text-to-image call with output_type=\"latent\" (it "
        "shares its call with plain text-to-image requests of the same key, whose latents the peer then decodes in one "
        "VAE call), the latent upscaled 1.5x with torch's interpolate (nearest-exact), an image-to-image call on it with "
        "strength = the hires denoise; the second pass queues at its request's arrival time. A partial pass runs with the "
        "smallest num_inference_steps that makes as many UNet evaluations as the service's pass (ComfyUI runs `steps` "
        "steps of an int(steps / denoise)-step schedule, diffusers int(N * strength) of N), so the two systems do the "
        "same work per request.",
        "",
        f"Workload (`benchmarks/workloads.image_mixed`, seed {WORKLOAD_SEED}): the serving benchmark's mixed settings (sizes "
        f"{sizes}, steps from {steps}, all {len(workloads.SAMPLER_NAMES)} samplers and {len(workloads.SCHEDULER_NAMES)} "
        "schedulers, cfg 4 to 9, tag prompts of 1 to 3 chunks); of every 6 requests, shuffled, 3 text-to-image, 2 image to "
        "image from a generated picture at the request's size (a smooth random colour field, PNG) with denoise uniform over "
        f"0.30, 0.35, .., 0.80, a quarter of them inpainting with a generated elliptical mask, and 1 hires fix (1.5x, "
        "nearest-exact, the request's steps, denoise 0.5). The "
        f"{offered} requests of the open-loop trace: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in KINDS)
        + f"; they make {passes} pipeline passes in {configurations} distinct call configurations, which is what the "
        "peer can batch by.",
        "",
        "### Closed loop, concurrency 8",
        "",
        f"{closed_rows['service'].images} requests, the same for both systems; completions per second while all 8 clients "
        "were busy (after the first 8 completions, up to the last send).",
        "",
        "| system | images | images/s | p50 latency (s) |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {c.images} | {c.per_second:.2f} | {c.p50:.2f} |" for name, c in closed_rows.items()),
        "",
        f"Service / peer: **{fmt(closed_tp)}x** images/s. The service's closed-loop throughput ({figures['capacity']:.2f}/s) "
        f"is its capacity on this workload; the open-loop rate below is {LOAD}x of it. Other processes used "
        f"{figures['closed_other_cores']:.2f} cores on average during these runs.",
        "",
        f"### Open loop near capacity ({LOAD}x), Poisson arrivals",
        "",
        f"Arrivals for {args.duration:g} s (fixed seed; the same trace for both systems, the peer first); at "
        f"{args.duration + args.grace:g} s whatever is unanswered is cancelled and counted as not completed. images/s = "
        f"completions per second from {args.duration * WARM_IN:g} s to {args.duration:g} s; p50/p99 over completed requests "
        "(nearest rank: with under 100 requests p99 is the slowest); queue wait = arrival to the start of work (service: "
        "admission, from its log; peer: its first pipeline call); mean batch = requests sharing a UNet forward (service, "
        "mean over the request's evaluations) or passes sharing a pipeline call (peer, mean over the request's calls); "
        "other CPU = cores' worth used by other processes during the run (a run above "
        f"{NOISY_CORES} is measured once more and the second try shown, marked so).",
        "",
        "| system | offered/s | sent | completed | not completed | images/s | p50 (s) | p99 (s) | queue wait p50 / p99 (s) | mean batch | other CPU (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SYSTEMS:
        r = opened[name]
        missing = r.statuses()
        not_done = str(r.not_completed) + (" (" + ", ".join(f"{v} {k}" for k, v in sorted(missing.items())) + ")" if missing else "")
        lines.append(
            f"| {name} | {r.extra['rate']:.2f} | {r.extra['offered']} | {len(r.completed)} | {not_done} | {r.per_second:.2f} | "
            f"{fmt(r.latency(50))} | {fmt(r.latency(99))} | {fmt(r.queue_wait(50))} / {fmt(r.queue_wait(99))} | "
            f"{fmt(r.mean_batch, 1)} | {r.extra['other_cores']:.2f}{' (2nd try)' if r.extra.get('attempt', 1) > 1 else ''} |"
        )
    lines += [
        "",
        "By kind (completed of sent, p50 / p99 latency in s):",
        "",
        "| system | " + " | ".join(KINDS) + " |",
        "| --- | " + " | ".join("---" for _ in KINDS) + " |",
    ]
    kind_rows = {name: per_kind(opened[name], kinds) for name in SYSTEMS}
    for name in SYSTEMS:
        cells = [f"{done}/{total}: {fmt(a)} / {fmt(b)}" if total else "-" for total, done, a, b in kind_rows[name].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tp_met, p99_met = tp is not None and tp >= 1.5, p99 is not None and p99 <= 0.6
    lines += [
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| near capacity ({LOAD}x): service images/s >= 1.5x the peer's | {fmt(tp)}x (closed loop: {fmt(closed_tp)}x) | {yes(tp_met)} |",
        f"| near capacity ({LOAD}x): service p99 <= 0.6x the peer's | {fmt(p99)}x (p50: {fmt(p50)}x) | {yes(p99_met)} |",
        "",
        "### Reading",
        "",
        *reading(figures, kind_rows, configurations, passes),
    ]
    return lines


def reading(figures: dict, kind_rows: dict, configurations: int, passes: int) -> list[str]:
    """What this run's figures say; every number is this run's."""
    s, p = figures["open"]["service"], figures["open"]["image peer"]
    cs, cp = figures["closed"]["service"], figures["closed"]["image peer"]
    tp, p99 = ratio(s.per_second, p.per_second), ratio(s.latency(99), p.latency(99))
    out = []
    alone = configurations == passes
    out.append(
        f"- **What the peer can batch**: {configurations} distinct call configurations among {passes} passes"
        + (": no two passes of this mix can share a pipeline call (a strength, a step count, a size or a scheduler "
           "always differs), so the peer runs one pass per call, as a naive server would; "
           if alone else ": a few passes could share a call; ")
        + f"its calls held {fmt(p.mean_batch)} passes on average near capacity. The service batches by latent size "
        f"alone: its forwards held {fmt(s.mean_batch, 1)} requests on average, over six latent sizes (three first-pass "
        "sizes, three upscaled ones)."
    )
    out.append(
        f"- **Capacity**: closed loop the service served {cs.per_second:.2f} images/s against the peer's "
        f"{cp.per_second:.2f} ({fmt(ratio(cs.per_second, cp.per_second))}x). Near capacity, open loop, "
        f"{s.per_second:.2f} against {p.per_second:.2f} images/s ({fmt(tp)}x), with {s.not_completed} against "
        f"{p.not_completed} of {s.extra['offered']} requests not completed by the cut-off. An open-loop ratio at "
        f"{LOAD}x cannot exceed about {LOAD}x the closed-loop one: a system that keeps up shows the arrival rate, not its capacity."
    )
    out.append(
        f"- **Latency**: p50 {fmt(s.latency(50))} against {fmt(p.latency(50))} s, p99 {fmt(s.latency(99))} against "
        f"{fmt(p.latency(99))} s ({fmt(p99)}x); queue wait p50 {fmt(s.queue_wait(50))} against {fmt(p.queue_wait(50))} s. "
        "On the peer a request first waits for every call ahead of it; on the service it joins the running batch at the "
        "next step and then shares forwards, so it runs slower than alone but never queues behind a whole request."
    )
    hs, hp = kind_rows["service"]["hires fix"], kind_rows["image peer"]["hires fix"]
    ts, tp_ = kind_rows["service"]["text-to-image"], kind_rows["image peer"]["text-to-image"]
    out.append(
        f"- **Hires fix**: p50 {fmt(hs[2])} s on the service, {fmt(hp[2])} s on the peer (text-to-image: {fmt(ts[2])} "
        f"and {fmt(tp_[2])} s). On the peer its two calls run back to back only when nothing older waits between them (its "
        "second pass keeps its request's place in the queue); on the service both passes share forwards with whatever "
        "runs at their sizes."
    )
    stages = s.extra.get("stages")
    if stages:
        out.append(
            f"  The service's own log near capacity, per request on average: {stages['denoise_s']:.2f} s in UNet forwards, "
            f"{stages['decode_s']:.3f} s VAE decode, {stages['png_s']:.3f} s PNG encode."
        )
    out.append(
        "- Noise: a 2-core machine that other work shares; single figures move by tens of percent from run to run, the "
        "two systems ran side by side in one run. p99 over a few dozen requests is close to the maximum."
    )
    return out


# --- the command ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals in each open-loop run")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds after the arrivals before the cut-off")
    parser.add_argument("--closed-requests", type=int, default=32, help="requests in each closed-loop measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and steps, a few seconds of arrivals (the plumbing only)")
    parser.add_argument("--results", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.grace, args.closed_requests = min(args.duration, 3.0), min(args.grace, 6.0), min(args.closed_requests, 8)
    args.shape = SMOKE if args.smoke else dict(sizes=workloads.MIXED_SIZES, steps=workloads.MIXED_STEPS)
    args.quiet_wait = 0.0 if args.smoke else QUIET_WAIT
    started = time.perf_counter()

    from t2i.models.demo import ensure_demo_model

    data_dir = Path(tempfile.mkdtemp(prefix="t2i-bench-image-"))
    model_dir = ensure_demo_model(data_dir)
    args.count_tokens = workloads.token_counter(model_dir)
    args.config_items = scheduler_config_items(model_dir)
    # Enough requests for the trace (0.9x capacity for the duration, with room).
    pool = workloads.image_mixed(int(args.duration * 8) + 120, WORKLOAD_SEED, args.count_tokens, **args.shape)

    print("starting the service and the image peer ...", flush=True)
    server = ServerProcess(data_dir, "--no-billing")
    peer = PeerProcess("benchmarks.image_peer", model_dir, data_dir)
    try:
        server.wait_serving()
        peer.wait_ready()
        args.pids = [os.getpid(), server.process.pid, peer.process.pid]

        async def run() -> dict:
            systems = {"service": System("service", load.Target(server.target), server),
                       "image peer": System("image peer", load.Target(peer.target))}
            try:
                with CpuMeter(args.pids) as cpu:
                    figures = await measure(args, systems, pool)
                figures["other_cores"] = cpu.other_cores
                return figures
            finally:
                for system in systems.values():
                    await system.target.close()

        figures = asyncio.run(run())
    finally:
        server.kill()
        peer.kill()
    lines = report(args, figures, pool, time.perf_counter() - started)
    print("\n".join(lines))
    if args.results:
        args.results.write_text(json.dumps(results(figures, pool), indent=1))
    if not args.no_write and not args.smoke:
        write_section(SECTION, "## Image requests in the mix: the service and a dynamic-batching peer on diffusers' image "
                               "pipelines\n\n" + "\n".join(lines))


def results(figures: dict, pool: workloads.Workload) -> dict:
    """The figures as plain data (what the smoke test checks)."""
    opened = figures["open"]
    kinds = kinds_of(pool.requests[: opened["service"].extra["offered"]])
    return {
        "capacity": figures["capacity"],
        "closed": {name: dataclasses.asdict(c) for name, c in figures["closed"].items()},
        "open": {
            name: {
                "offered": r.extra["offered"], "rate": r.extra["rate"], "completed": len(r.completed),
                "not_completed": r.not_completed, "per_second": r.per_second, "p50": r.latency(50), "p99": r.latency(99),
                "queue_wait_p50": r.queue_wait(50), "mean_batch": r.mean_batch, "by_kind": per_kind(r, kinds),
            }
            for name, r in opened.items()
        },
        "ratios": {
            "throughput": ratio(opened["service"].per_second, opened["image peer"].per_second),
            "p50": ratio(opened["service"].latency(50), opened["image peer"].latency(50)),
            "p99": ratio(opened["service"].latency(99), opened["image peer"].latency(99)),
            "closed_throughput": ratio(figures["closed"]["service"].per_second, figures["closed"]["image peer"].per_second),
        },
    }


if __name__ == "__main__":
    main()
