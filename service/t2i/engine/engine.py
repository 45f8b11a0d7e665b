"""The asyncio front of the engine: admission, cancellation and the decode/encode stages.

Threads, and why:
- the event loop (gRPC) only validates, enqueues and awaits futures;
- one denoise thread runs `EngineCore.step()` back to back, so the GPU is fed without the
  event loop in between;
- one decode thread runs the VAE (on CUDA in its own stream, overlapping the next UNet
  steps), and a small pool encodes PNGs. Neither blocks the denoise thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import metrics
from ..domain import GenerateRequest, GenerateResult, ModelInfo
from ..errors import InternalError, NotFound, Overloaded, ServiceError, Unavailable
from ..models.loader import LoadedModel
from ..sampling import resolve_seed
from ..validation import validate
from .core import EngineCore, StepResult
from .imaging import decode_latent, encode_png
from .request import EngineRequest, RequestState
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    admission_window: float = 0.02
    max_queue: int = 64
    png_compress_level: int = 4
    png_workers: int = 2
    # PyTorch intra-op threads for the denoise and decode threads; None: on a CPU, one less
    # than the cores, because OpenMP teams spinning against the gRPC and decode threads on a
    # fully booked machine cost more than the extra thread gains (measured: 2x at batch 1
    # on 2 cores); on CUDA, PyTorch's default.
    torch_threads: int | None = None


class RequestAborted(Exception):
    """The request was dropped because its client went away or its deadline passed."""


class AsyncEngine:
    def __init__(self, models: dict[int, LoadedModel], config: EngineConfig = EngineConfig()) -> None:
        self.models = models
        self.config = config
        self.core = EngineCore(models, Scheduler(config.max_batch_size, config.admission_window))
        self._wakeup = threading.Condition()
        self._inbox: list[EngineRequest] = []
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._admitting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._decode_pool = ThreadPoolExecutor(1, thread_name_prefix="t2i-decode")
        self._png_pool = ThreadPoolExecutor(config.png_workers, thread_name_prefix="t2i-png")
        self._decode_streams = {
            m.id: torch.cuda.Stream(device=m.device) for m in models.values() if m.device.type == "cuda"
        }
        self._inflight = 0
        self._torch_threads: int | None = None
        self._idle = threading.Event()
        self._idle.set()

    # --- public API (event loop) ---------------------------------------------------------

    def start(self) -> None:
        threads = self.config.torch_threads
        if threads is None and all(m.device.type == "cpu" for m in self.models.values()):
            threads = max(1, (os.cpu_count() or 2) - 1)
        self._torch_threads = threads
        self._decode_pool.submit(self._set_torch_threads).result()
        self._thread = threading.Thread(target=self._denoise_loop, name="t2i-denoise", daemon=True)
        self._thread.start()

    def _set_torch_threads(self) -> None:
        # OpenMP settings are per thread: each worker thread sets its own.
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)

    def model_infos(self) -> list[ModelInfo]:
        return [self.models[i].spec.info() for i in sorted(self.models)]

    def model(self, model_id: int) -> LoadedModel:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(str(i) for i in sorted(self.models))
            raise NotFound(f"model {model_id} does not exist; available model ids: {known}") from None

    def check(self, params: GenerateRequest) -> None:
        """Raise NotFound or InvalidArgument for a request this engine would refuse."""
        validate(params, self.model(params.model_id).spec.info())

    async def generate(
        self, params: GenerateRequest, *, request_id: str | None = None, deadline: float | None = None
    ) -> GenerateResult:
        """Generate one image; raises ServiceError subclasses or RequestAborted."""
        self.check(params)
        if not self._admitting:
            raise Unavailable("the server is shutting down and takes no new requests")
        request = EngineRequest(
            request_id=request_id or uuid.uuid4().hex, params=params, seed=resolve_seed(params.seed), deadline=deadline
        )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._wakeup:
            queued = len(self._inbox) + len(self.core.scheduler.waiting)
            if queued >= self.config.max_queue:
                raise Overloaded(
                    f"the generation queue is full ({queued} requests waiting, limit {self.config.max_queue}); retry later",
                    retry_after=1.0,
                )
            self._futures[id(request)] = (loop, future)
            self._inbox.append(request)
            self._inflight += 1
            self._idle.clear()
            metrics.INFLIGHT.set(self._inflight)
            self._wakeup.notify()
        try:
            return await future
        except asyncio.CancelledError:
            # The client cancelled or its deadline passed: the scheduler drops the request at
            # its next step, wherever it is.
            self._abort(request)
            raise

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted request is answered; False if `timeout` ran out."""
        return await asyncio.to_thread(self._idle.wait, timeout)

    async def close(self) -> None:
        with self._wakeup:
            self._stopping = True
            for request in self._inbox:
                request.abort_requested = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._decode_pool.shutdown(wait=True)
        self._png_pool.shutdown(wait=True)

    async def warm_up(self) -> None:
        """One small generation per model, so the first real request pays no start-up cost."""
        for info in self.model_infos():
            started = time.perf_counter()
            params = GenerateRequest(
                model_id=info.id, prompt="warm-up", negative_prompt="", height=info.min_size, width=info.min_size,
                steps=2, cfg_scale=5.0, seed=0, sampler="euler", scheduler="normal",
            )
            await self.generate(params, request_id=f"warm-up-{info.id}")
            log.info("model warmed up", extra={"model_id": info.id, "seconds": round(time.perf_counter() - started, 2)})

    # --- denoise thread -------------------------------------------------------------------

    def _denoise_loop(self) -> None:
        self._set_torch_threads()
        while True:
            with self._wakeup:
                for request in self._inbox:
                    self.core.add(request)
                self._inbox.clear()
                if not self.core.has_work():
                    if self._stopping:
                        return
                    self._wakeup.wait()
                    continue
            result = self.core.step()
            metrics.QUEUE_DEPTH.set(len(self.core.scheduler.waiting))
            metrics.RUNNING.set(len(self.core.scheduler.running))
            if result.wait:
                with self._wakeup:
                    if not self._inbox:
                        self._wakeup.wait(timeout=result.wait)
            self._dispatch(result)

    def _dispatch(self, result: StepResult) -> None:
        for request in result.dropped:
            log.info("request dropped", extra={"request_id": request.request_id, "reason": "cancelled or deadline"})
            self._resolve(request, error=RequestAborted("cancelled or past its deadline"))
        for request, error in result.failed:
            self._resolve(request, error=error)
        for request in result.finished:
            self._decode_pool.submit(self._decode, request)

    def _abort(self, request: EngineRequest) -> None:
        request.abort_requested = True
        with self._wakeup:
            self._wakeup.notify()

    # --- decode and encode stages -----------------------------------------------------------

    def _decode(self, request: EngineRequest) -> None:
        if request.abort_requested:
            self._resolve(request, error=RequestAborted("cancelled before decoding"))
            return
        model = self.models[request.params.model_id]
        started = time.perf_counter()
        try:
            stream = self._decode_streams.get(model.id)
            if stream is None:
                pixels = decode_latent(model, request.run.result)
            else:
                # Decode in a side stream so the denoise thread's next steps overlap it.
                stream.wait_stream(torch.cuda.current_stream(model.device))
                with torch.cuda.stream(stream):
                    request.run.result.record_stream(stream)
                    pixels = decode_latent(model, request.run.result)
        except ServiceError as error:
            self._resolve(request, error=error)
            return
        except Exception as error:
            log.exception("VAE decode failed", extra={"request_id": request.request_id})
            self._resolve(request, error=InternalError(f"image decoding failed: {type(error).__name__}"))
            return
        request.times.vae_decode = time.perf_counter() - started
        request.run = None  # the latent and the sampler's tensors are no longer needed
        self._png_pool.submit(self._encode, request, pixels)

    def _encode(self, request: EngineRequest, pixels) -> None:
        started = time.perf_counter()
        try:
            png = encode_png(pixels, self.config.png_compress_level)
        except Exception as error:
            log.exception("PNG encode failed", extra={"request_id": request.request_id})
            self._resolve(request, error=InternalError(f"PNG encoding failed: {type(error).__name__}"))
            return
        request.times.png_encode = time.perf_counter() - started
        request.state = RequestState.FINISHED
        times = request.times
        for stage in ("queue_wait", "text_encode", "denoise", "vae_decode", "png_encode"):
            metrics.STAGE_LATENCY.labels(stage=stage).observe(getattr(times, stage))
        log.info(
            "image generated",
            extra={
                "request_id": request.request_id,
                "model_id": request.params.model_id,
                "size": f"{request.params.width}x{request.params.height}",
                "sampler": request.params.sampler,
                "scheduler": request.params.scheduler,
                "steps": request.params.steps,
                "evaluations": times.evaluations,
                "mean_batch": round(sum(times.batch_sizes) / max(len(times.batch_sizes), 1), 2),
                "queue_wait_s": round(times.queue_wait, 4),
                "denoise_s": round(times.denoise, 4),
                "decode_s": round(times.vae_decode, 4),
                "png_s": round(times.png_encode, 4),
            },
        )
        self._resolve(request, result=GenerateResult(images=[png], seeds=[request.seed]))

    # --- futures --------------------------------------------------------------------------

    def _resolve(self, request: EngineRequest, *, result: GenerateResult | None = None, error: Exception | None = None) -> None:
        with self._wakeup:
            entry = self._futures.pop(id(request), None)
            if entry is None:
                return
            self._inflight -= 1
            metrics.INFLIGHT.set(self._inflight)
            if self._inflight == 0:
                self._idle.set()
        loop, future = entry

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
