"""The batching rule: which requests share the next UNet evaluation.

Each engine step runs exactly one UNet forward. `Scheduler.schedule()` decides it:

1. Requests that were cancelled or passed their deadline are dropped, waiting or running; no
   more work is spent on them.
2. Admission window: when nothing is running, the first waiting request is held for up to
   `admission_window` seconds (or until `max_batch_size` are waiting) so that requests
   arriving together start together. While anything runs, nobody waits: a new arrival joins
   at the very next evaluation.
3. Admission: waiting requests are admitted in arrival order while fewer than
   `max_batch_size` are running. An admitted request has its prompts encoded in this step and
   takes part in this step's forward if it belongs to the chosen bucket.
4. Bucket choice: requests can share a forward only with the same model and latent size. The
   bucket holding the request that has waited longest since its last evaluation goes next, so
   buckets take turns and nobody starves.
5. The forward evaluates every running request of that bucket (at most `max_batch_size`),
   each at its own step, sigma, sampler, cfg scale and prompt length; a request that finishes
   leaves the running set at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .request import EngineRequest, RequestState


@dataclass
class StepPlan:
    admit: list[EngineRequest] = field(default_factory=list)
    evaluate: list[EngineRequest] = field(default_factory=list)
    dropped: list[EngineRequest] = field(default_factory=list)
    wait: float = 0.0  # > 0: nothing to run yet, hold the admission window this long

    @property
    def empty(self) -> bool:
        return not (self.admit or self.evaluate or self.dropped)


class Scheduler:
    def __init__(self, max_batch_size: int, admission_window: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.admission_window = admission_window
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        for queue in (self.waiting, self.running):
            for request in [r for r in queue if r.abort_requested or r.expired(now)]:
                queue.remove(request)
                request.state = RequestState.ABORTED
                plan.dropped.append(request)

        if not self.running and self.waiting and len(self.waiting) < self.max_batch_size:
            held = now - self.waiting[0].arrival
            if held < self.admission_window:
                plan.wait = self.admission_window - held
                return plan

        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting.popleft()
            request.state = RequestState.RUNNING
            request.last_evaluated = request.arrival
            request.times.queue_wait = now - request.arrival
            self.running.append(request)
            plan.admit.append(request)

        if self.running:
            oldest = min(self.running, key=lambda r: r.last_evaluated)
            plan.evaluate = [r for r in self.running if r.bucket == oldest.bucket]
        return plan

    def finish(self, request: EngineRequest) -> None:
        """Take a request out of the running set (sampling done or failed)."""
        if request in self.running:
            self.running.remove(request)
