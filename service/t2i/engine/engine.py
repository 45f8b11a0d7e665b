"""The asyncio front of the engine: admission, cancellation, answers, and the loop's guard.

Threads, and why:
- the event loop (gRPC) only validates, enqueues, asks for aborts and awaits futures;
- one denoise thread runs `EngineCore.step()` back to back, so the GPU is fed without the
  event loop in between. New requests and aborts reach it through two queues it drains before
  every step; it is the only thread that touches the core;
- the finishing stage (finishing.py) decodes and encodes on its own threads.

A request is answered by entering a terminal state (request.py), through `_settle` only, which
also keeps the in-flight count that draining waits on.

When the loop fails: an error attributed to requests fails just those (core.py). Any other
error escaping a step fails every running and queued request with INTERNAL (never charged),
reports NOT_SERVING, and restarts the loop with an empty core, reporting SERVING again. The
engine gives up (health stays NOT_SERVING, `fatal` is set and the server exits non-zero so
that the orchestrator replaces the process) when the loop failed `max_loop_failures` times
within `loop_failure_window` seconds, or when `max_consecutive_failures` UNet forwards in a
row failed: that is a broken device, not a bad request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import metrics
from ..domain import Event, GenerateRequest, GenerateResult, LoraDescription, LoraSpec, ModelInfo, Progress, Queued, Started
from ..errors import InternalError, InvalidArgument, NotFound, Overloaded, RequestAborted, Unavailable
from ..lora import ResolvedLora
from ..models.loader import LoadedModel
from ..sampling import resolve_seed
from ..settings import EngineConfig
from ..validation import check_required, check_size, validate
from . import pictures
from .batching import Batcher
from .core import EngineCore, StepResult
from .finishing import ImageFinisher
from .request import EngineRequest, RequestState
from .loras import load_loras, resolve_loras
from .text import PreparedPrompt, context_chunks, prepare_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """What checking a request produced, for the engine to use once it is admitted."""

    prompts: tuple[PreparedPrompt, PreparedPrompt]
    loras: tuple[ResolvedLora, ...]
    # The request as it will run: with a picture and no size given, the picture's own size
    # cropped to multiples of 8 (what pricing and the engine use).
    params: GenerateRequest

    @property
    def context_chunks(self) -> int:
        """Chunks of the longer text context: what each evaluation attends to (t2i.cost)."""
        return context_chunks(self.prompts)


class AsyncEngine:
    def __init__(self, models: dict[int, LoadedModel], config: EngineConfig = EngineConfig()) -> None:
        self.models = models
        self.config = config
        self._torch_threads: int | None = None
        self.core = EngineCore(
            models, Batcher(config.max_batch_size, config.admission_window_ms / 1000,
                            admission_gap=config.admission_gap_ms / 1000, fair=config.fair_share,
                            oldest_first=config.oldest_first, lora_sets_apart=config.lora_sets_apart),
            preview_interval=config.preview_interval_ms / 1000,
        )
        self.finisher = ImageFinisher(
            models, self._settle, png_workers=config.png_workers, png_compress_level=config.png_compress_level,
            thread_setup=self._set_torch_threads,
        )
        self._wakeup = threading.Condition()
        self._inbox: list[EngineRequest] = []
        self._aborts: deque[EngineRequest] = deque()
        self._admitting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._inflight = 0
        self._idle = threading.Event()
        self._idle.set()
        self._loop_failures: deque[float] = deque()
        # Set when the engine gave up; `reason` says why. Health callbacks get (serving, reason).
        self.fatal = threading.Event()
        self.fatal_reason = ""
        self._health_listeners: list[Callable[[bool, str], None]] = []

    # --- public API (event loop) ---------------------------------------------------------

    def start(self) -> None:
        threads = self.config.torch_threads or None
        if threads is None and all(m.device.type == "cpu" for m in self.models.values()):
            threads = max(1, (os.cpu_count() or 2) - 1)
        self._torch_threads = threads
        self.finisher.start()
        self._thread = threading.Thread(target=self._denoise_loop, name="t2i-denoise", daemon=True)
        self._thread.start()

    def on_health(self, listener: Callable[[bool, str], None]) -> None:
        """Call `listener(serving, reason)` from the denoise thread when the engine's ability
        to serve changes (a loop failure, its restart, giving up)."""
        self._health_listeners.append(listener)

    def _set_torch_threads(self) -> None:
        # OpenMP settings are per thread: each worker thread sets its own.
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)

    def model_infos(self) -> list[ModelInfo]:
        return [self.models[i].info() for i in sorted(self.models)]

    def lora_descriptions(self, model_id: int = 0) -> list[LoraDescription]:
        """The registered LoRAs of one model (0: of every model), by model, then name."""
        ids = [model_id] if model_id else sorted(self.models)
        found = []
        for i in ids:
            registry = self.model(i).loras
            for info in sorted(registry.loras(), key=lambda info: info.name) if registry else ():
                found.append(LoraDescription(
                    name=info.name, model_id=i, base_model=info.base_model, rank=info.rank, size_bytes=info.size_bytes,
                    has_text_encoder=info.has_text_encoder, trigger_words=tuple(info.trigger_words), hash=info.short_hash,
                ))
        return found

    def rescan_loras(self) -> None:
        """Re-read every model's LoRA folder (SIGHUP): operators add LoRAs without a restart."""
        for model in self.models.values():
            if model.loras is not None:
                result = model.loras.rescan()
                log.info("LoRA folder rescanned", extra={
                    "model_id": model.id, "added": result.added, "removed": result.removed, "changed": result.changed,
                    "refused": sorted(result.refused),
                })

    def model(self, model_id: int) -> LoadedModel:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(str(i) for i in sorted(self.models))
            raise NotFound(f"model {model_id} does not exist; available model ids: {known}") from None

    def check(self, params: GenerateRequest) -> Checked:
        """NotFound or InvalidArgument for a request this engine would refuse; else what it
        needs later: its prompts parsed and chunked, its LoRAs resolved (no tensor work, so
        fine on the event loop)."""
        check_required(params)
        model = self.model(params.model_id)
        info = model.spec.info()
        params = self._picture_size(params, info)
        validate(params, info)
        syntax = params.syntax
        prompts = (prepare_prompt(model, params.prompt, "prompt", syntax=syntax),
                   prepare_prompt(model, params.negative_prompt, "negativePrompt", syntax=syntax))
        params = with_lora_tags(params, prompts[0].lora_tags)
        return Checked(prompts, resolve_loras(model, params.loras), params)

    @staticmethod
    def _picture_size(params: GenerateRequest, info: ModelInfo) -> GenerateRequest:
        """Read the picture's and the mask's headers (no pixels decoded: a file claiming more
        pixels than the model allows is refused unread) and fill in the size when the caller
        left it out."""
        if not params.init_image:
            return params
        picture = pictures.read_header(params.init_image, "initImage", info.max_pixels)
        if params.mask:
            mask = pictures.read_header(params.mask, "mask", info.max_pixels)
            if (mask.width, mask.height) != (picture.width, picture.height):
                raise InvalidArgument(
                    "mask", params.mask,
                    f"is {mask.width}x{mask.height} but initImage is {picture.width}x{picture.height} "
                    "(after EXIF orientation); they must be the same size",
                )
        if bool(params.width) != bool(params.height):
            raise InvalidArgument(
                "width" if not params.width else "height", 0,
                "give both width and height (the picture is resized to them) or neither (the picture's own size)",
            )
        if params.width:
            return params
        width, height = pictures.cropped_size(picture.width, picture.height)
        origin = f" (initImage is {picture.width}x{picture.height}, cropped to multiples of 8: {width}x{height})"
        resolved = dataclasses.replace(params, width=width, height=height)
        check_size(resolved, info, origin)
        return resolved

    def waiting(self) -> int:
        """Requests accepted and not yet admitted to a batch."""
        return len(self._inbox) + len(self.core.batcher.waiting)

    def wants_work(self) -> bool:
        """Whether a request taken now would likely run in the next batch: the engine accepts
        requests and fewer wait than a batch holds. The job runner (t2i.jobs.runner) takes jobs
        while this holds, so a replica keeps its next batch full and leaves the rest of the
        shared queue to other replicas."""
        return self.admission_error() is None and self.waiting() < self.config.max_batch_size

    def admission_error(self) -> Unavailable | Overloaded | None:
        """Why a new request would be refused right now, if it would."""
        if self.fatal.is_set():
            return Unavailable(f"the image engine failed ({self.fatal_reason}); this replica takes no requests")
        if not self._admitting:
            return Unavailable("the server is shutting down and takes no new requests")
        queued = len(self._inbox) + len(self.core.batcher.waiting)
        if queued >= self.config.max_queue:
            return Overloaded(
                f"the generation queue is full ({queued} requests waiting, limit {self.config.max_queue}); retry later",
                retry_after=1.0,
            )
        return None

    async def generate(
        self, params: GenerateRequest, *, request_id: str | None = None, deadline: float | None = None,
        events: Callable[[Event], None] | None = None, tenant: str = "", weight: float = 1.0,
        checked: Checked | None = None,
    ) -> GenerateResult:
        """Generate the request's images; raises ServiceError subclasses (RequestAborted when
        dropped). With `events`, it is called on this loop with each Queued, Started,
        Progress and Preview event of the request, throttled (streams); the unary and the
        streamed call are otherwise the same path. `tenant` (an API key's id) and its `weight`
        decide its fair share of the engine (batching.py). `checked`: this request's check(),
        when the caller already made it (billing does, to price it)."""
        checked = checked or self.check(params)
        # A size the caller gave is what the picture is fitted to; left out, the picture is only cropped.
        fit = (params.width, params.height) if params.width else None
        params = checked.params
        loop = asyncio.get_running_loop()
        request = EngineRequest(
            request_id=request_id or uuid.uuid4().hex, params=params, seed=resolve_seed(params.seed), deadline=deadline,
            prompts=checked.prompts, loop=loop, future=loop.create_future(), events=events, tenant=tenant, weight=weight,
        )
        if params.init_image:
            refusal = self.admission_error()
            if refusal is not None:
                raise refusal
            # Before the LoRAs are pinned: a picture that cannot be read is refused holding nothing.
            await self._encode_picture(request, fit)
        if checked.loras:
            # Refused before any weights are pinned or read when it would be refused anyway.
            refusal = self.admission_error()
            if refusal is not None:
                raise refusal
            # Loaded off the denoise thread; the request joins the engine once its LoRAs are on
            # the device, so a first use never stalls anyone else's steps.
            request.loras, request.lora_leases = await load_loras(self.model(params.model_id), checked.loras)
        with self._wakeup:
            refusal = self.admission_error()
            if refusal is not None:
                # The queue filled (or shutdown began) while the LoRAs loaded: the request never
                # enters the engine, so nothing would settle it; give its pins back here.
                if request.lora_leases is not None:
                    request.lora_leases.release()
                raise refusal
            ahead = len(self._inbox) + len(self.core.batcher.waiting)
            if events is not None:
                # Under the lock: the denoise thread cannot report "started" before this.
                request.reported_ahead, request.last_reported = ahead, time.monotonic()
                request.emit(Queued(position=ahead + 1, ahead=ahead))
            self._inbox.append(request)
            self._inflight += 1
            self._idle.clear()
            metrics.INFLIGHT.set(self._inflight)
            self._wakeup.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The client cancelled or its deadline passed: the denoise thread drops the
            # request before its next evaluation, wherever it is.
            with self._wakeup:
                self._aborts.append(request)
                self._wakeup.notify()
            raise

    async def _encode_picture(self, request: EngineRequest, size: tuple[int, int] | None) -> None:
        """Read the picture (and the mask) off the event loop, fitted to `size` by the request's
        resize mode when given, then VAE-encode it on the VAE thread; the request joins the
        denoise queue with its latent ready."""
        p, model = request.params, self.model(request.params.model_id)
        max_pixels = model.spec.info().max_pixels

        def read():
            pixels = pictures.decode_picture(p.init_image, "initImage", max_pixels, size, p.resize)
            mask = pictures.decode_mask(p.mask, "mask", max_pixels, size, p.resize) if p.mask else None
            cropped, _ = pictures.crop_to_multiple_of_8(pixels)
            return cropped, mask

        pixels, request.mask = await asyncio.to_thread(read)
        started = time.perf_counter()
        request.image_latent = (await self.finisher.vae_encode(model, pixels)).to(model.device)
        request.times.vae_encode = time.perf_counter() - started

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted request is answered; False if `timeout` ran out."""
        return await asyncio.to_thread(self._idle.wait, timeout)

    async def close(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._aborts.extend(self._inbox)
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.finisher.close()

    async def warm_up(self) -> None:
        """One small generation per model, so the first real request pays no start-up cost."""
        for info in self.model_infos():
            started = time.perf_counter()
            params = GenerateRequest(
                model_id=info.id, prompt="warm-up", negative_prompt="", height=info.min_size, width=info.min_size,
                steps=2, cfg_scale=5.0, seed=0, sampler="euler", scheduler="normal",
            )
            await self.generate(params, request_id=f"warm-up-{info.id}")
            # The VAE's encoder too, so that the first image-to-image request does not pay for it.
            await self.finisher.vae_encode(self.models[info.id], torch.zeros(info.min_size, info.min_size, 3))
            log.info("model warmed up", extra={"model_id": info.id, "seconds": round(time.perf_counter() - started, 2)})

    # --- answers (any thread) ----------------------------------------------------------------

    def _settle(self, request: EngineRequest, state: RequestState, *, result=None, error=None) -> None:
        if not request.settle(state, result=result, error=error):
            return
        with self._wakeup:
            self._inflight -= 1
            metrics.INFLIGHT.set(self._inflight)
            if self._inflight == 0:
                self._idle.set()

    # --- denoise thread -------------------------------------------------------------------

    def _denoise_loop(self) -> None:
        self._set_torch_threads()
        while True:
            with self._wakeup:
                for request in self._inbox:
                    self.core.add(request)
                self._inbox.clear()
                aborts = list(self._aborts)
                self._aborts.clear()
                if not aborts and not self.core.has_work():
                    if self._stopping:
                        return
                    self._wakeup.wait()
                    continue
            for request in aborts:
                self._abort(request)
            try:
                result = self.core.step()
            except Exception as error:  # nothing could be attributed: the loop itself failed
                if self._loop_failed(error):
                    return
                continue
            metrics.QUEUE_DEPTH.set(len(self.core.batcher.waiting))
            metrics.RUNNING.set(len(self.core.batcher.running))
            if self.core.consecutive_failures >= self.config.max_consecutive_failures:
                # Out of rotation first, then the answers (this step's failures among them).
                self._give_up(f"{self.core.consecutive_failures} UNet evaluations in a row failed", result)
                return
            self._dispatch(result)
            if result.wait:
                with self._wakeup:
                    if not self._inbox and not self._aborts:
                        self._wakeup.wait(timeout=result.wait)

    def _abort(self, request: EngineRequest) -> None:
        if request.state is RequestState.DECODING:
            # The finishing stage skips it; the denoise side no longer holds it.
            self._settle(request, RequestState.ABORTED, error=RequestAborted("cancelled before its image was encoded"))
        elif not request.state.terminal:
            self.core.abort(request)

    def _dispatch(self, result: StepResult) -> None:
        for request in result.dropped:
            log.info("request dropped", extra={"request_id": request.request_id, "reason": "cancelled or deadline"})
            self._settle(request, RequestState.ABORTED, error=RequestAborted("cancelled or past its deadline"))
        for request, error in result.failed:
            self._settle(request, RequestState.FAILED, error=error)
        self._report(result)
        for request in result.finished:
            self.finisher.submit(request)

    def _report(self, result: StepResult) -> None:
        """Stream events: started, progress (at most every progress_interval_ms, and always
        for the last step), previews when due, and queue places that changed."""
        now = time.monotonic()
        interval = self.config.progress_interval_ms / 1000
        for request in result.admitted:
            request.emit(Started(queue_seconds=request.times.queue_wait))
        for request in result.advanced:
            if request.events is None:
                continue
            run = request.run
            if run.done or now - request.last_reported >= interval:
                request.last_reported = now
                elapsed = now - (request.arrival + request.times.queue_wait)  # since admission
                step, total_steps, evaluations, total_evaluations = request.progress()
                remaining = elapsed / evaluations * (total_evaluations - evaluations)
                request.emit(Progress(step, total_steps, evaluations, total_evaluations, elapsed, remaining))
            if request.preview_latent is not None:
                self.finisher.submit_preview(request, request.progress()[0], request.preview_latent)
                request.preview_latent = None
        for ahead, request in enumerate(self.core.batcher.queue_order()):
            if request.events is not None and ahead != request.reported_ahead and now - request.last_reported >= interval:
                request.reported_ahead, request.last_reported = ahead, now
                request.emit(Queued(position=ahead + 1, ahead=ahead))

    def _loop_failed(self, error: Exception) -> bool:
        """Fail everything the loop held and restart it; True when the engine gives up."""
        log.exception("the engine loop failed; failing its requests and restarting it")
        now = time.monotonic()
        self._loop_failures.append(now)
        while self._loop_failures and self._loop_failures[0] < now - self.config.loop_failure_window:
            self._loop_failures.popleft()
        self._notify_health(False, f"engine loop failed: {type(error).__name__}")
        self._fail_everything(InternalError(f"the image engine failed ({type(error).__name__}); you were not charged"))
        if len(self._loop_failures) >= self.config.max_loop_failures:
            self._give_up(f"the engine loop failed {len(self._loop_failures)} times within {self.config.loop_failure_window:g} s")
            return True
        self._notify_health(True, "engine loop restarted")
        return False

    def _give_up(self, reason: str, last: StepResult | None = None) -> None:
        log.critical("the engine gives up", extra={"reason": reason})
        self.fatal_reason = reason
        self.fatal.set()
        # Health first: by the time callers hear of the failure, the replica is out of rotation.
        self._notify_health(False, reason)
        if last is not None:
            self._dispatch(last)
        self._fail_everything(InternalError(f"the image engine failed ({reason}); you were not charged"))

    def _fail_everything(self, error: InternalError) -> None:
        with self._wakeup:
            pending = [*self._inbox, *self.core.batcher.clear()]
            self._inbox.clear()
            self._aborts.clear()
        for request in pending:
            self._settle(request, RequestState.FAILED, error=error)

    def _notify_health(self, serving: bool, reason: str) -> None:
        for listener in self._health_listeners:
            try:
                listener(serving, reason)
            except Exception:
                log.exception("health listener failed")


def with_lora_tags(params: GenerateRequest, tags) -> GenerateRequest:
    """The request with its prompt's A1111 `<lora:NAME:TE:UNET>` tags added to its LoRAs (what
    runs, is priced and is recorded); a LoRA named twice, by tags or by a tag and `loras`, is
    refused: which strengths it should have is the caller's to say."""
    if not tags:
        return params
    named = {lora.name for lora in params.loras}
    added = []
    for tag in tags:
        if tag.name in named:
            raise InvalidArgument(
                "prompt", f"<lora:{tag.name}:...>",
                f"names the LoRA {tag.name!r} a second time (in another tag or in loras); give each LoRA once",
            )
        named.add(tag.name)
        added.append(LoraSpec(tag.name, strength=tag.unet, strength_clip=tag.text_encoder))
    return dataclasses.replace(params, loras=(*params.loras, *added))
