"""A request's sampling as a small state machine the engine advances one evaluation at a time."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from torch import Tensor

from .guidance import Guidance
from .names import SAMPLER_NAMES, check_name
from .samplers import SAMPLERS, Evaluation, NoiseSource, evaluations_per_step


class SamplingRun:
    """Wraps one sampler program.

    `pending` is the (x, sigma) the program waits to have evaluated, or None once finished;
    `advance(cond, uncond)` hands it the two x0-predictions at that point. `cfg_rescale` is
    RescaleCFG's multiplier (0: plain cfg); `guidance` is what the program guides with.
    """

    def __init__(
        self,
        sampler: str,
        x: Tensor,
        sigmas: Sequence[float] | Tensor,
        cfg_scale: float,
        noise: NoiseSource,
        cfg_rescale: float = 0.0,
    ) -> None:
        check_name("sampler", sampler, SAMPLER_NAMES)
        sigma_list = [float(s) for s in sigmas]
        if not sigma_list or sigma_list[-1] != 0:
            raise ValueError(f"a sigma list must end in 0, got {sigma_list[-3:]}")
        self.sampler = sampler
        # Cumulative evaluations at the end of each step, so progress can speak in steps.
        self._step_ends = list(itertools.accumulate(evaluations_per_step(sampler, sigma_list)))
        self.total_steps = len(self._step_ends)
        self.total_evaluations = self._step_ends[-1] if self._step_ends else 0
        self.evaluations_done = 0
        self.result: Tensor | None = None
        self.pending: Evaluation | None = None
        self.guidance = Guidance(float(cfg_scale), float(cfg_rescale))
        self._program = SAMPLERS[sampler](x, sigma_list, self.guidance, noise)
        self._resume(None)

    @property
    def done(self) -> bool:
        return self.pending is None

    @property
    def step(self) -> int:
        """Steps completed so far."""
        return bisect.bisect_right(self._step_ends, self.evaluations_done)

    def advance(self, cond: Tensor, uncond: Tensor) -> None:
        if self.pending is None:
            raise RuntimeError("advance() called on a finished sampling run")
        self.evaluations_done += 1
        self._resume((cond, uncond))

    def _resume(self, prediction: tuple[Tensor, Tensor] | None) -> None:
        try:
            self.pending = self._program.send(prediction)
        except StopIteration as finished:
            self.pending = None
            self.result = finished.value
