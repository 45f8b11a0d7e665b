"""Jobs against synchronous calls at the same offered load, and how long a job waits to start.

    .venv/bin/python -m benchmarks.jobs [--load 0.8 --seconds 40 --rounds 2]

1. One replica (`t2i serve`, SQLite billing, demo model, 64x64 and 8 steps per request). Its
   capacity C (images/s) is measured first with closed-loop synchronous calls at concurrency 8.
   Then, round after round, the same Poisson arrival trace at `load` x C is offered as
   GenerateImage calls and as SubmitJob calls (jobs collected afterwards): throughput = images
   done / (last completion - first arrival), the jobs' completion being their `finishedAt`.
   The table shows the median round and the ratio jobs / sync.
2. Submit-to-start latency (a job's `startedAt` - `createdAt`, both stamped by the service) on
   that one replica, and on two replicas sharing PostgreSQL, at the same offered load per
   replica (2 x load x C in all), with how many jobs each replica ran.

Both replicas and the client share this machine's cores, so two replicas do not double its
capacity here; the latency of starting a job is what the second part measures.
Writes docs/benchmarks.md (section "jobs").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from testbed.backends import postgres_database
from testbed.server import ServerProcess

from .report import write_section

CONCURRENCY = 8
READING = (
    "Reading: a replica takes jobs while fewer requests wait in its engine than a batch holds "
    "(`engine.wants_work`), so jobs join batches as synchronous calls do and the throughput is the "
    "same within a few percent; what a job adds is database work (claim, events, the charge with its "
    "images), off the engine's thread. The first version of the runner took a job only when nothing "
    "waited in the engine: jobs then reached the engine one per poll and ran at 0.46x (on a 10 s trace). Submit-to-start "
    "is the time a job waits in the shared queue plus the claim; its tail follows the bursts of the "
    "Poisson trace at 0.8x capacity. With two replicas the queue hands the jobs out about evenly; "
    "both replicas share this machine's two cores, so they add no capacity here."
)
FINISHED = ("succeeded", "failed", "cancelled", "expired")


def request(seed: int) -> pb.GenerateImageRequest:
    return pb.GenerateImageRequest(model_id=1, prompt="1girl, masterpiece", width=64, height=64, steps=8, cfg_scale=5,
                                   seed=seed, sampler_name="euler", scheduler="normal")


def new_key(database_url: str) -> str:
    from t2i.billing.database import open_database
    from t2i.billing.ledger import Ledger

    db = open_database(database_url)
    _, key = Ledger(db).create_key(f"bench-{uuid.uuid4().hex[:8]}", 10**12, "unlimited")
    db.dispose()
    return key


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Exactly round(rate x seconds) Poisson arrival times within `seconds`."""
    rng = random.Random(seed)
    count = max(1, round(rate * seconds))
    return sorted(rng.uniform(0, seconds) for _ in range(count))


def seconds_of(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def capacity(target: str, key: str, requests: int) -> float:
    """Images per second of closed-loop synchronous calls at CONCURRENCY."""
    metadata = ((wire.API_KEY_HEADER, key),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        seeds = iter(range(requests))

        async def client() -> None:
            for seed in seeds:
                await stub.GenerateImage(request(seed), metadata=metadata, timeout=600)

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))  # warm-up
        seeds = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        return requests / (time.perf_counter() - started)


async def offered_sync(target: str, key: str, trace: list[float]) -> float:
    """Throughput of GenerateImage calls sent at the trace's times."""
    metadata = ((wire.API_KEY_HEADER, key),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        start = time.time()
        done: list[float] = []

        async def one(seed: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.time()))
            await stub.GenerateImage(request(seed), metadata=metadata, timeout=600)
            done.append(time.time())

        await asyncio.gather(*(one(seed, at) for seed, at in enumerate(trace)))
        return len(done) / (max(done) - (start + trace[0]))


async def offered_jobs(targets: list[str], key: str, trace: list[float]) -> tuple[float, list[float], list[pb.Job]]:
    """Throughput of jobs submitted at the trace's times (round robin over `targets`), their
    submit-to-start latencies, and the jobs as they ended."""
    metadata = ((wire.API_KEY_HEADER, key),)
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    try:
        stubs = [pb_grpc.TextToImageServiceStub(channel) for channel in channels]
        start = time.time()
        ids: list[str] = []

        async def one(seed: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.time()))
            job = await stubs[seed % len(stubs)].SubmitJob(request(seed), metadata=metadata, timeout=60)
            ids.append(job.id)

        await asyncio.gather(*(one(seed, at) for seed, at in enumerate(trace)))
        # Collected a page of 100 at a time (the key is this trace's own), not polled one by one,
        # so that collecting costs the replicas little.
        while True:
            await asyncio.sleep(1.0)
            jobs, cursor = [], ""
            while True:
                page = await stubs[0].ListJobs(pb.ListJobsRequest(page_size=100, cursor=cursor), metadata=metadata, timeout=60)
                jobs += page.jobs
                if not (cursor := page.next_cursor):
                    break
            if len(jobs) == len(ids) and all(job.status in FINISHED for job in jobs):
                break
        assert all(job.status == "succeeded" for job in jobs), [job.status for job in jobs if job.status != "succeeded"]
        finished = max(seconds_of(job.finished_at) for job in jobs)
        waits = [seconds_of(job.started_at) - seconds_of(job.created_at) for job in jobs]
        return len(jobs) / (finished - (start + trace[0])), waits, jobs
    finally:
        for channel in channels:
            await channel.close()


def waits_row(name: str, waits: list[float]) -> str:
    return (f"| {name} | {len(waits)} | {statistics.median(waits) * 1000:.0f} | {percentile(waits, 0.99) * 1000:.0f} | "
            f"{max(waits) * 1000:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=float, default=0.8, help="offered load, as a fraction of the measured capacity")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each arrival trace")
    parser.add_argument("--rounds", type=int, default=2, help="sync/jobs rounds on one replica (median taken)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from t2i.models.demo import ensure_demo_model

    root = Path(tempfile.mkdtemp(prefix="t2i-bench-jobs-"))
    data_dir = root / "one"
    ensure_demo_model(data_dir)
    sqlite_url = f"sqlite:///{data_dir / 'service.sqlite3'}"
    flags = ("--max-batch-size", "8")
    with ServerProcess(data_dir, "--database-url", sqlite_url, *flags) as one:
        one.wait_serving()
        cap = asyncio.run(capacity(one.target, new_key(sqlite_url), 64))
        rate = args.load * cap
        sync, jobs, one_waits = [], [], []
        for round_ in range(args.rounds):
            trace = arrivals(rate, args.seconds, seed=round_)
            sync.append(asyncio.run(offered_sync(one.target, new_key(sqlite_url), trace)))
            throughput, waits, _ = asyncio.run(offered_jobs([one.target], new_key(sqlite_url), trace))
            jobs.append(throughput)
            one_waits += waits
            print(f"round {round_ + 1}: sync {sync[-1]:.2f}/s, jobs {jobs[-1]:.2f}/s", flush=True)

    database_url, drop = postgres_database()
    try:
        replicas = []
        for name in ("a", "b"):
            own = root / name
            shutil.copytree(data_dir / "models", own / "models")
            replicas.append(ServerProcess(own, "--database-url", database_url, "--instance-id", f"replica-{name}", *flags))
        try:
            for replica in replicas:
                replica.wait_serving()
            key = new_key(database_url)
            trace = arrivals(rate, args.seconds, seed=100)
            _, two_waits, _ = asyncio.run(offered_jobs([r.target for r in replicas], key, trace))
            per_replica = {f"replica-{name}": len(replica.logged("job succeeded")) for name, replica in zip("ab", replicas)}
        finally:
            for replica in replicas:
                replica.kill()
    finally:
        drop()

    sync_median, jobs_median = statistics.median(sync), statistics.median(jobs)
    lines = [
        "## Jobs against synchronous calls",
        "",
        f"Command: `make bench-jobs` (`python -m benchmarks.jobs --load {args.load:g} --seconds {args.seconds:g} --rounds {args.rounds}`). "
        f"Demo model, 64x64, 8 steps (euler), `--max-batch-size 8`, gRPC clients; capacity measured first with "
        f"closed-loop synchronous calls at concurrency {CONCURRENCY}: **{cap:.2f} images/s**. Offered load "
        f"{args.load:g} x capacity = {rate:.2f} requests/s, Poisson arrivals, {args.seconds:g} s per trace; the same "
        f"trace as synchronous calls and as jobs, round after round.",
        "",
        "| round | sync (images/s) | jobs (images/s) | jobs / sync |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {n + 1} | {s:.2f} | {j:.2f} | {j / s:.2f} |" for n, (s, j) in enumerate(zip(sync, jobs))),
        f"| **median** | **{sync_median:.2f}** | **{jobs_median:.2f}** | **{jobs_median / sync_median:.2f}** |",
        "",
        "Submit-to-start latency (`startedAt` - `createdAt`, stamped by the service):",
        "",
        "| setup | jobs | p50 (ms) | p99 (ms) | max (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
        waits_row(f"one replica, SQLite ({args.rounds} traces)", one_waits),
        waits_row(f"two replicas, PostgreSQL, the same load (jobs run: "
                  f"{', '.join(f'{k} {v}' for k, v in per_replica.items())})", two_waits),
        "",
        "Target: jobs at least 0.95x the synchronous calls' throughput at the same offered load.",
        "",
        READING,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("jobs", text)


if __name__ == "__main__":
    main()
