"""A request's sampling as a small state machine the engine advances one evaluation at a time."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from torch import Tensor

from .guidance import Guidance
from .partial import LatentMask, MaskedGuidance
from .names import SAMPLER_NAMES, check_name
from .samplers import SAMPLERS, Evaluation, NoiseSource, evaluations_per_step


class SamplingRun:
    """Wraps one sampler program.

    `pending` is the (x, sigma) the program waits to have evaluated, or None once finished;
    `advance(cond, uncond)` hands it the two x0-predictions at that point. `cfg_rescale` is
    RescaleCFG's multiplier (0: plain cfg); `guidance` is what the program guides with.
    With a `mask` (inpainting), `pending` is what the model is shown, the program's own point
    blended with the noised latent image (partial.py), and its guidance blends the prediction.
    """

    def __init__(
        self,
        sampler: str,
        x: Tensor,
        sigmas: Sequence[float] | Tensor,
        cfg_scale: float,
        noise: NoiseSource,
        cfg_rescale: float = 0.0,
        mask: LatentMask | None = None,
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
        self.mask = mask
        base = Guidance(float(cfg_scale), float(cfg_rescale))
        self.guidance = base if mask is None else MaskedGuidance(base, mask)
        self._program = SAMPLERS[sampler](x, sigma_list, self.guidance, noise)
        self._resume(None)

    @property
    def done(self) -> bool:
        return self.pending is None

    @property
    def step(self) -> int:
        """Steps completed so far."""
        return bisect.bisect_right(self._step_ends, self.evaluations_done)

    def guided(self, shown: Tensor, sigma: float, cond: Tensor, uncond: Tensor) -> Tensor:
        """The guided x0-prediction for an evaluation of `pending` (shown = its x): what a
        preview of this step shows."""
        if self.mask is None:
            return self.guidance(shown, sigma, cond, uncond)
        return self.guidance.at_input(shown, sigma, cond, uncond)

    def advance(self, cond: Tensor, uncond: Tensor) -> None:
        if self.pending is None:
            raise RuntimeError("advance() called on a finished sampling run")
        self.evaluations_done += 1
        self._resume((cond, uncond))

    def _resume(self, prediction: tuple[Tensor, Tensor] | None) -> None:
        try:
            x, sigma = self._program.send(prediction)
            self.pending = (x if self.mask is None else self.mask.model_input(x, sigma), sigma)
        except StopIteration as finished:
            self.pending = None
            self.result = finished.value
