"""The batching rule: which requests share the next UNet evaluation, and who goes first.

Each engine step runs exactly one UNet forward. `Batcher.schedule()` decides it and returns a
StepPlan that nobody changes afterwards:

1. Requests whose caller went away (`abort`) or whose deadline passed are dropped, waiting or
   running; no more work is spent on them.
2. Admission window: when nothing is running, the first waiting requests are held so that
   requests arriving together start together: until `max_batch_size` samples are waiting, the
   oldest has waited `admission_window` seconds, or `admission_gap` seconds passed without a new
   arrival, whichever comes first. The gap ends the wait of a lone request early (a burst
   arrives within a few milliseconds; waiting the whole window for companions that are not
   coming was most of a lone request's overhead). While anything runs, nobody waits: a new
   arrival joins at the very next evaluation.
3. Admission: while the running requests hold fewer than `max_batch_size` samples (a request
   of numImages N holds N; one larger than the whole batch is admitted alone, when nothing
   runs), the next waiting request is admitted: the oldest request of the tenant (API key)
   with the least virtual service, see "Fair shares"; with `fair=False`, the oldest of all.
   A tenant with nothing running is admitted even over a full batch (up to twice
   `max_batch_size` samples in all), so that one tenant's full batch never queues another's
   request: its wait for a slot would otherwise be a whole flood request's run.
   When that request does not fit in the room left (say 4 images with 2 slots free), the
   oldest request of the next tenant in counter order that does fit is admitted instead, so
   no slot stays empty while a request that fits waits. A tenant's own requests never pass
   each other, and nothing passes a request larger than the whole batch: that one needs the
   batch to drain. With `fair=False` the order is strict: the oldest waits for room.
   An admitted request has its prompts encoded in this step and takes part in this step's
   forward if it belongs to the chosen bucket.
4. Bucket choice: requests can share a forward only with the same model and latent size;
   their LoRAs do not matter (each row gets its own deltas inside the one forward,
   lora/apply.py). The next bucket is the one holding the running request whose tenant has
   the least virtual service, so a huge image's bucket gets turns in proportion to its cost
   and another tenant's small requests are not held behind it. Within that tenant (and with
   `fair=False`, among all), the oldest running request goes first (`oldest_first`): its
   bucket runs, and whoever shares that latent size rides along. A request's latency is then
   the work that arrived before it plus its own (and the rows of later requests riding in
   its forwards), not the work of later requests of other sizes: the largest latency is
   about as small as one worker can make it (first in, first out minimizes the maximum flow
   time), where taking sizes in turn (`oldest_first=False`: the least recently evaluated
   request's bucket) stretches each request by everything running beside it, so requests
   with the most work (a hires fix's two passes) made the tail. (`lora_sets_apart` splits
   buckets by LoRA set as well: the one-adapter-set-per-batch policy of other servers, kept
   to measure against.)
5. The forward evaluates every running request of that bucket (at most `max_batch_size`
   samples, or twice that after over-full joins, see 3), each at its own step, sigma, sampler, cfg scale and prompt length; a request
   that finishes or fails leaves the running set at once (`finish`).

Fair shares (the Virtual Token Counter of Sheng et al., OSDI '24, in this engine's unit of
work). Each tenant has a counter of the service it received, divided by its weight (its tier's
share: pro more than standard, free less). Work is charged as it is done, in
megapixel-evaluations (t2i.cost): prompt encoding at admission, every UNet evaluation of the
request's rows, the VAE decode when its sampling ends. Admission and bucket choice favour the
least counter, so between backlogged tenants the service received stays within a bound of the
largest single charge; a tenant that was idle does not bank credit: when it becomes
backlogged again its counter is lifted to the least counter of the tenants that are (a
returning tenant gets at most one request's worth ahead). The rule never leaves a slot empty
for fairness' sake: whoever waits is admitted when there is room (work-conserving).

The batcher is a plain function of its state: no model, no threads, unit-testable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .request import EngineRequest, RequestState

MAX_TENANTS = 100_000  # counters of idle tenants are forgotten beyond this many


@dataclass(frozen=True)
class StepPlan:
    admit: tuple[EngineRequest, ...] = ()  # newly admitted: prefill (encode, sampler set-up) first
    evaluate: tuple[EngineRequest, ...] = ()  # this step's forward, admitted ones included
    dropped: tuple[EngineRequest, ...] = ()  # aborted or expired: to be answered, not run
    wait: float = 0.0  # > 0: nothing to run yet, hold the admission window this long


class Batcher:
    def __init__(self, max_batch_size: int, admission_window: float, *, admission_gap: float | None = None,
                 fair: bool = True, oldest_first: bool = True, lora_sets_apart: bool = False) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.admission_window = admission_window
        self.admission_gap = admission_window if admission_gap is None else min(admission_gap, admission_window)
        self.fair = fair
        self.oldest_first = oldest_first
        self.lora_sets_apart = lora_sets_apart
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.counters: dict[str, float] = {}  # tenant -> virtual service received
        self._aborted: set[EngineRequest] = set()

    def add(self, request: EngineRequest) -> None:
        tenant = request.tenant
        active = self._active_tenants()
        if tenant not in active:
            # VTC's lift: a tenant coming back from idle starts at the least counter of the
            # backlogged ones (never below its own), so idleness banks no credit.
            floor = min((self.counters.get(t, 0.0) for t in active), default=None)
            if floor is not None:
                self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
            self.counters.setdefault(tenant, 0.0)
        self.waiting.append(request)
        if len(self.counters) > MAX_TENANTS:
            self._forget_idle()

    def charge(self, request: EngineRequest, work: float) -> None:
        """Count `work` (megapixel-evaluations) as service received by the request's tenant."""
        self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + work / request.weight

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

        if not self.running and self.waiting and sum(r.samples for r in self.waiting) < self.max_batch_size:
            waited = now - min(r.arrival for r in self.waiting)
            quiet = now - max(r.arrival for r in self.waiting)
            hold = min(self.admission_window - waited, self.admission_gap - quiet)
            if hold > 0:
                return StepPlan(dropped=tuple(dropped), wait=hold)

        admit = []
        held = sum(r.samples for r in self.running)
        while self.waiting:
            request = self._next_admitted(held)
            if request is None:
                break
            self.waiting.remove(request)
            held += request.samples
            request.advance(RequestState.RUNNING)
            request.last_evaluated = request.arrival
            request.times.queue_wait = now - request.arrival
            self.charge(request, request.encode_work)
            self.running.append(request)
            admit.append(request)

        evaluate: tuple[EngineRequest, ...] = ()
        if self.running:
            first = min(self.running, key=self._turn)
            evaluate = tuple(r for r in self.running if self._bucket(r) == self._bucket(first))
        return StepPlan(admit=tuple(admit), evaluate=evaluate, dropped=tuple(dropped))

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

    # --- the rule's parts ----------------------------------------------------------------------

    def _next_admitted(self, held: int) -> EngineRequest | None:
        """The waiting request to admit next with `held` samples running, or None to admit none."""
        if not self.fair:
            head = self.waiting[0]  # first come, first served: strict order, no over-full joins
            return head if not self.running or held + head.samples <= self.max_batch_size else None
        tenants = set()
        for request in self.queue_order():
            if request.tenant in tenants:
                continue  # a tenant's requests go in its own order: only its oldest is a candidate
            tenants.add(request.tenant)
            if not self.running or held + request.samples <= self.max_batch_size or self._joins_over_full(request, held):
                return request
            if request.samples > self.max_batch_size:
                return None  # it can only run alone: let the batch drain rather than fill it behind its back
            # It does not fit yet (its tenant has work running): the next tenant's request may.
        return None

    def _joins_over_full(self, request: EngineRequest, held: int) -> bool:
        """A tenant with nothing running is never held behind another tenant's full batch: its
        request joins at once, over the batch size, up to twice it in all."""
        if any(r.tenant == request.tenant for r in self.running):
            return False
        return held + request.samples <= 2 * self.max_batch_size

    def queue_order(self) -> list[EngineRequest]:
        """The waiting requests in the order admission takes them (queue positions follow it)."""
        if not self.fair:
            return list(self.waiting)
        return sorted(self.waiting, key=lambda r: self.counters.get(r.tenant, 0.0))  # stable: FIFO within ties

    def _turn(self, request: EngineRequest) -> tuple:
        within = (request.arrival,) if self.oldest_first else (request.last_evaluated,)
        if not self.fair:
            return within
        return (self.counters.get(request.tenant, 0.0), *within)

    def _bucket(self, request: EngineRequest) -> tuple:
        if not self.lora_sets_apart:
            return request.bucket
        return (*request.bucket, tuple((l.weights.name, l.strength_model, l.strength_clip) for l in request.loras))

    def _active_tenants(self) -> set[str]:
        return {r.tenant for r in self.waiting} | {r.tenant for r in self.running}

    def _forget_idle(self) -> None:
        active = self._active_tenants()
        floor = min((self.counters[t] for t in active), default=0.0)
        for tenant in [t for t, value in self.counters.items() if t not in active and value <= floor]:
            del self.counters[tenant]
