"""The synchronous engine core, shaped like vLLM's: one step is

    plan = schedule()          who is admitted, who is evaluated, who is dropped (batching.py)
    outputs = execute(plan)    prefill the admitted, run ONE UNet evaluation; changes no queue
    result = update(plan, outputs)   advance each sampler, move finished and failed requests out

It owns no threads and no event loop, so it can be driven directly (tests, the raw-engine
benchmark) or from the AsyncEngine's worker thread.

Errors are attributed as narrowly as possible: a failed prompt encode or sampler set-up fails
the requests it concerns, a failed UNet forward fails that forward's batch, a failed sampler
advance fails its request. Everything else escapes `step()` for the caller to escalate.
`consecutive_failures` counts UNet forwards that failed in a row, so the caller can tell a
broken device from one bad batch.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor

from .. import metrics
from ..errors import InternalError, ServiceError
from ..lora import text_encoder_wrapper
from ..models.loader import LoadedModel
from ..sampling import AncestralNoise, SamplingRun, initial_noise, latent_shape, starting_latent
from ..sampling.partial import LatentMask, resize_mask
from .batching import Batcher, StepPlan
from .denoise import evaluate, size_conditioning
from .latents import upscale_latent
from .request import EngineRequest, RequestState
from .text import encode_prompts

log = logging.getLogger(__name__)

Failure = tuple[EngineRequest, ServiceError]


@dataclass(frozen=True)
class StepOutputs:
    """What execute() did: the rows that actually took part in the forward and their
    predictions, in the same order, and the requests that failed on the way."""

    ran: tuple[EngineRequest, ...] = ()
    predictions: tuple[tuple[Tensor, Tensor], ...] = ()
    failed: tuple[Failure, ...] = ()


@dataclass(frozen=True)
class StepResult:
    finished: tuple[EngineRequest, ...] = ()  # sampling done: decode next
    failed: tuple[Failure, ...] = ()
    dropped: tuple[EngineRequest, ...] = ()  # cancelled or expired
    wait: float = 0.0  # nothing ran: the admission window holds this much longer
    admitted: tuple[EngineRequest, ...] = ()  # started this step (prefilled without failing)
    advanced: tuple[EngineRequest, ...] = ()  # took one more evaluation, finished ones included


class EngineCore:
    def __init__(self, models: dict[int, LoadedModel], batcher: Batcher, preview_interval: float = 0.0) -> None:
        self.models = models
        self.batcher = batcher
        # Seconds between two previews of a request at least: each one is a JPEG and a message,
        # and a request that asks for one every step on a fast model would cost its batch-mates.
        self.preview_interval = preview_interval
        self.consecutive_failures = 0

    def add(self, request: EngineRequest) -> None:
        self.batcher.add(request)

    def abort(self, request: EngineRequest) -> None:
        self.batcher.abort(request)

    def has_work(self) -> bool:
        return self.batcher.has_work()

    def step(self, now: float | None = None) -> StepResult:
        plan = self.batcher.schedule(time.monotonic() if now is None else now)
        if plan.wait or not plan.evaluate:
            return StepResult(dropped=plan.dropped, wait=plan.wait)
        return self.update(plan, self.execute(plan))

    def execute(self, plan: StepPlan) -> StepOutputs:
        """Prepare newly admitted requests, then run one UNet evaluation for the plan's rows."""
        failed = self._prefill(plan.admit)
        failed_requests = {request for request, _ in failed}
        rows = tuple(r for r in plan.evaluate if r not in failed_requests)
        if not rows:
            return StepOutputs(failed=tuple(failed))
        model = self.models[rows[0].params.model_id]
        started = time.perf_counter()
        try:
            predictions = evaluate(model, [r.pending_input() for r in rows])
        except Exception as error:  # a failed forward fails its batch; the caller decides about the engine
            self.consecutive_failures += 1
            log.exception("UNet evaluation failed", extra={"model_id": model.id, "batch": len(rows)})
            failure = InternalError(f"generation failed: {type(error).__name__}")
            return StepOutputs(failed=(*failed, *((r, failure) for r in rows)))
        self.consecutive_failures = 0
        seconds = time.perf_counter() - started
        metrics.BATCH_SIZE.labels(model=str(model.id)).observe(len(rows))
        metrics.EVALUATIONS.labels(model=str(model.id)).inc()
        for request in rows:
            request.times.denoise += seconds
            request.times.batch_sizes.append(len(rows))
        return StepOutputs(ran=rows, predictions=tuple(predictions), failed=tuple(failed))

    def update(self, plan: StepPlan, outputs: StepOutputs) -> StepResult:
        """Hand each request its predictions; finished and failed ones leave the running set."""
        failed = list(outputs.failed)
        finished, advanced = [], []
        now = time.monotonic()
        for request, (cond, uncond) in zip(outputs.ran, outputs.predictions):
            step = request.run.step
            x_evaluated, sigma = request.run.pending
            try:
                request.run.advance(cond, uncond)
            except Exception as error:
                log.exception("sampler step failed", extra={"request_id": request.request_id})
                failed.append((request, InternalError(f"sampling failed: {type(error).__name__}")))
                continue
            request.last_evaluated = now
            request.times.evaluations += 1
            self.batcher.charge(request, request.evaluation_work)  # its tenant's fair share (batching.py)
            advanced.append(request)
            if (
                request.previews and request.run.step > step
                and request.run.step % request.params.preview_every_steps == 0
                and now - request.last_preview >= self.preview_interval
            ):
                # The guided prediction of the clean latent at this step, guided as the sampler
                # guides it (RescaleCFG included): what a preview shows.
                request.preview_latent = request.run.guided(x_evaluated, sigma, cond, uncond)
                request.last_preview = now
            if request.run.done and not request.last_pass:
                # The next pass (hires fix) starts from this one's latent, never decoded, in the
                # bucket of its own size; its first evaluation comes with that bucket's next turn.
                try:
                    request.pass_index += 1
                    self._start_sampling(self.models[request.params.model_id], request, request.run.result)
                except Exception as error:
                    log.exception("next pass setup failed", extra={"request_id": request.request_id})
                    failed.append((request, InternalError(f"sampler setup failed: {type(error).__name__}")))
            elif request.run.done:
                self.batcher.charge(request, request.decode_work)
                self.batcher.finish(request)
                request.advance(RequestState.DECODING)
                finished.append(request)
        for request, _ in failed:
            self.batcher.finish(request)
        failed_requests = {request for request, _ in failed}
        return StepResult(
            finished=tuple(finished), failed=tuple(failed), dropped=plan.dropped, advanced=tuple(advanced),
            admitted=tuple(r for r in plan.admit if r not in failed_requests),
        )

    def _prefill(self, admitted: tuple[EngineRequest, ...]) -> list[Failure]:
        """Encode prompts (batched per model) and set up each admitted request's sampler."""
        failed: list[Failure] = []
        by_model: dict[int, list[EngineRequest]] = defaultdict(list)
        for request in admitted:
            by_model[request.params.model_id].append(request)
        for model_id, requests in by_model.items():
            model = self.models[model_id]
            started = time.perf_counter()
            try:
                encoded = self._encode(model, requests)
            except Exception as error:
                log.exception("prompt encoding failed", extra={"model_id": model_id})
                failure = InternalError(f"prompt encoding failed: {type(error).__name__}")
                failed += [(request, failure) for request in requests]
                continue
            seconds = time.perf_counter() - started
            for index, request in enumerate(requests):
                request.cond, request.uncond = encoded[2 * index], encoded[2 * index + 1]
                request.times.text_encode = seconds
                try:
                    self._start_sampling(model, request)
                except Exception as error:
                    log.exception("sampler setup failed", extra={"request_id": request.request_id})
                    failed.append((request, InternalError(f"sampler setup failed: {type(error).__name__}")))
        return failed

    @staticmethod
    def _encode(model: LoadedModel, requests: list[EngineRequest]):
        prompts = [prompt for r in requests for prompt in r.prompts]
        if not any(r.loras for r in requests):
            return encode_prompts(model, prompts)
        # Text-encoder LoRAs per request: a request owns both its prompts (and the empty-prompt
        # row its weights need), so they all see its LoRAs, as in ComfyUI's patched CLIP.
        owners = [r for r in requests for _ in r.prompts]
        return encode_prompts(model, prompts, owners=owners, wrap_forward=text_encoder_wrapper({r: r.loras for r in requests}))

    @staticmethod
    def _start_sampling(model: LoadedModel, request: EngineRequest, previous: Tensor | None = None) -> None:
        """Set up the sampler of the request's current pass (docs/image-to-image.md): from
        noise, from its encoded picture, or from the `previous` pass's latent, upscaled."""
        p, step = request.params, request.current_pass
        if not request.pass_totals:
            request.pass_totals = tuple(q.totals(model.sigma_table, p.scheduler, p.sampler) for q in request.plan.passes)
        # The model's own table: a zero-terminal-SNR model schedules from its sigma_max of about
        # 4.5e3, and the start-noise rule below compares with that.
        sigmas = step.sigmas(model.sigma_table, p.scheduler, p.sampler)
        shape = (request.samples, *latent_shape(step.height, step.width)[1:])
        if previous is not None:
            latent = upscale_latent(previous, shape[-2:], step.upscale, model.vae.config.scaling_factor)
        elif request.image_latent is not None:
            latent = request.image_latent.expand(shape).contiguous()  # RepeatLatentBatch: N copies of the picture
        else:
            latent = None  # text-to-image: ComfyUI's empty latent is zeros
        # One draw for the whole batch of images, as ComfyUI's EmptyLatentImage + KSampler make it;
        # each pass draws afresh from the seed at its own shape, as a second KSampler does.
        noise = initial_noise(request.seed, shape).to(model.device)
        x = starting_latent(noise, sigmas[0], model.sigma_table.sigma_max, latent)
        mask = None
        if request.mask is not None:
            mask = LatentMask(resize_mask(request.mask, latent), latent, noise)
        # SDXL's size conditioning is each pass's own size, as ComfyUI fills it from the latent.
        request.time_ids = size_conditioning(step.height, step.width, model.device)
        request.run = SamplingRun(p.sampler, x, sigmas, p.cfg_scale, AncestralNoise(request.seed, x), p.cfg_rescale, mask)
