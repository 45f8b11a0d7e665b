"""The batching rule: which requests share the next UNet evaluation.

Each engine step runs exactly one UNet forward. `Batcher.schedule()` decides it and returns a
StepPlan that nobody changes afterwards:

1. Requests whose caller went away (`abort`) or whose deadline passed are dropped, waiting or
   running; no more work is spent on them.
2. Admission window: when nothing is running, the first waiting request is held for up to
   `admission_window` seconds (or until `max_batch_size` are waiting) so that requests
   arriving together start together. While anything runs, nobody waits: a new arrival joins
   at the very next evaluation.
3. Admission: waiting requests are admitted in arrival order while fewer than
   `max_batch_size` are running. An admitted request has its prompts encoded in this step and
   takes part in this step's forward if it belongs to the chosen bucket.
4. Bucket choice: requests can share a forward only with the same model and latent size; their
   LoRAs do not matter (each row gets its own deltas inside the one forward, lora/apply.py).
   The bucket holding the request that has waited longest since its last evaluation goes
   next, so buckets take turns and nobody starves. (`lora_sets_apart` splits buckets by LoRA
   set as well: the one-adapter-set-per-batch policy of other servers, kept to measure against.)
5. The forward evaluates every running request of that bucket (at most `max_batch_size`),
   each at its own step, sigma, sampler, cfg scale and prompt length; a request that finishes
   or fails leaves the running set at once (`finish`).

The batcher is a plain function of its state: no model, no threads, unit-testable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .request import EngineRequest, RequestState


@dataclass(frozen=True)
class StepPlan:
    admit: tuple[EngineRequest, ...] = ()  # newly admitted: prefill (encode, sampler set-up) first
    evaluate: tuple[EngineRequest, ...] = ()  # this step's forward, admitted ones included
    dropped: tuple[EngineRequest, ...] = ()  # aborted or expired: to be answered, not run
    wait: float = 0.0  # > 0: nothing to run yet, hold the admission window this long


class Batcher:
    def __init__(self, max_batch_size: int, admission_window: float, *, lora_sets_apart: bool = False) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.admission_window = admission_window
        self.lora_sets_apart = lora_sets_apart
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._aborted: set[EngineRequest] = set()

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def abort(self, request: EngineRequest) -> None:
        """Drop the request at the next schedule(), wherever it is."""
        if request in self.running or request in self.waiting:
            self._aborted.add(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float) -> StepPlan:
        dropped = []
        for queue in (self.waiting, self.running):
            for request in [r for r in queue if r in self._aborted or r.expired(now)]:
                queue.remove(request)
                dropped.append(request)
        self._aborted.clear()

        if not self.running and self.waiting and len(self.waiting) < self.max_batch_size:
            held = now - self.waiting[0].arrival
            if held < self.admission_window:
                return StepPlan(dropped=tuple(dropped), wait=self.admission_window - held)

        admit = []
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting.popleft()
            request.advance(RequestState.RUNNING)
            request.last_evaluated = request.arrival
            request.times.queue_wait = now - request.arrival
            self.running.append(request)
            admit.append(request)

        evaluate: tuple[EngineRequest, ...] = ()
        if self.running:
            oldest = min(self.running, key=lambda r: r.last_evaluated)
            evaluate = tuple(r for r in self.running if self._bucket(r) == self._bucket(oldest))
        return StepPlan(admit=tuple(admit), evaluate=evaluate, dropped=tuple(dropped))

    def _bucket(self, request: EngineRequest) -> tuple:
        if not self.lora_sets_apart:
            return request.bucket
        return (*request.bucket, tuple((l.weights.name, l.strength_model, l.strength_clip) for l in request.loras))

    def finish(self, request: EngineRequest) -> None:
        """Take a request out of the running set (sampling done or failed)."""
        if request in self.running:
            self.running.remove(request)

    def clear(self) -> list[EngineRequest]:
        """Forget every request (the engine loop failed); returns them to be answered."""
        everyone = [*self.waiting, *self.running]
        self.waiting.clear()
        self.running.clear()
        self._aborted.clear()
        return everyone
