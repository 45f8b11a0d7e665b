"""The synchronous engine core: `step()` = `schedule()`, `execute(plan)`, `update(plan, outputs)`.

It owns no threads and no event loop, so it can be driven directly (tests, the raw-engine
benchmark) or from the AsyncEngine's worker thread. The batching rule lives in scheduler.py.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor

from .. import metrics
from ..errors import InternalError, ServiceError
from ..models.loader import LoadedModel
from ..sampling import AncestralNoise, SamplingRun, compute_sigmas, initial_noise, latent_shape, starting_latent
from .denoise import evaluate, size_conditioning
from .request import EngineRequest, RequestState
from .scheduler import Scheduler, StepPlan
from .text import encode_prompts

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    finished: list[EngineRequest] = field(default_factory=list)  # sampling done: decode next
    dropped: list[EngineRequest] = field(default_factory=list)  # cancelled or expired
    failed: list[tuple[EngineRequest, ServiceError]] = field(default_factory=list)
    wait: float = 0.0  # nothing ran: the admission window holds this much longer
    ran: bool = False


class EngineCore:
    def __init__(self, models: dict[int, LoadedModel], scheduler: Scheduler) -> None:
        self.models = models
        self.scheduler = scheduler

    def add(self, request: EngineRequest) -> None:
        self.scheduler.add(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, now: float | None = None) -> StepResult:
        plan = self.scheduler.schedule(time.monotonic() if now is None else now)
        result = StepResult(dropped=plan.dropped, wait=plan.wait)
        if plan.wait or not (plan.admit or plan.evaluate):
            return result
        outputs = self.execute(plan, result)
        self.update(plan, outputs, result)
        result.ran = True
        return result

    def execute(self, plan: StepPlan, result: StepResult) -> list[tuple[Tensor, Tensor]] | None:
        """Prepare newly admitted requests, then run one UNet evaluation for `plan.evaluate`."""
        self._prefill(plan.admit, result)
        failed = {id(r) for r, _ in result.failed}
        plan.evaluate = [r for r in plan.evaluate if id(r) not in failed]
        if not plan.evaluate:
            return None
        model = self.models[plan.evaluate[0].params.model_id]
        started = time.perf_counter()
        try:
            outputs = evaluate(model, [r.pending_evaluation() for r in plan.evaluate])
        except Exception as error:  # a failed forward fails its batch, never the engine
            log.exception("UNet evaluation failed", extra={"model_id": model.id, "batch": len(plan.evaluate)})
            for request in plan.evaluate:
                self._fail(request, InternalError(f"generation failed: {type(error).__name__}"), result)
            plan.evaluate = []
            return None
        seconds = time.perf_counter() - started
        size = len(plan.evaluate)
        metrics.BATCH_SIZE.labels(model=str(model.id)).observe(size)
        metrics.EVALUATIONS.labels(model=str(model.id)).inc()
        for request in plan.evaluate:
            request.times.denoise += seconds
            request.times.batch_sizes.append(size)
        return outputs

    def update(self, plan: StepPlan, outputs: list[tuple[Tensor, Tensor]] | None, result: StepResult) -> None:
        """Hand each request its predictions; finished ones leave the running set at once."""
        if outputs is None:
            return
        now = time.monotonic()
        for request, (cond, uncond) in zip(plan.evaluate, outputs):
            request.run.advance(cond, uncond)
            request.last_evaluated = now
            request.times.evaluations += 1
            if request.run.done:
                self.scheduler.finish(request)
                request.state = RequestState.DECODING
                result.finished.append(request)

    def _prefill(self, admitted: list[EngineRequest], result: StepResult) -> None:
        """Encode prompts (batched per model) and set up each admitted request's sampler."""
        by_model: dict[int, list[EngineRequest]] = defaultdict(list)
        for request in admitted:
            by_model[request.params.model_id].append(request)
        for model_id, requests in by_model.items():
            model = self.models[model_id]
            started = time.perf_counter()
            try:
                prompts = [text for r in requests for text in (r.params.prompt, r.params.negative_prompt)]
                encoded = encode_prompts(model.tokenizers, model.text_encoders, prompts, model.device)
            except Exception as error:
                log.exception("prompt encoding failed", extra={"model_id": model_id})
                for request in requests:
                    self._fail(request, InternalError(f"prompt encoding failed: {type(error).__name__}"), result)
                continue
            seconds = time.perf_counter() - started
            for index, request in enumerate(requests):
                request.cond, request.uncond = encoded[2 * index], encoded[2 * index + 1]
                request.times.text_encode = seconds
                try:
                    self._start_sampling(model, request)
                except Exception as error:
                    log.exception("sampler setup failed", extra={"request_id": request.request_id})
                    self._fail(request, InternalError(f"sampler setup failed: {type(error).__name__}"), result)

    @staticmethod
    def _start_sampling(model: LoadedModel, request: EngineRequest) -> None:
        p = request.params
        sigmas = compute_sigmas(model.sigma_table, p.scheduler, p.steps, p.sampler)
        noise = initial_noise(request.seed, latent_shape(p.height, p.width)).to(model.device)
        x = starting_latent(noise, float(sigmas[0]), model.sigma_table.sigma_max)
        request.time_ids = size_conditioning(p.height, p.width, model.device)
        request.run = SamplingRun(p.sampler, x, sigmas, p.cfg_scale, AncestralNoise(request.seed, x))

    def _fail(self, request: EngineRequest, error: ServiceError, result: StepResult) -> None:
        self.scheduler.finish(request)
        request.state = RequestState.FAILED
        result.failed.append((request, error))
