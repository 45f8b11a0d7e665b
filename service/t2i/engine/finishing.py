"""The finishing stage: a finished latent becomes image bytes, off the denoise thread.

One decode thread runs the VAE (on CUDA in its own stream, overlapping the next UNet steps)
and a small pool encodes the images, so neither blocks the denoise loop. Each failure here
concerns exactly one request: it fails that request (INTERNAL, never charged) and nothing else.
A request whose caller went away while it waited here is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import metrics
from ..domain import GenerateResult
from ..errors import InternalError, ServiceError
from ..models.loader import LoadedModel
from .imaging import decode_latent, encode_png
from .request import EngineRequest, RequestState

log = logging.getLogger(__name__)

# settle(request, state, result=..., error=...): the engine's one way to answer a request.
Settle = Callable[..., None]
STAGES = ("queue_wait", "text_encode", "denoise", "vae_decode", "png_encode")


class ImageFinisher:
    def __init__(
        self, models: dict[int, LoadedModel], settle: Settle, *, png_workers: int, png_compress_level: int,
        thread_setup: Callable[[], None] = lambda: None,
    ) -> None:
        self.models = models
        self._settle = settle
        self._compress_level = png_compress_level
        self._decode_pool = ThreadPoolExecutor(1, thread_name_prefix="t2i-decode", initializer=thread_setup)
        self._encode_pool = ThreadPoolExecutor(png_workers, thread_name_prefix="t2i-png")
        self._streams = {m.id: torch.cuda.Stream(device=m.device) for m in models.values() if m.device.type == "cuda"}
        # Replaceable so that fault-injection tests can wrap the real stages.
        self.decode: Callable[[LoadedModel, torch.Tensor], object] = decode_latent
        self.encode: Callable[[object, int], bytes] = encode_png

    def submit(self, request: EngineRequest) -> None:
        self._decode_pool.submit(self._decode, request)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True)
        self._encode_pool.shutdown(wait=True)

    def _decode(self, request: EngineRequest) -> None:
        if request.state is not RequestState.DECODING:
            return  # aborted while it waited for the decoder
        model = self.models[request.params.model_id]
        started = time.perf_counter()
        try:
            stream = self._streams.get(model.id)
            if stream is None:
                pixels = self.decode(model, request.run.result)
            else:
                # Decode in a side stream so the denoise thread's next steps overlap it.
                stream.wait_stream(torch.cuda.current_stream(model.device))
                with torch.cuda.stream(stream):
                    request.run.result.record_stream(stream)
                    pixels = self.decode(model, request.run.result)
        except ServiceError as error:
            self._settle(request, RequestState.FAILED, error=error)
            return
        except Exception as error:
            log.exception("VAE decode failed", extra={"request_id": request.request_id})
            self._settle(request, RequestState.FAILED, error=InternalError(f"image decoding failed: {type(error).__name__}"))
            return
        request.times.vae_decode = time.perf_counter() - started
        request.run = None  # the latent and the sampler's tensors are no longer needed
        self._encode_pool.submit(self._encode, request, pixels)

    def _encode(self, request: EngineRequest, pixels) -> None:
        if request.state is not RequestState.DECODING:
            return
        started = time.perf_counter()
        try:
            image = self.encode(pixels, self._compress_level)
        except Exception as error:
            log.exception("PNG encode failed", extra={"request_id": request.request_id})
            self._settle(request, RequestState.FAILED, error=InternalError(f"PNG encoding failed: {type(error).__name__}"))
            return
        request.times.png_encode = time.perf_counter() - started
        self._log_finished(request)
        self._settle(request, RequestState.FINISHED, result=GenerateResult(images=[image], seeds=[request.seed]))

    @staticmethod
    def _log_finished(request: EngineRequest) -> None:
        times, p = request.times, request.params
        for stage in STAGES:
            metrics.STAGE_LATENCY.labels(stage=stage).observe(getattr(times, stage))
        log.info(
            "image generated",
            extra={
                "request_id": request.request_id, "model_id": p.model_id, "size": f"{p.width}x{p.height}",
                "sampler": p.sampler, "scheduler": p.scheduler, "steps": p.steps, "evaluations": times.evaluations,
                "mean_batch": round(sum(times.batch_sizes) / max(len(times.batch_sizes), 1), 2),
                "queue_wait_s": round(times.queue_wait, 4), "denoise_s": round(times.denoise, 4),
                "decode_s": round(times.vae_decode, 4), "png_s": round(times.png_encode, 4),
            },
        )
