"""A request inside the engine: its state, its sampler program and its conditioning."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from torch import Tensor

from ..domain import GenerateRequest, StageTimes
from ..sampling import SamplingRun
from .denoise import Evaluation
from .text import TextConditioning


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, not admitted yet
    RUNNING = "running"  # admitted: prompts encoded, denoising one evaluation at a time
    DECODING = "decoding"  # sampling done: VAE decode and PNG encode
    FINISHED = "finished"
    ABORTED = "aborted"  # the client cancelled or its deadline passed
    FAILED = "failed"


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    params: GenerateRequest
    seed: int
    deadline: float | None = None  # time.monotonic() value
    arrival: float = field(default_factory=time.monotonic)
    state: RequestState = RequestState.WAITING
    # Set from other threads (the client went away); the scheduler acts on it.
    abort_requested: bool = False
    run: SamplingRun | None = None
    cond: TextConditioning | None = None
    uncond: TextConditioning | None = None
    time_ids: Tensor | None = None
    last_evaluated: float = 0.0
    times: StageTimes = field(default_factory=StageTimes)

    @property
    def bucket(self) -> tuple[int, int, int]:
        """Requests can share a forward only with the same model and latent size."""
        return (self.params.model_id, self.params.height // 8, self.params.width // 8)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def pending_evaluation(self) -> Evaluation:
        x, sigma = self.run.pending
        return Evaluation(x=x, sigma=sigma, cond=self.cond, uncond=self.uncond, time_ids=self.time_ids)
