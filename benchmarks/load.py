"""Load generation over gRPC (asyncio): open-loop traces, closed-loop clients, late arrivals.

Every system is called the same way: GenerateImage with the request converted by the service's
own t2i.server.convert, an x-request-id to find the service's log line, and a deadline. An
open-loop request's latency runs from its scheduled arrival (not from when the client got to
send it), so a slow client cannot hide queueing. Peers return their queue wait and batch size
in trailing metadata (diffusers_peer.QUEUE_WAIT_KEY, BATCH_KEY); the service's come from its log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.domain import GenerateRequest
from t2i.server.convert import request_to_pb

from .diffusers_peer import BATCH_KEY, QUEUE_WAIT_KEY

CHANNELS = 4  # requests are spread over a few HTTP/2 connections
PROBE = GenerateRequest(model_id=1, prompt="probe", negative_prompt="", width=64, height=64, steps=1, cfg_scale=5.0,
                        seed=0, sampler="euler", scheduler="normal")


@dataclass
class Outcome:
    request_id: str
    arrival: float  # seconds from the start of the run (closed loop: when it was sent)
    latency: float | None = None  # None: not completed
    status: str = "OK"
    finished_at: float | None = None  # seconds from the start of the run
    queue_wait: float | None = None
    batch: float | None = None

    @property
    def completed(self) -> bool:
        return self.latency is not None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with few samples p99 is the largest one."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class RunResult:
    outcomes: list[Outcome]
    seconds: float = 0.0  # the span throughput is measured over
    extra: dict = field(default_factory=dict)

    def saved(self) -> dict:
        """As JSON data, for a benchmark's saved results (`restored` reads it back)."""
        return {"outcomes": [dataclasses.asdict(o) for o in self.outcomes], "seconds": self.seconds, "extra": self.extra}

    @classmethod
    def restored(cls, data: dict) -> RunResult:
        extra = {**data["extra"], "window": tuple(data["extra"]["window"])}
        return cls([Outcome(**o) for o in data["outcomes"]], data["seconds"], extra)

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.completed]

    @property
    def not_completed(self) -> int:
        return len(self.outcomes) - len(self.completed)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            if not o.completed:
                counts[o.status] = counts.get(o.status, 0) + 1
        return counts

    @property
    def per_second(self) -> float:
        """Closed loop: completions over the run's time. Open loop: completions per second within
        the steady window (extra["window"]): late enough that the system has filled up, early
        enough that arrivals still come, so a system that keeps up shows the arrival rate and a
        saturated one its capacity."""
        window = self.extra.get("window")
        if window is None:
            return len(self.completed) / self.seconds if self.seconds else 0.0
        opens, closes = window
        return sum(1 for o in self.completed if opens <= o.finished_at < closes) / (closes - opens)

    def latency(self, q: float) -> float | None:
        done = [o.latency for o in self.completed]
        return percentile(done, q) if done else None

    def queue_wait(self, q: float) -> float | None:
        waits = [o.queue_wait for o in self.completed if o.queue_wait is not None]
        return percentile(waits, q) if waits else None

    @property
    def steady_per_second(self) -> float:
        """Closed loop: completions per second while every client was busy, after a warm-in.

        The window opens at the completion that brings the count to `concurrency` (each client
        has, on average, been through one request) and closes at the last send (from then on
        fewer requests are in flight); with clients in lockstep this is exact, and with
        staggered clients it leaves out the start and the tail, where fewer requests share the
        work than the system could take."""
        concurrency = self.extra["concurrency"]
        finished = sorted(o.finished_at for o in self.outcomes if o.finished_at is not None)
        if len(finished) < concurrency:
            return self.per_second  # too few requests for a window: the whole run
        last_send = max(o.arrival for o in self.outcomes)
        opens = finished[concurrency - 1]
        inside = sum(1 for t in finished if opens < t <= last_send)
        if last_send <= opens or inside == 0:
            return self.per_second  # too few requests for a window: the whole run
        return inside / (last_send - opens)

    @property
    def mean_batch(self) -> float | None:
        batches = [o.batch for o in self.completed if o.batch is not None]
        return statistics.fmean(batches) if batches else None


class Target:
    """A few channels to one system, round-robin."""

    def __init__(self, address: str) -> None:
        options = [("grpc.max_receive_message_length", wire.MAX_RESPONSE_BYTES)]
        self.channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS)]
        self.stubs = itertools.cycle([pb_grpc.TextToImageServiceStub(c) for c in self.channels])

    async def call(self, request: GenerateRequest, request_id: str, timeout: float) -> tuple[str, dict]:
        """("OK" or the gRPC status name, trailing metadata)."""
        call = next(self.stubs).GenerateImage(
            request_to_pb(request), timeout=max(timeout, 0.001), metadata=((wire.REQUEST_ID_HEADER, request_id),)
        )
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code().name, {}
        return "OK", dict(await call.trailing_metadata() or ())

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def _fill_from_trailers(outcome: Outcome, trailers: dict) -> None:
    if QUEUE_WAIT_KEY in trailers:
        outcome.queue_wait = float(trailers[QUEUE_WAIT_KEY])
    if BATCH_KEY in trailers:
        outcome.batch = float(trailers[BATCH_KEY])


async def open_loop(
    target: Target, requests: Sequence[GenerateRequest], arrivals: Sequence[float], cutoff: float, tag: str,
    window: tuple[float, float],
) -> RunResult:
    """Send requests[i] at arrivals[i] seconds; whatever is not answered `cutoff` seconds after
    the start is cancelled (its deadline) and counts as not completed. Throughput is counted
    over `window` (seconds from the start)."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1

    async def one(index: int, request: GenerateRequest, offset: float) -> Outcome:
        outcome = Outcome(f"{tag}-{index:05d}", offset)
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        outcome.status, trailers = await target.call(request, outcome.request_id, start + cutoff - loop.time())
        if outcome.status == "OK":
            now = loop.time()
            outcome.latency, outcome.finished_at = now - (start + offset), now - start
            _fill_from_trailers(outcome, trailers)
        return outcome

    outcomes = await asyncio.gather(*(one(i, r, t) for i, (r, t) in enumerate(zip(requests, arrivals))))
    return RunResult(list(outcomes), cutoff, extra={"window": window})


async def closed_loop(target: Target, requests: Sequence[GenerateRequest], concurrency: int, tag: str) -> RunResult:
    """`concurrency` clients, each sending the next request as soon as its previous one returns."""
    loop = asyncio.get_running_loop()
    pending = iter(enumerate(requests))
    outcomes: list[Outcome] = []
    start = loop.time()

    async def client() -> None:
        for index, request in pending:
            outcome = Outcome(f"{tag}-{index:05d}", loop.time() - start)
            sent = loop.time()
            outcome.status, trailers = await target.call(request, outcome.request_id, 600)
            if outcome.status != "OK":
                raise RuntimeError(f"closed-loop request {outcome.request_id} failed: {outcome.status}")
            outcome.latency, outcome.finished_at = loop.time() - sent, loop.time() - start
            _fill_from_trailers(outcome, trailers)
            outcomes.append(outcome)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return RunResult(outcomes, loop.time() - start, extra={"concurrency": concurrency})


async def timed(target: Target, request: GenerateRequest, request_id: str) -> float:
    started = time.perf_counter()
    status, _ = await target.call(request, request_id, 600)
    if status != "OK":
        raise RuntimeError(f"{request_id} failed: {status}")
    return time.perf_counter() - started


async def late_arrival(target: Target, request: GenerateRequest, companions: int, repeats: int, tag: str) -> tuple[float, float, float]:
    """(solo latency, latency of a request sent halfway through a batch of `companions`
    requests that arrived together, that batch's own latency), medians of `repeats`."""
    seeds = itertools.count(1000)

    def fresh() -> GenerateRequest:
        return replace(request, seed=next(seeds))

    await timed(target, fresh(), f"{tag}-warm")
    solo = statistics.median([await timed(target, fresh(), f"{tag}-solo-{i}") for i in range(repeats)])
    batch = statistics.median(
        [max(await asyncio.gather(*(timed(target, fresh(), f"{tag}-batch-{i}-{j}") for j in range(companions))))
         for i in range(repeats)]
    )
    late = []
    for i in range(repeats):
        first = [asyncio.ensure_future(timed(target, fresh(), f"{tag}-first-{i}-{j}")) for j in range(companions)]
        await asyncio.sleep(batch / 2)
        late.append(await timed(target, fresh(), f"{tag}-late-{i}"))
        await asyncio.gather(*first)
    return solo, statistics.median(late), batch


async def drain(target: Target) -> None:
    """Return once the system has finished what it was doing: a tiny request gets through."""
    await timed(target, PROBE, f"probe-{time.monotonic_ns()}")
