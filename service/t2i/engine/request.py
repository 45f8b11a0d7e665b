"""A request inside the engine: its state machine, its sampler program, its conditioning and
the future its caller awaits.

States and who moves a request between them (no other transition is allowed; `advance`
raises on any other, so a bug shows up as an error instead of a request answered twice):

    WAITING  -> RUNNING    the batcher admitted it (denoise thread)
    RUNNING  -> DECODING   its sampler finished (denoise thread)
    DECODING -> FINISHED   its image is encoded (finisher threads)
    WAITING, RUNNING, DECODING -> ABORTED   its caller went away or its deadline passed
    WAITING, RUNNING, DECODING -> FAILED    an error attributed to it

FINISHED, ABORTED and FAILED are terminal: entering one settles the caller's future, exactly
once, from whichever thread made the transition.

A streamed request's events reach its caller's loop in the order they were emitted, and all of
them before its answer: `emit` checks the state and hands the event over under the same lock as
`settle` changes it, so an event emitted from another thread (a preview from the encode pool)
either goes out before the answer or, once the request has ended, not at all; those late
events are counted (t2i_stream_events_dropped_total) and logged at debug.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor

from .. import cost, metrics
from ..domain import Event, GenerateRequest, GenerateResult, StageTimes
from ..lora import LoadedLora, RequestLoras
from ..passes import DenoisePass, Plan, plan
from ..sampling import SamplingRun
from .denoise import UNetInput
from .text import PreparedPrompt, TextConditioning, context_chunks

log = logging.getLogger(__name__)


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, not admitted yet
    RUNNING = "running"  # admitted: prompts encoded, denoising one evaluation at a time
    DECODING = "decoding"  # sampling done: VAE decode and image encode
    FINISHED = "finished"
    ABORTED = "aborted"  # the client cancelled or its deadline passed
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED})
_NEXT = {
    RequestState.WAITING: {RequestState.RUNNING, RequestState.ABORTED, RequestState.FAILED},
    RequestState.RUNNING: {RequestState.DECODING, RequestState.ABORTED, RequestState.FAILED},
    RequestState.DECODING: {RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED},
}


class InvalidTransition(RuntimeError):
    pass


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    params: GenerateRequest
    seed: int
    deadline: float | None = None  # time.monotonic() value
    # The prompt and negative prompt, checked and chunked (engine.check); encoded at admission.
    prompts: tuple[PreparedPrompt, PreparedPrompt] | None = None
    # Who the work is for (an API key's id) and that tenant's share weight (batching.py).
    tenant: str = ""
    weight: float = 1.0
    # The request's LoRAs, their weights on the device (pinned until the request ends).
    loras: tuple[LoadedLora, ...] = ()
    lora_leases: RequestLoras | None = None
    arrival: float = field(default_factory=time.monotonic)
    # The caller's future and its loop; None when the core is driven directly (tests).
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    # Streamed calls: called on the caller's loop with each event (engine.py throttles them).
    events: Callable[[Event], None] | None = None
    last_reported: float = 0.0  # when the last queued or progress event went out
    reported_ahead: int | None = None
    last_preview: float = float("-inf")  # when the last preview was taken (time.monotonic())
    preview_latent: Tensor | None = None  # the guided x0 of a step a preview is due for
    state: RequestState = RequestState.WAITING
    # Image to image: the encoded picture, (1, 4, h, w) in the model's latent space, and the
    # inpainting mask as read from its file, (H, W) in [0, 1]; both set before it is queued.
    image_latent: Tensor | None = None
    mask: Tensor | None = None
    # Where it is in its plan of passes (t2i.passes): the pass running, and each pass's
    # (steps, evaluations) in all, for progress across passes (set at admission).
    pass_index: int = 0
    pass_totals: tuple[tuple[int, int], ...] = ()
    run: SamplingRun | None = None
    cond: TextConditioning | None = None
    uncond: TextConditioning | None = None
    time_ids: Tensor | None = None
    last_evaluated: float = 0.0
    times: StageTimes = field(default_factory=StageTimes)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def plan(self) -> Plan:
        return plan(self.params)

    @property
    def current_pass(self) -> DenoisePass:
        return self.plan.passes[self.pass_index]

    @property
    def last_pass(self) -> bool:
        return self.pass_index == len(self.plan.passes) - 1

    def progress(self) -> tuple[int, int, int, int]:
        """(steps done, steps in all, evaluations done, evaluations in all), every pass together."""
        before = self.pass_totals[: self.pass_index]
        steps_before, evaluations_before = sum(s for s, _ in before), sum(e for _, e in before)
        return (
            steps_before + self.run.step, sum(s for s, _ in self.pass_totals),
            evaluations_before + self.run.evaluations_done, sum(e for _, e in self.pass_totals),
        )

    @property
    def samples(self) -> int:
        """Images this request makes: each is a cond and an uncond row in every forward."""
        return self.params.num_images

    # The work values (t2i.cost) follow from the request's settings and prompts, fixed at creation;
    # cached, because the batcher charges evaluation_work for every request at every step.
    @cached_property
    def context_chunks(self) -> int:
        """77-token chunks of the longer of its two text contexts (each UNet row attends to them)."""
        return context_chunks(self.prompts) if self.prompts else 1

    @cached_property
    def encode_work(self) -> float:
        """What admission charges: its prompts' encode, and its picture's (image to image)."""
        chunks = sum(len(p.chunks[0]) for p in self.prompts) if self.prompts else 2
        work = cost.encode_work(chunks)
        if self.plan.encode:
            work += cost.image_encode_work(self.params.width, self.params.height)
        return float(work)

    @property
    def evaluation_work(self) -> float:
        """One evaluation of the pass running (the batcher charges it at every step)."""
        return self._evaluation_work[self.pass_index]

    @cached_property
    def _evaluation_work(self) -> tuple[float, ...]:
        return tuple(float(cost.evaluation_work(p.width, p.height, self.context_chunks, self.samples)) for p in self.plan.passes)

    @cached_property
    def decode_work(self) -> float:
        return float(cost.decode_work(*self.plan.output_size, self.samples))

    @property
    def previews(self) -> bool:
        return self.events is not None and self.params.preview_every_steps > 0

    def emit(self, event: Event) -> None:
        """Hand `event` to the caller's loop (from any thread), ahead of the answer; dropped,
        counted and logged at debug once the request has ended (see the module docstring)."""
        if self.events is None or self.loop is None:
            return
        with self._lock:  # settle() cannot end the request between the check and the hand-over
            if not self.state.terminal:
                try:
                    self.loop.call_soon_threadsafe(self.events, event)
                except RuntimeError:  # the loop is closed
                    pass
                return
        self.dropped_event(event)

    def dropped_event(self, event: Event) -> None:
        """An event that comes after the request ended: never sent, but counted and logged."""
        kind = type(event).__name__.lower()
        metrics.STREAM_EVENTS_DROPPED.labels(event=kind).inc()
        log.debug("stream event after the request ended, dropped",
                  extra={"request_id": self.request_id, "event": kind, "state": self.state.value})

    @property
    def bucket(self) -> tuple[int, int, int]:
        """Requests can share a forward only with the same model and latent size: the size of
        the pass running, so a hires request moves to the larger bucket for its second pass."""
        size = self.current_pass
        return (self.params.model_id, size.height // 8, size.width // 8)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def pending_input(self) -> UNetInput:
        x, sigma = self.run.pending
        return UNetInput(x=x, sigma=sigma, cond=self.cond, uncond=self.uncond, time_ids=self.time_ids, loras=self.loras)

    def advance(self, state: RequestState) -> None:
        """Move to a non-terminal state; InvalidTransition when the state machine forbids it."""
        with self._lock:
            self._check(state)
            self.state = state

    def settle(self, state: RequestState, *, result: GenerateResult | None = None, error: Exception | None = None) -> bool:
        """Enter a terminal state and answer the caller. False (and nothing changes) when the
        request is already terminal: an abort racing a failure, say, is answered once."""
        if not state.terminal:
            raise ValueError(f"{state} is not a terminal state")
        with self._lock:
            if self.state.terminal:
                return False
            self._check(state)
            self.state = state
        if self.lora_leases is not None:
            self.lora_leases.release()  # the weights may be evicted from now on
        if self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_settle_future, self.future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
        return True

    def _check(self, state: RequestState) -> None:
        if state not in _NEXT.get(self.state, ()):
            raise InvalidTransition(f"request {self.request_id}: {self.state.value} -> {state.value} is not allowed")


def _settle_future(future: asyncio.Future, result: GenerateResult | None, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
